"""Brain extraction by registration, and registration quality gates that hold for skull-on heads
and for T2/FLAIR contrasts (issue 16, item 2)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from xai_core.brain_extraction import extract_brain
from xai_core.data.brain import BrainOptions, make_study_full
from xai_core.metrics import dice
from xai_core.registration import check_registration, register_to_mni

CASES = {"on_t1": ("on", "t1"), "on_t2": ("on", "t2"), "off_t2": ("off", "t2")}


@pytest.fixture(scope="module")
def heads():
    """One lesion study (paired draws: same lesion, grid and deformation) as three inputs."""
    return {name: make_study_full(77, 3, label="glioma", options=BrainOptions(skull=skull, contrasts=(c,)))
            for name, (skull, c) in CASES.items()}


def test_extraction_keeps_the_brain_and_drops_the_skull(heads):
    st = heads["on_t1"]
    brain = st.brain.array > 0
    be = extract_brain(st.image)
    assert not be.registration.likely_failed, be.registration.reason
    assert be.image.same_geometry(st.image)
    assert be.mask[brain].mean() >= 0.98              # almost no brain is cut
    assert dice(be.mask > 0, brain) >= 0.85           # and most of the head outside it is gone
    bright = ~brain & (st.image.array > 0.5 * np.percentile(st.image.array[brain], 99))
    assert be.mask[bright].mean() < 0.35              # the bright scalp is mostly zeroed
    assert be.mask[st.mask.array > 0].all()           # the lesion survives
    np.testing.assert_array_equal(be.image.array[be.mask > 0], st.image.array[be.mask > 0])


@pytest.mark.parametrize("name", list(CASES))
def test_the_gate_flags_exactly_the_bad_registrations(heads, name):
    """Skull-on T2 registers badly to the skull-stripped T1 template (the bright CSF and scalp ring
    pulls the brain outwards: docs/data.md); the gate must say so, and pass the good ones."""
    st = heads[name]
    be = extract_brain(st.image)
    good = dice(be.mask > 0, st.brain.array > 0) >= 0.85
    assert be.registration.likely_failed == (not good), (name, be.registration.quality())


@pytest.mark.parametrize("name", ["on_t1", "off_t2"])
def test_gates_pass_skull_on_and_t2_and_catch_a_shift(heads, name):
    st = heads[name]
    reg = register_to_mni(st.image)
    q = reg.quality()
    assert not q["likely_failed"], q
    assert q["edge_ncc"] >= 0.6
    if name == "off_t2":
        assert q["ncc"] < 0.0  # the intensity NCC is inverted on T2: why it no longer gates
    shifted = sitk.CompositeTransform([reg.transform, sitk.TranslationTransform(3, (12.0, 0.0, 0.0))])
    bad = check_registration(st.image, shifted)
    assert bad["likely_failed"] and "edge NCC" in bad["reason"], bad
    assert bad["edge_ncc"] < q["edge_ncc"] - 0.25

"""Realism options of the study generator (docs/data.md): each does what it says, defaults do not move.

A handful of studies only (the generator works on the 1 mm atlas grid and has no reduced size);
most checks read the reference-grid anatomy or the small helpers directly.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import ndimage

from xai_core.data import anatomy as A
from xai_core.data.brain import (
    BrainOptions,
    _crop_fov,
    _paint_lesion,
    _render,
    _thick_slices,
    make_brain_studies,
    make_study,
    make_study_full,
    options_from_cli,
    read_manifest,
)
from xai_core.mni import load_harvard_oxford

# sha256 of image then mask bytes of make_study(7, 2) (an oblique, anisotropic glioma study) made by
# xai_core/data/brain.py at commit 39a0d8d, the generator the shipped model was trained on. A
# different digest means old seeds no longer make the studies they made.
DEFAULT_STUDY_SHA256 = "2f884f51e009672ec534cc674e4997e0ebf97a8d99d859136a5196392ac1a876"


def _digest(image, mask) -> str:
    return hashlib.sha256(np.ascontiguousarray(image.array).tobytes()
                          + np.ascontiguousarray(mask.array).tobytes()).hexdigest()


def test_default_study_is_bit_for_bit_what_it_was():
    image, mask, info = make_study(7, 2)
    assert (image.array.dtype, image.array.shape) == (np.float32, (59, 177, 143))
    assert _digest(image, mask) == DEFAULT_STUDY_SHA256
    assert info["top_structure"] == "Right_Parietal_Operculum_Cortex"
    assert (info["template"], info["skull"], info["contrast"], info["fov_crop"], info["slice_profile"]) == (
        "mni152", "off", "t1", "", "none")
    # The command line with no realism option gives the same options.
    assert options_from_cli() == BrainOptions()


def test_options_from_the_command_line():
    r = options_from_cli(realistic=True)
    assert r.templates == A.TEMPLATES and r.contrasts == A.CONTRASTS and r.skull == "mix"
    assert r.crop_fov > 0 and r.max_slice_mm == 6.0
    o = options_from_cli(realistic=True, skull="off", contrasts="t2,flair", templates="icbm09a")
    assert (o.skull, o.contrasts, o.templates, o.max_slice_mm) == ("off", ("t2", "flair"), ("icbm09a",), 6.0)
    for bad in (dict(templates="mni305"), dict(contrasts="pd"), dict(skull="maybe"), dict(crop_fov=1.5),
                dict(max_slice_mm=20.0), dict(min_slice_mm=3.0)):
        with pytest.raises(ValueError):
            options_from_cli(**bad)


@pytest.mark.parametrize("name", A.TEMPLATES)
def test_templates_are_aligned_with_the_atlas(name):
    """The atlas labels fall on each template's brain, and a misalignment would show."""
    ref, anat, ho = A.load_anatomy("mni152"), A.load_anatomy(name), load_harvard_oxford()

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert dice(anat.brain, ref.brain) >= 0.97
    assert dice(np.roll(anat.brain, 6, axis=1), ref.brain) < 0.95  # 6 mm off fails the bound above
    assert anat.brain[ho.labels > 0].mean() >= 0.97
    cortical = (ho.labels > 0) & (ho.labels <= 96)
    assert (anat.gm[cortical] > 0.3).mean() >= 0.7
    total = anat.gm + anat.wm_p + anat.csf
    np.testing.assert_allclose(total[anat.brain], 1.0, atol=1e-4)


@pytest.mark.parametrize("contrast,order", [("t1", ("wm", "gm", "csf")), ("t2", ("csf", "gm", "wm")),
                                            ("flair", ("gm", "wm", "csf"))])
def test_tissue_contrast_ordering(contrast, order):
    """Pure-tissue medians follow each contrast: T1 WM > GM > CSF, T2 CSF > GM > WM, FLAIR GM > WM > CSF."""
    anat = A.load_anatomy("icbm09a")
    img = anat.t1 if contrast == "t1" else A.synthesize(anat, A.TISSUE_LEVELS[contrast], None)
    maps = {"wm": anat.wm_p, "gm": anat.gm, "csf": anat.csf}
    med = {k: float(np.median(img[m > 0.7])) for k, m in maps.items()}
    assert med[order[0]] > med[order[1]] > med[order[2]], med


def test_random_contrast_keeps_lesions_visible():
    for s in range(200):
        tissues, lesions = A.random_levels(np.random.default_rng(s))
        assert all(0.05 <= v <= 1.0 for v in tissues.values())
        for k, v in lesions.items():
            if k.endswith("oedema"):
                assert 0.6 <= v <= 0.85 or 1.3 <= v <= 1.8
            else:
                assert abs(v - tissues["wm"]) >= 0.099 or v in (0.03, 1.3), (s, k, v, tissues)


@pytest.mark.parametrize("contrast", ["t1", "t2", "flair"])
def test_lesion_appearance_follows_the_contrast(contrast):
    """Oedema is dark on T1 and bright on T2/FLAIR; a necrotic core is fluid-bright on T2 only."""
    levels = A.LESION_LEVELS[contrast]
    tissue = A.TISSUE_LEVELS[contrast]
    shape = (60, 60, 60)
    region = np.full(shape, tissue["wm"], np.float32)  # the lesion sits in white matter
    les = _render("glioma", (30, 30, 30), 14.0, shape, 1.0, np.random.default_rng(0))
    _paint_lesion(region[les.box], les, levels)
    med = {k: float(np.median(region[les.box][m])) for k, m in les.parts.items()}
    if contrast == "t1":
        assert med["glioma_oedema"] < tissue["wm"] and med["glioma_core"] < med["glioma_mass"] < tissue["wm"]
    else:
        assert med["glioma_oedema"] > 1.3 * tissue["wm"]
        assert med["glioma_mass"] > tissue["gm"]
    if contrast == "t2":
        assert med["glioma_core"] > med["glioma_mass"]
    if contrast == "flair":
        assert med["glioma_core"] < med["glioma_mass"]


def test_thick_slices_blur_and_resample_one_axis_only():
    import SimpleITK as sitk

    ref = sitk.Image([20, 24, 40], sitk.sitkFloat32)
    ref.SetSpacing([1.5, 1.5, 1.5])
    a = np.zeros((40, 24, 20), np.float32)
    a[20] = 1.0  # one bright 1.5 mm slice
    a[:, 12, :] += 2.0  # a plane along k: must stay sharp in j
    new, (b,) = _thick_slices(ref, [a], axis=0, thickness=6.0)
    assert new.GetSpacing() == (1.5, 1.5, 6.0) and new.GetOrigin() == ref.GetOrigin()
    assert b.shape == (int((40 - 1) * 1.5 // 6.0) + 1, 24, 20)
    prof = b[:, 0, 0]
    assert 0 < prof.max() <= 1.5 / 6.0 + 1e-6  # partial volume: the slice is averaged into a 6 mm slab
    assert np.isclose(prof.sum() * 6.0, 1.5, atol=0.3)  # signal kept (slab average times thickness)
    np.testing.assert_allclose(b[:, 12, :] - b[:, 11, :], 2.0, atol=1e-5)  # in-plane unchanged


def test_crop_never_cuts_the_lesion():
    import SimpleITK as sitk

    ref = sitk.Image([50, 50, 50], sitk.sitkFloat32)
    brain = np.zeros((50, 50, 50), np.float32)
    brain[5:45, 5:45, 5:45] = 1
    mask = np.zeros_like(brain)
    mask[8:12, 20:25, 20:25] = 1  # near the low end of axis 0
    new, (img, msk, brn), rec = _crop_fov(ref, [brain.copy(), mask, brain], (0, True, 0.3))
    assert msk.sum() == mask.sum() and rec  # the low side is blocked by the lesion: the high side was cut
    assert '"side": "high"' in rec and img.shape[0] < 50
    assert new.GetOrigin() == ref.GetOrigin()


@pytest.fixture(scope="module")
def skull_pair():
    """The same T2 glioma study (seed 31, index 1, template icbm09a) with and without skull."""
    made = {}
    for skull in ("on", "off"):
        opts = BrainOptions(templates=("icbm09a",), skull=skull, contrasts=("t2",))
        made[skull] = make_study_full(31, 1, label="glioma", options=opts)
    return made


def test_skull_on_has_head_tissue_outside_the_brain(skull_pair):
    fractions = {}
    for skull, st in skull_pair.items():
        img, brain = st.image.array, st.brain.array > 0
        assert (st.info["skull"], st.info["template"], st.info["contrast"]) == (skull, "icbm09a", "t2")
        dist = ndimage.distance_transform_edt(~brain, sampling=st.image.spacing[::-1])
        shell = (dist > 4) & (dist < 16)
        wm_level = np.percentile(img[brain], 20)  # T2: white matter is the dark end of the brain
        fractions[skull] = ((img[shell] > 1.5 * wm_level).mean(), (img[dist > 25] < 0.3 * wm_level).mean())
    # Scalp fat and diploe are bright around the brain with the skull on; without it there is only air.
    assert fractions["on"][0] > 0.15 and fractions["off"][0] < 0.01, fractions
    assert fractions["on"][1] > 0.95  # beyond the scalp: air
    on = skull_pair["on"]
    dist = ndimage.distance_transform_edt(~(on.brain.array > 0), sampling=on.image.spacing[::-1])
    wm_level = np.percentile(on.image.array[on.brain.array > 0], 20)
    assert (on.image.array[(dist > 4) & (dist < 12)] < 0.3 * wm_level).mean() > 0.05  # dark bone too


def _check_lesion_on_structure(st, anat_name, intra_axial=True):
    anat, ho = A.load_anatomy(anat_name), load_harvard_oxford()
    ref = st.reference_mask
    assert ref.any()
    if intra_axial:
        assert anat.brain[ref].all()  # the lesion lies in this template's brain
        assert (st.brain.array[st.mask.array > 0] > 0).mean() > 0.97  # and on the study's grid too
    labels = ho.labels[ref]
    top = np.bincount(labels[labels > 0]).argmax()
    assert ho.names[top - 1] == st.info["top_structure"]
    assert np.isclose((labels == top).mean(), st.info["structures"][0][1], atol=1e-3)


def test_skull_on_lesion_stays_on_its_structure(skull_pair):
    st, off = skull_pair["on"], skull_pair["off"]
    _check_lesion_on_structure(st, "icbm09a")
    # Same lesion with and without skull: the realism choices have their own random stream.
    np.testing.assert_array_equal(off.mask.array, st.mask.array)
    assert off.info["top_structure"] == st.info["top_structure"]


def test_meningioma_under_the_skull_on_a_random_contrast():
    opts = BrainOptions(skull="on", contrasts=("random",))
    st = make_study_full(31, 0, label="meningioma", options=opts)
    assert st.info["contrast"] == "random" and st.info["contrast_levels"]
    _check_lesion_on_structure(st, "mni152", intra_axial=False)
    anat = A.load_anatomy("mni152")
    assert anat.intracranial[st.reference_mask].all()  # extra-axial, but never in the bone


def test_cropped_thick_flair_study_and_its_manifest(tmp_path):
    opts = BrainOptions(templates=("icbm09c",), contrasts=("flair",), crop_fov=1.0, max_slice_mm=6.0,
                        min_slice_mm=5.0)
    make_brain_studies(1, 104, tmp_path, workers=1, options=opts)  # seed 104, index 0: a meningioma
    (row,) = read_manifest(tmp_path)
    header = (tmp_path / "manifest.csv").read_text().splitlines()[0].split(",")
    historic = ["study_id", "label", "label_index", "image", "mask", "format", "top_structure", "structures",
                "hemisphere", "volume_ml", "n_lesions", "size", "spacing", "origin", "direction", "seed", "index"]
    assert header[: len(historic)] == historic  # old readers see the columns where they were
    assert (row["template"], row["skull"], row["contrast"]) == ("icbm09c", "off", "flair")
    assert row["slice_axis"] == "k" and row["slice_profile"] == "box" and 5.0 <= row["slice_mm"] <= 6.0
    assert np.isclose(row["spacing"][2], row["slice_mm"], atol=1e-3)
    assert row["fov_crop"]["removed_mm"] > 0 and 0 < row["fov_crop"]["brain_kept"] <= 1
    axis = "ijk".index(row["fov_crop"]["axis"])
    assert row["size"][axis] < int(np.ceil([196, 232, 196][axis] / row["spacing"][axis]))
    from xai_core.io import read_image

    mask, brain = read_image(row["mask"]).array, read_image(row["brain_mask"]).array
    assert mask.sum() > 0 and mask.shape == brain.shape
    # The lesion is whole: it does not touch the cut face.
    cut = [slice(None)] * 3
    ax = 2 - axis
    cut[ax] = 0 if row["fov_crop"]["side"] == "low" else -1
    assert mask[tuple(cut)].sum() == 0

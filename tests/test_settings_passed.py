"""Settings are passed in: two ``Settings`` objects in one process give two behaviours, the default
is read from the environment at call time (no process-wide cache), and no function of these
modules reads the cached global any more."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from xai_core import atlas, counterfactual, findings, masks, mni, registration, report
from xai_core.atlas import label_region
from xai_core.counterfactual import TemplateInFiller
from xai_core.io import Image
from xai_core.masks import saliency_levels, saliency_mask
from xai_core.mni import load_harvard_oxford, load_template
from xai_core.registration import RegistrationResult, check_registration
from xai_core.settings import Settings

REPO = Path(__file__).resolve().parent.parent
MODULES = [registration, atlas, counterfactual, report, masks, findings, mni]
# Read as text, not imported: xai_core.train pulls in MONAI (seconds), the bench scripts the model.
SOURCES = [REPO / "xai_core" / "train.py", REPO / "bench" / "mask_rule.py", REPO / "bench" / "atlas_labelling.py"]

# Each function that used to read the cached settings, and now takes them.
TAKES_SETTINGS = [
    registration.register_to_mni, registration.check_registration, registration.warp_to_mni,
    registration.warp_from_mni, registration.RegistrationResult.inverse,
    registration.RegistrationResult.resampling_transform, atlas.label_region, counterfactual.TemplateInFiller,
    report.draft_report, report.render_report, report.write_report, masks.saliency_levels, masks.saliency_mask,
    findings.build_findings,
]


def _keyword_settings(path: Path, name: str) -> bool:
    """Whether function ``name`` of the file at ``path`` has a keyword-only ``settings=None``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            args = node.args
            for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
                if arg.arg == "settings":
                    return isinstance(default, ast.Constant) and default.value is None
    return False


def _identity(spacing_mm: float | None = None) -> RegistrationResult:
    """The MNI -> MNI registration (for inputs that are the template itself)."""
    return RegistrationResult(transform=sitk.AffineTransform(3), kind="affine", metric=0.0, ncc=1.0, dice=1.0,
                              det=1.0, likely_failed=False, reason=None, seconds=0.0, grid_spacing_mm=spacing_mm)


@pytest.fixture(scope="module")
def template_region() -> Image:
    """A 25 mm ball on the template grid around a left frontal point: several atlas structures."""
    tpl = load_template()
    k, j, i = np.indices(sitk.GetArrayViewFromImage(tpl).shape)
    centre = np.asarray(tpl.TransformPhysicalPointToIndex((30.0, -20.0, 40.0)))[::-1]  # LPS: left, anterior
    ball = ((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2) <= 25**2
    return Image.from_sitk(tpl).with_array(ball.astype(np.float32))


def test_no_changed_function_reads_the_cached_settings():
    for module in MODULES:
        assert "get_settings" not in inspect.getsource(module), module.__name__
    for path in SOURCES:
        assert "get_settings" not in path.read_text(), path.name
    for fn in TAKES_SETTINGS:
        p = inspect.signature(fn).parameters.get("settings")
        assert p is not None and p.default is None and p.kind is inspect.Parameter.KEYWORD_ONLY, fn
    assert _keyword_settings(REPO / "xai_core" / "train.py", "train")


def test_two_settings_give_two_sets_of_saliency_levels():
    rng = np.random.default_rng(0)
    sal = rng.random((20, 20, 20))
    coarse, fine = Settings(mask_levels_percent=(50.0,)), Settings(mask_levels_percent=(50.0, 25.0, 1.0))
    lv_c, thr_c = saliency_levels(sal, settings=coarse)
    lv_f, thr_f = saliency_levels(sal, settings=fine)
    assert lv_c.max() == 1 and lv_f.max() == 3
    assert set(thr_c) == {50.0} and set(thr_f) == {50.0, 25.0, 1.0}
    np.testing.assert_array_equal(lv_c > 0, lv_f > 0)  # the top-50 % level is the same voxels
    m_c, m_f = saliency_mask(sal, settings=coarse), saliency_mask(sal, settings=fine)
    assert m_c.levels.max() == 1 and m_f.levels.max() == 3
    np.testing.assert_array_equal(m_c.mask, m_f.mask)  # the bounds are the explicit arguments
    # An explicit levels_percent still wins over the settings.
    assert saliency_levels(sal, levels_percent=(10.0, 5.0), settings=coarse)[0].max() == 2


def test_the_default_is_read_from_the_environment_at_call_time(monkeypatch):
    sal = np.random.default_rng(1).random((10, 10, 10))
    monkeypatch.delenv("XAI_MASK_LEVELS_PERCENT", raising=False)
    assert saliency_levels(sal)[0].max() == 4  # (1, 5, 10, 20)
    monkeypatch.setenv("XAI_MASK_LEVELS_PERCENT", "[50]")
    assert saliency_levels(sal)[0].max() == 1
    assert saliency_mask(sal).levels.max() == 1


def test_two_settings_give_two_atlas_labellings(template_region):
    reg, ho = _identity(), load_harvard_oxford()
    wide = label_region(template_region, reg, atlas=ho, settings=Settings(atlas_max_structures=12,
                                                                            atlas_min_structure_fraction=0.0))
    top2 = label_region(template_region, reg, atlas=ho, settings=Settings(atlas_max_structures=2))
    big_only = label_region(template_region, reg, atlas=ho, settings=Settings(atlas_min_structure_fraction=0.2))
    assert len(wide.structures) > 2 and len(top2.structures) == 2
    assert [s.name for s in top2.structures] == [s.name for s in wide.structures[:2]]
    assert all(s.fraction >= 0.2 for s in big_only.structures)
    assert len(big_only.structures) < len(wide.structures)
    assert wide.hemisphere == top2.hemisphere == "left"


def test_two_settings_give_two_registration_checks_and_grids():
    tpl = load_template()
    image = Image.from_sitk(tpl)
    ident = sitk.AffineTransform(3)
    coarse = Settings(registration_spacing_mm=8.0)
    ok = check_registration(image, ident, settings=coarse)
    strict = check_registration(image, ident, settings=Settings(registration_spacing_mm=8.0,
                                                                registration_min_edge_ncc=1.01))
    assert not ok["likely_failed"] and ok["ncc"] > 0.99
    assert strict["likely_failed"] and "NCC" in strict["reason"]
    assert strict["ncc"] == pytest.approx(ok["ncc"])
    # A result that does not know its grid takes it from the settings passed in.
    bs = sitk.BSplineTransformInitializer(registration.mni_grid(8.0)[0], [2, 2, 2], order=3)
    res = _identity()
    res.transform, res.kind = sitk.CompositeTransform([sitk.AffineTransform(3), bs]), "affine+bspline"
    field = res.resampling_transform(settings=coarse).GetNthTransform(1)
    assert sitk.DisplacementFieldTransform(field).GetDisplacementField().GetSpacing() == (8.0, 8.0, 8.0)
    res._fast = None
    res.grid_spacing_mm = 10.0  # a result that knows its grid keeps it
    field = res.resampling_transform(settings=coarse).GetNthTransform(1)
    assert sitk.DisplacementFieldTransform(field).GetDisplacementField().GetSpacing() == (10.0, 10.0, 10.0)


def test_two_settings_give_two_infillers():
    reg = _identity()
    a = TemplateInFiller(reg, settings=Settings(counterfactual_dilation_mm=1.0, counterfactual_blend_mm=0.5))
    b = TemplateInFiller(reg, settings=Settings(counterfactual_dilation_mm=6.0))
    assert (a.dilation_mm, a.blend_mm) == (1.0, 0.5)
    assert (b.dilation_mm, b.blend_mm) == (6.0, Settings().counterfactual_blend_mm)
    assert TemplateInFiller(reg, dilation_mm=2.0, settings=Settings(counterfactual_dilation_mm=6.0)).dilation_mm == 2.0

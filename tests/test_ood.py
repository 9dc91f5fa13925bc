"""Out-of-distribution guard (xai_core/ood.py): an OOD corpus is flagged, fresh studies are not.

The corpus is built here from package data (real DICOM slices of pydicom-data and pydicom, the MNI152
template) and small phantoms; bench/ood.py has a larger, differently made one.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from xai_core.io import Image, read_image
from xai_core.ood import STATS_SUFFIX, OODGuard, OODStats, fit_stats, input_checks, stats_path

SHIPPED = Path(__file__).resolve().parents[1] / "xai_core" / "models" / "weights"


def _pkg(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def _dicom(name: str, step: int = 1) -> tuple[np.ndarray, tuple[float, float]]:
    """First frame of a packaged DICOM file in rescaled units, and its pixel spacing (column, row)."""
    import pydicom

    for folder in (_pkg("data_store") / "data", _pkg("pydicom") / "data" / "test_files"):
        if (folder / name).is_file():
            ds = pydicom.dcmread(str(folder / name))
            break
    else:
        raise FileNotFoundError(name)
    px = ds.pixel_array[0] if ds.pixel_array.ndim == 3 else ds.pixel_array
    arr = px.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1) + float(
        getattr(ds, "RescaleIntercept", 0) or 0)
    sp = [float(v) for v in (getattr(ds, "PixelSpacing", None) or [0.2, 0.2])]
    sp = sp if min(sp) > 0 else [0.2, 0.2]  # RG1_UNCI (CR) records 0: a 35 cm chest on 1841 columns
    return np.ascontiguousarray(arr[::step, ::step]), (sp[1] * step, sp[0] * step)


def _img(arr: np.ndarray, spacing: tuple[float, float, float]) -> Image:
    return Image(np.ascontiguousarray(arr, dtype=np.float32), tuple(float(s) for s in spacing), (0.0, 0.0, 0.0),
                 (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def _stack(sl: np.ndarray, sp: tuple[float, float], n: int, thick: float) -> Image:
    return _img(np.repeat(sl[None], n, 0), (sp[0], sp[1], thick))


@pytest.fixture(scope="module")
def brain() -> Image:
    """The MNI152 brain template at 2 mm (small: the test stays fast)."""
    import SimpleITK as sitk

    from xai_core.mni import load_template

    t = load_template()
    size = [int(s * sp / 2.0) for s, sp in zip(t.GetSize(), t.GetSpacing(), strict=True)]
    r = sitk.Resample(t, size, sitk.Transform(), sitk.sitkLinear, t.GetOrigin(), [2.0] * 3, t.GetDirection(), 0.0)
    return Image.from_sitk(r)


def _corpus(brain: Image) -> dict[str, Image]:
    rng = np.random.default_rng(16)
    mask = brain.array > 0.1 * float(np.percentile(brain.array[brain.array > 0], 99))
    chest, chest_sp = _dicom("RG1_UNCI.dcm", step=8)
    abdomen, abd_sp = _dicom("MR-SIEMENS-DICOM-WithOverlays.dcm", step=2)
    ct, ct_sp = _dicom("693_UNCI.dcm", step=4)
    # A torso-like phantom, 3-D and textured (not stacked): body 360 x 240 mm, dark lungs, MR-like.
    k, j, i = np.ogrid[-40:40, -40:40, -60:60]
    body = (i / 60.0) ** 2 + (j / 40.0) ** 2 <= 1
    lungs = (((np.abs(i) - 25) / 18.0) ** 2 + (j / 25.0) ** 2 + (k / 35.0) ** 2) <= 1
    torso = np.where(body, 400.0, 0.0) * np.where(lungs, 0.1, 1.0) * np.ones((80, 1, 1))
    torso = ndimage.gaussian_filter(torso, 1.0) + rng.normal(0, 8, torso.shape)
    # A geometric phantom: nested spheres and a cylinder, head-sized, piecewise constant.
    g = np.mgrid[-50:50, -50:50, -50:50] * 2.0
    r = np.sqrt((g ** 2).sum(0))
    phantom = np.where(r < 80, 300.0, 0.0) + np.where(r < 40, 300.0, 0.0) + np.where(
        np.hypot(g[1], g[2] - 30) < 10, 200.0, 0.0)
    return {
        "chest CR, 2-D stacked": _stack(chest, chest_sp, 40, 4.0),
        "abdomen MR slice, stacked": _stack(abdomen, abd_sp, 36, 4.0),
        "head CT slice (HU), stacked": _stack(ct, ct_sp, 30, 5.0),
        "torso phantom": _img(torso, (3.0, 3.0, 3.0)),
        "geometric phantom": _img(phantom, (2.0, 2.0, 2.0)),
        "Gaussian noise": _img(rng.normal(100, 30, (90, 100, 90)), (2.0, 2.0, 2.0)),
        "constant head": brain.with_array(np.where(mask, 700.0, 0.0).astype(np.float32)),
        "brain slice stacked into 3-D": _stack(brain.array[brain.array.shape[0] // 2], brain.spacing[:2],
                                               brain.array.shape[0], 2.0),
        "brain mask with random values": brain.with_array(
            np.where(mask, rng.uniform(0, 1000, mask.shape), 0.0).astype(np.float32)),
        "brain template at 2.5x size": Image(brain.array, tuple(2.5 * s for s in brain.spacing), brain.origin,
                                             brain.direction),
    }


@pytest.fixture(scope="module")
def guard(default_model) -> OODGuard:
    g = OODGuard.for_model(default_model, weights_dirs=[SHIPPED])
    assert g.stats is not None, g.note
    return g


def test_corpus_flagged(default_model, guard, brain):
    """At least 9 of the 10 OOD volumes are flagged by the default guard, each with a reason line."""
    results = {name: guard.assess(default_model, default_model.prepare(img)) for name, img in _corpus(brain).items()}
    flagged = [n for n, r in results.items() if r.flagged]
    assert len(flagged) >= 9, {n: (r.flagged, r.score, r.reasons) for n, r in results.items()}
    for name in flagged:
        r = results[name]
        assert r.reasons and all(isinstance(s, str) and "\n" not in s for s in r.reasons), (name, r.reasons)
    # The feature check alone separates them too (the input checks are the named, cheap evidence).
    assert sum(r.score > r.threshold for r in results.values()) >= 9, {n: r.score for n, r in results.items()}


def test_named_reasons(brain):
    """Each input check names its problem."""
    def failed(img: Image) -> dict[str, str]:
        return {c.name: c.reason for c in input_checks(img) if not c.passed}

    stacked = _stack(brain.array[brain.array.shape[0] // 2], brain.spacing[:2], 64, 2.0)
    assert failed(stacked)["identical_slices"] == "a 2-D image stacked into 3-D: all 64 slices are identical"
    assert "noise-like" in failed(_img(np.random.default_rng(0).normal(0, 1, (60, 60, 60)), (2, 2, 2)))[
        "neighbour_correlation"]
    assert failed(brain.with_array(np.full(brain.array.shape, 3.0, np.float32)))["constant"].startswith(
        "constant volume")
    mask = brain.array > 0.1 * float(brain.array.max())
    assert "piecewise-constant" in failed(brain.with_array(mask.astype(np.float32)))["flat_fraction"]
    tiny = Image(brain.array, tuple(0.3 * s for s in brain.spacing), brain.origin, brain.direction)
    assert "too little head-like foreground" in failed(tiny)["min_volume_ml"]
    ct, ct_sp = _dicom("693_UNCI.dcm", step=4)
    assert "CT" in failed(_stack(ct, ct_sp, 30, 5.0))["ct_fraction"]
    # A stack made not bit-identical (shifted copies with noise) is still a stack.
    rng = np.random.default_rng(1)
    sl = brain.array[brain.array.shape[0] // 2]
    jittered = np.stack([ndimage.shift(sl, rng.uniform(-1, 1, 2), order=1) + rng.normal(0, 0.05 * sl.std(), sl.shape)
                         for _ in range(60)])
    assert "as alike as neighbours" in failed(_img(jittered, (2.0, 2.0, 2.0)))["slice_similarity_40mm"]
    # The template itself passes every input check.
    assert failed(brain) == {}


def test_false_alarms_heldout(default_model, guard, heldout_studies):
    """Fresh generated studies (all geometries and formats): at most one of 12 flagged (<= 8 %), and
    none by the input checks, which are set wide enough for every head."""
    results = [guard.assess(default_model, default_model.prepare(read_image(r["image"]))) for r in heldout_studies]
    assert sum(r.flagged for r in results) <= 1, [(r.score, r.reasons) for r in results]
    assert all(c.passed for r in results for c in r.checks if c.name != "feature_distance"), [
        r.reasons for r in results]
    assert all(r.feature_check and r.score is not None and r.score < 2 * r.threshold for r in results)


def test_skull_on_head_passes_input_checks(brain):
    """A head with skull and scalp is a head: no input check fires for the skull (the feature check is
    the model's own and may, see docs/ood.md)."""
    a = np.pad(brain.array, 12)
    mask = a > 0.1 * float(a.max())
    hull = ndimage.binary_closing(mask, iterations=4) | mask
    d = ndimage.distance_transform_edt(~hull, sampling=2.0)
    wm = float(np.percentile(a[mask], 99))
    head = a.copy()
    for lo, hi, v in [(0, 4, 0.05), (4, 8, 0.6), (8, 10, 0.05), (10, 16, 0.85), (16, 18, 0.4)]:
        head[(d > lo) & (d <= hi)] = v * wm
    head = head + np.random.default_rng(3).normal(0, 0.02 * wm, head.shape) * (head > 0)
    img = Image(head.astype(np.float32), brain.spacing, brain.origin, brain.direction)
    assert [c.reason for c in input_checks(img) if not c.passed] == []


def test_without_stats_input_checks_only(default_model, tmp_path, brain):
    """No statistics beside the weights: input checks only, and the result says so."""
    g = OODGuard.for_model(default_model, weights_dirs=[tmp_path])
    assert g.stats is None
    r = g.assess(default_model, default_model.prepare(brain))
    assert not r.feature_check and r.score is None and r.threshold is None
    assert r.notes and "input checks only" in r.notes[0] and "xai ood fit" in r.notes[0]
    assert not r.flagged
    noise = _img(np.random.default_rng(0).normal(0, 1, (60, 60, 60)), (3, 3, 3))
    assert g.assess(default_model, default_model.prepare(noise)).flagged


def test_stats_tied_to_weights(default_model, tmp_path):
    """Statistics fitted on other weights are not used; the stored file is small and well-formed."""
    shipped = stats_path(SHIPPED, default_model.card.name)
    assert shipped.name == f"brain-lesion-3d{STATS_SUFFIX}" and shipped.stat().st_size < 1_000_000
    data = json.loads(shipped.read_text())
    stats = OODStats.model_validate(data)
    assert stats.weights_sha256 == default_model.card.weights_sha256
    assert len(stats.features) >= 32 and stats.threshold > 0
    data["weights_sha256"] = "0" * 64
    (tmp_path / shipped.name).write_text(json.dumps(data))
    g = OODGuard.for_model(default_model, weights_dirs=[tmp_path])
    assert g.stats is None and "fitted on other weights" in g.note


def test_fit_stats_threshold_is_leave_one_out():
    """The threshold is the 99th percentile of leave-one-out distances: a new draw from the same
    Gaussian is rarely beyond it, a shifted one always is."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (64, 20))
    s = fit_stats(x, model="m", model_version="1", weights_sha256="")
    in_sample = [s.distance(v) for v in x]
    assert s.threshold > np.percentile(in_sample, 99)  # leave-one-out distances are larger than in-sample
    fresh = rng.normal(0, 1, (400, 20))
    assert np.mean([s.distance(v) > s.threshold for v in fresh]) < 0.06
    assert all(s.distance(v) > s.threshold for v in rng.normal(1.5, 1, (20, 20)))
    with pytest.raises(ValueError, match="at least 8"):
        fit_stats(x[:4], model="m", model_version="1", weights_sha256="")


def test_feature_capture_reuses_predict(default_model, guard, brain):
    """Features captured during ``predict`` equal those of the guard's own forward, so the pipeline
    can pass them and skip a second forward; the verdict is the same either way."""
    from xai_core.ood import FeatureCapture, pooled_features

    inputs = default_model.prepare(brain)
    own = pooled_features(default_model, inputs)
    with FeatureCapture(default_model) as cap:
        default_model.predict(inputs)
    assert cap.features.shape == (192,)
    np.testing.assert_allclose(cap.features, own, rtol=1e-5, atol=1e-6)
    a, b = guard.assess(default_model, inputs), guard.assess(default_model, inputs, features=cap.features)
    assert a.flagged == b.flagged and a.score == pytest.approx(b.score, rel=1e-5)
    assert not default_model.net.down2._forward_hooks  # hooks removed


def test_cli_fit_round_trip(default_model, heldout_studies, tmp_path, capsys, monkeypatch):
    """`xai ood fit` writes statistics that `for_model` finds beside the weights and uses."""
    from xai_core.cli import main

    monkeypatch.setenv("XAI_WEIGHTS_DIR", str(SHIPPED))  # the shipped model, not a fine-tuned copy
    monkeypatch.setenv("XAI_USER_WEIGHTS_DIR", str(tmp_path / "user"))
    folder = Path(heldout_studies[0]["image"]).parent
    out = tmp_path / f"brain-lesion-3d{STATS_SUFFIX}"
    assert main(["ood", "fit", "--model", "brain-lesion-3d", "--data", str(folder), "--limit", "8",
                 "--out", str(out)]) == 0
    assert "8 studies, 192 features" in capsys.readouterr().out
    g = OODGuard.for_model(default_model, weights_dirs=[tmp_path])
    assert g.stats is not None and len(g.stats.study_ids) == 8 and "ood fit" in g.stats.command
    assert g.stats.threshold > 0
    assert main(["ood", "fit", "--data", str(tmp_path / "missing")]) == 2  # one line, exit code 2

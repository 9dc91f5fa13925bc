"""Registration to MNI152: a known affine is recovered at the atlas's landmarks, on an oblique grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from xai_core.io import Image
from xai_core.mni import load_harvard_oxford, load_template
from xai_core.registration import check_registration, load_registration, register_to_mni


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    a, b = [i for i in range(3) if i != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def structure_centroids() -> tuple[list[str], np.ndarray]:
    """Names and LPS mm centroids of the Harvard-Oxford structures on the template."""
    atlas, tpl = load_harvard_oxford(), load_template()
    idx = np.nonzero(atlas.labels)
    lab = atlas.labels[idx].astype(np.int64)
    n = len(atlas.names) + 1
    counts = np.bincount(lab, minlength=n)
    kji = np.stack([np.bincount(lab, weights=i, minlength=n) for i in idx], axis=1)[1:] / counts[1:, None]
    pts = np.array([tpl.TransformContinuousIndexToPhysicalPoint(c[::-1].tolist()) for c in kji])
    return list(atlas.names), pts


def moved_template(matrix: np.ndarray, translation, centre) -> tuple[Image, sitk.AffineTransform]:
    """The template resampled through ``A`` (``moved(x) = template(A x)``) onto an oblique,
    anisotropic 2 mm grid. Returns the image and ``A`` (moved point -> template point)."""
    a = sitk.AffineTransform(3)
    a.SetCenter([float(v) for v in centre])
    a.SetMatrix(np.asarray(matrix, float).ravel().tolist())
    a.SetTranslation([float(v) for v in translation])
    d = _rotation(2, 20.0) @ _rotation(0, -10.0)
    spacing = np.array([1.9, 2.1, 2.6])
    size = np.array([100, 110, 80])
    ref = sitk.Image(size.tolist(), sitk.sitkFloat32)
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection(d.ravel().tolist())
    ref.SetOrigin((np.asarray(centre) - d @ (spacing * (size - 1) / 2)).tolist())
    return Image.from_sitk(sitk.Resample(load_template(), ref, a, sitk.sitkLinear, 0.0)), a


@pytest.fixture(scope="module")
def known_affine_case():
    names, pts = structure_centroids()
    centre = pts.mean(axis=0)
    matrix = _rotation(0, 8.0) @ _rotation(2, -5.0) * 1.05
    image, a = moved_template(matrix, (6.0, -4.0, 3.0), centre)
    return image, a, names, pts


def test_recovers_a_known_affine_within_2_mm_at_structure_centroids(known_affine_case, tmp_path):
    image, a, names, pts = known_affine_case
    reg = register_to_mni(image)
    assert not reg.likely_failed, reg.reason
    assert reg.kind == "affine"
    # The true MNI -> input map is A's inverse (A maps the input's points to the template's).
    truth = np.array([a.GetInverse().TransformPoint(p.tolist()) for p in pts])
    err = np.linalg.norm(reg.to_native(pts) - truth, axis=1)
    assert err.max() < 2.0, f"worst landmark {names[int(err.argmax())]}: {err.max():.2f} mm"
    assert reg.ncc > 0.9 and reg.dice > 0.9
    assert reg.det == pytest.approx(1 / 1.05**3, rel=0.03)  # input volume / MNI volume
    # Inverse and file round trip.
    assert np.abs(reg.to_mni(reg.to_native(pts)) - pts).max() < 1e-6
    path = reg.save(tmp_path / "to_mni.tfm")
    back = load_registration(path)
    assert back.kind == "affine" and back.likely_failed is False
    assert np.abs(back.to_native(pts) - reg.to_native(pts)).max() < 1e-6


def test_quality_gates_flag_a_wrong_transform(known_affine_case):
    image, a, _, _ = known_affine_case
    good = check_registration(image, a.GetInverse())
    assert not good["likely_failed"], good
    wrong = sitk.AffineTransform(a.GetInverse())
    wrong.SetTranslation((np.asarray(wrong.GetTranslation()) + [20.0, 0.0, -10.0]).tolist())
    wrong.SetMatrix((np.asarray(wrong.GetMatrix()).reshape(3, 3) @ _rotation(1, 15.0)).ravel().tolist())
    bad = check_registration(image, wrong)
    assert bad["likely_failed"] and "NCC" in bad["reason"]
    assert bad["ncc"] < good["ncc"] - 0.3


def test_a_non_brain_image_is_flagged():
    rng = np.random.default_rng(0)
    size = (60, 70, 60)
    a = np.zeros(size, np.float32)
    a[10:50, 15:55, 10:50] = 100 + 10 * rng.standard_normal((40, 40, 40))  # a box, not a brain
    reg = register_to_mni(Image(a, (3.0, 3.0, 3.0), (-90.0, -105.0, -80.0), tuple(np.eye(3).ravel())))
    assert reg.likely_failed and reg.reason


def test_bspline_stage_keeps_the_landmarks_and_round_trips(known_affine_case, tmp_path):
    image, a, _, pts = known_affine_case
    reg = register_to_mni(image, bspline=True)
    assert reg.kind == "affine+bspline" and not reg.likely_failed
    truth = np.array([a.GetInverse().TransformPoint(p.tolist()) for p in pts])
    assert np.linalg.norm(reg.to_native(pts) - truth, axis=1).max() < 2.0
    # The inverse goes through a numerically inverted field: sub-millimetre.
    assert np.linalg.norm(reg.to_mni(reg.to_native(pts)) - pts, axis=1).max() < 0.5
    back = load_registration(reg.save(tmp_path / "to_mni.h5"))
    assert back.kind == "affine+bspline"
    assert np.abs(back.to_native(pts) - reg.to_native(pts)).max() < 1e-4

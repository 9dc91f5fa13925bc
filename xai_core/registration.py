"""Registration of an input brain image (any geometry) to the MNI152 T1 template.

Direction of the registration
-----------------------------
The **template is the fixed image and the input is the moving image**, so the transform found,
:attr:`RegistrationResult.transform`, maps a physical point of MNI space (LPS mm) to the physical
point of the input (LPS mm) that shows the same anatomy. That is the direction ITK's resampler
needs to pull anything from the input *into* MNI space (masks, saliency maps: the atlas
labelling), which is what most callers do; the other way (the template into the input's space,
for the counterfactual in-filler) uses :meth:`RegistrationResult.inverse`, exact for the affine
and a numerically inverted displacement field for the optional B-spline stage.

Method
------
* Fixed: the template smoothed and resampled once to ``Settings.registration_spacing_mm``
  (2.5 mm, cached per process), with its brain grown by 5 mm as the metric mask so the brain
  border, the strongest feature, is sampled on both sides.
* Moving: the input as float32, intensities clipped to its 0.1-99.9 percentiles (a few hot
  voxels would otherwise squeeze the joint histogram), smoothed and resampled to no finer than
  the same spacing on its own grid (large inputs cost no more than small ones).
* Initialisation: ``CenteredTransformInitializer`` with moments (centres of mass aligned).
* Affine stage: Mattes mutual information (32 bins, works across MR contrasts and intensity
  scalings), random sampling of ``registration_sampling_fraction`` (5 %) of the fixed voxels
  inside the mask with a fixed seed (repeatable), regular-step gradient descent (step 2, relaxation
  0.7, at most ``registration_iterations`` = 200 per level) with scales from physical shift, three
  levels shrink 4/2/1 with smoothing 2/1/0 voxels.
* Optional B-spline stage (``registration_bspline``): control points every
  ``registration_bspline_mesh_mm`` (60 mm), same metric and sampling, L-BFGS-B (20 iterations per
  level), levels shrink 2/1 with smoothing 1/0 voxels, on top of the affine.

Time on 2 cores shared with a training job, 22 generated studies: affine median 1.9 s (at most
3.0 s); with the B-spline stage median 9.1 s (at most 10.9 s) (``docs/atlas.md``).

Quality
-------
After registration the input is warped onto the fixed grid and compared with the template:
``ncc`` is the normalised cross-correlation of intensities over the template brain (reported, not
a gate: T2 gives -0.6 to -0.7 and FLAIR 0.7 when aligned), ``edge_ncc`` the same of the gradient
magnitudes over the brain grown by 5 mm, which lines up in any contrast, ``dice`` the Dice overlap
of the input's foreground (Otsu threshold, holes filled) with the template brain and ``coverage``
the fraction of the template brain inside that foreground. The result is ``likely_failed`` when
``edge_ncc < registration_min_edge_ncc`` (0.5); for a skull-stripped input (foreground at most 1.25
times the brain) when ``dice < registration_min_dice`` (0.8), for a head with skull and scalp when
``coverage < registration_min_coverage`` (0.6, low so that a cropped field of view passes); when
the affine volume change ``det`` leaves ``registration_det_range`` (0.5..2); or when the optimizer
raised. Aligned generated studies (T1, T1 with skull, T2, FLAIR) gave edge NCC 0.68-0.96; the same
studies shifted by 10 mm 0.15-0.19 and turned by 15 degrees 0.31-0.44 (``docs/atlas.md``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .io import Image
from .mni import load_template
from .settings import Settings

__all__ = ["RegistrationCache",
           "RegistrationResult", "register_to_mni", "check_registration", "mni_grid", "warp_to_mni", "warp_from_mni",
           "load_registration"]

_INTERP = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


# --------------------------------------------------------------------------------- the template

@lru_cache(maxsize=4)
def mni_grid(spacing_mm: float) -> tuple[sitk.Image, sitk.Image]:
    """The MNI152 template at ``spacing_mm`` (float32, smoothed before resampling so that it does
    not alias) and its brain mask (uint8, template > 0 at 1 mm, nearest), cached per spacing.
    Both cover the 1 mm template's field of view with its direction."""
    tpl = load_template()
    sp_in = np.asarray(tpl.GetSpacing())
    size = np.maximum(1, np.round(np.asarray(tpl.GetSize()) * sp_in / spacing_mm)).astype(int)
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing([float(spacing_mm)] * 3)
    ref.SetDirection(tpl.GetDirection())
    # Keep the physical centre of the template's field of view.
    centre = np.asarray(tpl.TransformContinuousIndexToPhysicalPoint(((np.asarray(tpl.GetSize()) - 1) / 2).tolist()))
    d = np.asarray(tpl.GetDirection()).reshape(3, 3)
    ref.SetOrigin((centre - d @ (spacing_mm * (size - 1) / 2.0)).tolist())
    sigma = 0.5 * max(spacing_mm - float(sp_in.min()), 0.0)
    src = sitk.SmoothingRecursiveGaussian(tpl, sigma) if sigma > 0 else tpl
    fixed = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    brain = sitk.Resample(sitk.Cast(tpl > 0, sitk.sitkUInt8), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return fixed, brain


def _moving(image: Image, spacing_mm: float) -> sitk.Image:
    """The input prepared for registration (float32, clipped, no finer than ``spacing_mm``)."""
    a = np.asarray(image.array, dtype=np.float32)
    lo, hi = np.percentile(a, [0.1, 99.9])
    img = image.with_array(np.clip(a, lo, hi).astype(np.float32)).to_sitk()
    sp = np.asarray(img.GetSpacing())
    new_sp = np.maximum(sp, spacing_mm)
    if np.allclose(new_sp, sp):
        return img
    size = np.maximum(1, np.round(np.asarray(img.GetSize()) * sp / new_sp)).astype(int)
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing(new_sp.tolist())
    ref.SetDirection(img.GetDirection())
    # Same physical centre: voxel centres of the coarse grid straddle those of the fine one.
    centre = np.asarray(img.TransformContinuousIndexToPhysicalPoint(((np.asarray(img.GetSize()) - 1) / 2).tolist()))
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    ref.SetOrigin((centre - d @ (new_sp * (size - 1) / 2.0)).tolist())
    smooth = sitk.SmoothingRecursiveGaussian(img, 0.5 * float(spacing_mm - sp.min()))
    return sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


# ------------------------------------------------------------------------------------ the result

@dataclass
class RegistrationResult:
    """A registration of an input image to MNI152.

    Attributes:
        transform: maps MNI physical points (LPS mm) to input physical points (LPS mm); an
            ``AffineTransform`` or, with the B-spline stage, a ``CompositeTransform``
            ``[affine, bspline]`` (the B-spline is applied first, to the MNI point).
        kind: ``"affine"`` or ``"affine+bspline"``.
        metric: final Mattes mutual-information value of the last stage (negative; lower is better).
        ncc: normalised cross-correlation of the warped input and the template in the template brain.
        dice: Dice of the warped input's foreground and the template brain mask.
        edge_ncc: normalised cross-correlation of the gradient magnitudes of the warped input and
            the template in the template brain grown by 5 mm (the gate: works for any contrast).
        coverage: fraction of the template brain inside the warped input's foreground.
        det: determinant of the affine matrix (input volume / MNI volume).
        likely_failed: True when a quality gate failed (see the module docstring).
        reason: why it likely failed (None otherwise).
        seconds: wall time of the registration, quality check included.
        stop: the optimizer's stop condition of the last stage.
        grid_spacing_mm: spacing of the MNI grid it was registered on (the grid a B-spline stage is
            sampled on for :meth:`inverse` and :meth:`resampling_transform`); None (a result built
            elsewhere) falls back to ``Settings.registration_spacing_mm``.
    """

    transform: sitk.Transform
    kind: str
    metric: float
    ncc: float
    dice: float
    det: float
    likely_failed: bool
    reason: str | None
    seconds: float
    stop: str = ""
    edge_ncc: float = float("nan")
    coverage: float = float("nan")
    grid_spacing_mm: float | None = None
    _inverse: sitk.Transform | None = field(default=None, repr=False, compare=False)
    _fast: sitk.Transform | None = field(default=None, repr=False, compare=False)

    @property
    def affine(self) -> sitk.AffineTransform:
        """The affine part of :attr:`transform`."""
        t = self.transform
        if t.GetTransformEnum() == sitk.sitkComposite:
            t = sitk.CompositeTransform(t).GetNthTransform(0)
        return sitk.AffineTransform(t)

    def _grid(self, settings: Settings | None) -> sitk.Image:
        """The fixed MNI grid of this registration (module docstring)."""
        spacing = self.grid_spacing_mm
        if spacing is None:
            spacing = (settings or Settings()).registration_spacing_mm
        return mni_grid(float(spacing))[0]

    def inverse(self, *, settings: Settings | None = None) -> sitk.Transform:
        """Input physical point -> MNI physical point (LPS mm), cached.

        Exact for the affine. With a B-spline stage, the B-spline is sampled as a displacement field
        on the 2.5 mm MNI grid and inverted iteratively (sub-millimetre error for the smooth, small
        deformations this stage finds). ``settings`` gives the grid when :attr:`grid_spacing_mm` is
        None (default ``Settings()``)."""
        if self._inverse is None:
            a_inv = self.affine.GetInverse()
            if self.kind == "affine":
                self._inverse = a_inv
            else:
                bspline = sitk.CompositeTransform(self.transform).GetNthTransform(1)
                fixed = self._grid(settings)
                disp = sitk.TransformToDisplacementField(bspline, sitk.sitkVectorFloat64, fixed.GetSize(),
                                                         fixed.GetOrigin(), fixed.GetSpacing(),
                                                         fixed.GetDirection())
                inv = sitk.InvertDisplacementField(disp, maximumNumberOfIterations=30,
                                                   maxErrorToleranceThreshold=0.01,
                                                   meanErrorToleranceThreshold=0.001)
                # Composite applies its last transform first: the inverse affine, then the inverse field.
                self._inverse = sitk.CompositeTransform([sitk.DisplacementFieldTransform(inv), a_inv])
        return self._inverse

    def resampling_transform(self, *, settings: Settings | None = None) -> sitk.Transform:
        """:attr:`transform` for resampling whole volumes, cached: the affine itself, or with a B-spline
        stage the B-spline sampled once as a displacement field on the 2.5 mm MNI grid (trilinear
        look-ups instead of 64 control points per voxel: a 1 mm MNI volume in about a second instead
        of six; the field reproduces the smooth B-spline to well under a millimetre). ``settings`` as
        for :meth:`inverse`."""
        if self.kind == "affine":
            return self.transform
        if self._fast is None:
            bspline = sitk.CompositeTransform(self.transform).GetNthTransform(1)
            fixed = self._grid(settings)
            disp = sitk.TransformToDisplacementField(bspline, sitk.sitkVectorFloat64, fixed.GetSize(),
                                                     fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())
            self._fast = sitk.CompositeTransform([self.affine, sitk.DisplacementFieldTransform(disp)])
        return self._fast

    def to_native(self, points_mni_lps: np.ndarray) -> np.ndarray:
        """Input-space LPS mm of MNI LPS mm points, shape ``(N, 3)`` (or ``(3,)``)."""
        p = np.asarray(points_mni_lps, dtype=float)
        out = np.array([self.transform.TransformPoint(q.tolist()) for q in np.atleast_2d(p)])
        return out.reshape(p.shape)

    def to_mni(self, points_lps: np.ndarray) -> np.ndarray:
        """MNI LPS mm of input-space LPS mm points, shape ``(N, 3)`` (or ``(3,)``)."""
        p = np.asarray(points_lps, dtype=float)
        inv = self.inverse()
        out = np.array([inv.TransformPoint(q.tolist()) for q in np.atleast_2d(p)])
        return out.reshape(p.shape)

    def quality(self) -> dict[str, Any]:
        """JSON-ready quality figures and the failure flag."""
        return {"kind": self.kind, "metric": "Mattes mutual information", "metric_value": round(self.metric, 5),
                "ncc": round(self.ncc, 4), "edge_ncc": round(self.edge_ncc, 4), "dice": round(self.dice, 4),
                "coverage": round(self.coverage, 4), "det": round(self.det, 4),
                "likely_failed": self.likely_failed, "reason": self.reason, "seconds": round(self.seconds, 2),
                "stop": self.stop}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the transform (``sitk.WriteTransform``; ``.tfm`` or ``.h5``) and its quality
        figures beside it (``<path>.json``, with :attr:`grid_spacing_mm`). Returns the transform's path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteTransform(self.transform, str(path))
        Path(str(path) + ".json").write_text(json.dumps({**self.quality(), "grid_spacing_mm": self.grid_spacing_mm},
                                                        indent=2))
        return path


def load_registration(path: str | os.PathLike) -> RegistrationResult:
    """Read a result written by :meth:`RegistrationResult.save`."""
    path = Path(path)
    tx = sitk.ReadTransform(str(path))
    q = json.loads(Path(str(path) + ".json").read_text())
    if q["kind"] == "affine":
        if tx.GetTransformEnum() == sitk.sitkComposite:  # ITK may wrap a single transform
            tx = sitk.CompositeTransform(tx).GetNthTransform(0)
        tx = sitk.AffineTransform(tx)
    else:
        tx = sitk.CompositeTransform(tx)
        if tx.GetNumberOfTransforms() != 2:
            raise ValueError(f"{path}: expected an affine and a B-spline transform, found {tx.GetNumberOfTransforms()}")
    return RegistrationResult(transform=tx, kind=q["kind"], metric=q["metric_value"], ncc=q["ncc"], dice=q["dice"],
                              det=q["det"], likely_failed=q["likely_failed"], reason=q["reason"],
                              seconds=q["seconds"], stop=q.get("stop", ""), grid_spacing_mm=q.get("grid_spacing_mm"),
                              edge_ncc=q.get("edge_ncc", float("nan")), coverage=q.get("coverage", float("nan")))


# ---------------------------------------------------------------------------------- registration

def _method(sampling: float, seed: int) -> sitk.ImageRegistrationMethod:
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(sampling, seed)
    r.SetInterpolator(sitk.sitkLinear)
    return r


def register_to_mni(image: Image, *, bspline: bool | None = None, seed: int = 1,
                    settings: Settings | None = None) -> RegistrationResult:
    """Register ``image`` (any geometry, LPS) to the MNI152 template (method in the module docstring).

    Args:
        image: a 3-D brain image; its intensities need not be normalised.
        bspline: add the deformable stage (default ``Settings.registration_bspline``).
        seed: seed of the metric's random sampling (same seed, same result).
        settings: grid, sampling, iterations, B-spline stage and quality gates (default ``Settings()``).

    Returns:
        a :class:`RegistrationResult`; check ``likely_failed`` before trusting anything mapped with it.
    """
    cfg = settings or Settings()
    bspline = cfg.registration_bspline if bspline is None else bspline
    t0 = time.perf_counter()
    spacing = float(cfg.registration_spacing_mm)
    fixed, brain = mni_grid(spacing)
    fixed_mask = sitk.BinaryDilate(brain, [int(np.ceil(5.0 / spacing))] * 3)
    moving = _moving(image, spacing)

    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    r = _method(cfg.registration_sampling_fraction, seed)
    r.SetMetricFixedMask(fixed_mask)
    # Regular-step gradient descent: plain gradient descent with an estimated learning rate stopped
    # on its convergence window after 10-20 iterations, 5-7 mm from the optimum; with relaxation 0.5
    # the step shrank too fast on the coarse levels of some studies (NCC 0.72-0.82 instead of 0.93).
    r.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3,
                                               numberOfIterations=cfg.registration_iterations,
                                               relaxationFactor=0.7, gradientMagnitudeTolerance=1e-8)
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetShrinkFactorsPerLevel([4, 2, 1])
    r.SetSmoothingSigmasPerLevel([2, 1, 0])
    r.SetInitialTransform(init, inPlace=False)
    failure = None
    try:
        out = r.Execute(fixed, moving)
        metric, stop = float(r.GetMetricValue()), r.GetOptimizerStopConditionDescription()
        if out.GetTransformEnum() == sitk.sitkComposite:
            out = sitk.CompositeTransform(out).GetNthTransform(0)
        affine = sitk.AffineTransform(out)
    except RuntimeError as e:  # e.g. all samples map outside the moving image
        affine, metric, stop = sitk.AffineTransform(sitk.AffineTransform(init)), float("nan"), ""
        failure = f"affine optimisation failed: {str(e).strip().splitlines()[-1][:200]}"
    transform: sitk.Transform = affine
    kind = "affine"

    if bspline and failure is None:
        mesh = [max(1, int(round(sz * sp / cfg.registration_bspline_mesh_mm)))
                for sz, sp in zip(fixed.GetSize(), fixed.GetSpacing(), strict=True)]
        bs = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
        rb = _method(cfg.registration_sampling_fraction, seed)
        rb.SetMetricFixedMask(fixed_mask)
        # 20 iterations per level: 50 took twice as long for the same NCC (0.952 vs 0.953 on a study).
        rb.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=20,
                                maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=60)
        rb.SetShrinkFactorsPerLevel([2, 1])
        rb.SetSmoothingSigmasPerLevel([1, 0])
        rb.SetMovingInitialTransform(affine)
        rb.SetInitialTransform(bs, inPlace=True)
        try:
            rb.Execute(fixed, moving)
            metric, stop = float(rb.GetMetricValue()), rb.GetOptimizerStopConditionDescription()
            transform = sitk.CompositeTransform([affine, bs])
            kind = "affine+bspline"
        except RuntimeError as e:
            failure = f"B-spline optimisation failed: {str(e).strip().splitlines()[-1][:200]}"

    q = _assess(moving, transform, _det(affine), fixed, brain, failure, settings=cfg)
    return RegistrationResult(transform=transform, kind=kind, metric=metric, seconds=time.perf_counter() - t0,
                              stop=stop, grid_spacing_mm=spacing, **q)


def _det(transform: sitk.Transform) -> float:
    """Determinant of the linear part of ``transform`` (of its first transform when composite)."""
    t = transform.Downcast() if hasattr(transform, "Downcast") else transform
    if isinstance(t, sitk.CompositeTransform):
        t = t.GetNthTransform(0).Downcast()
    if not hasattr(t, "GetMatrix"):
        return 1.0  # a purely deformable transform has no single volume change
    return float(np.linalg.det(np.asarray(t.GetMatrix()).reshape(3, 3)))


def _assess(moving: sitk.Image, transform: sitk.Transform, det: float, fixed: sitk.Image, brain: sitk.Image,
            failure: str | None = None, *, settings: Settings | None = None) -> dict[str, Any]:
    """Quality figures and the failure flag (gates in the module docstring; thresholds from ``settings``)."""
    cfg = settings or Settings()
    q = _quality(moving, transform, fixed, brain)
    reasons = [failure] if failure else []
    edge = q["edge_ncc"]
    if not np.isfinite(edge) or edge < cfg.registration_min_edge_ncc:
        reasons.append(f"edge NCC with the template {edge:.2f} < {cfg.registration_min_edge_ncc} "
                       "(its structure does not line up)")
    if q["head"]:
        # A head with skull and scalp: its foreground is rightly larger than the brain, so only
        # ask that the brain lie inside it.
        if not np.isfinite(q["coverage"]) or q["coverage"] < cfg.registration_min_coverage:
            reasons.append(f"template brain {q['coverage']:.0%} inside the input "
                           f"< {cfg.registration_min_coverage:.0%}")
    elif not np.isfinite(q["dice"]) or q["dice"] < cfg.registration_min_dice:
        reasons.append(f"brain-mask Dice {q['dice']:.2f} < {cfg.registration_min_dice}")
    lo, hi = cfg.registration_det_range
    if not lo <= det <= hi:
        reasons.append(f"affine volume change {det:.2f} outside {lo}..{hi}")
    return {"ncc": q["ncc"], "edge_ncc": edge, "dice": q["dice"], "coverage": q["coverage"], "det": det,
            "likely_failed": bool(reasons), "reason": "; ".join(reasons) or None}


def check_registration(image: Image, transform: sitk.Transform, *,
                       settings: Settings | None = None) -> dict[str, Any]:
    """Quality figures of any MNI -> input ``transform`` for ``image``: ``ncc``, ``dice``, ``det``,
    ``likely_failed`` and ``reason``, by the gates :func:`register_to_mni` applies (for checking a
    transform from elsewhere, or the gates themselves); grid and gates from ``settings`` (default
    ``Settings()``)."""
    cfg = settings or Settings()
    spacing = float(cfg.registration_spacing_mm)
    fixed, brain = mni_grid(spacing)
    return _assess(_moving(image, spacing), transform, _det(transform), fixed, brain, settings=cfg)


def _quality(moving: sitk.Image, transform: sitk.Transform, fixed: sitk.Image, brain: sitk.Image
             ) -> dict[str, Any]:
    """Figures of the moving image warped onto the fixed grid: ``ncc`` (intensities, in the brain),
    ``edge_ncc`` (gradient magnitudes, in the brain grown by 5 mm), ``dice`` and ``coverage`` of the
    input's foreground against the template brain, and ``head`` (the foreground is over 1.25 times
    the brain's volume: skull and scalp are on)."""
    w = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    warped = sitk.GetArrayFromImage(w)
    b = sitk.GetArrayViewFromImage(brain) > 0
    f = sitk.GetArrayViewFromImage(fixed)
    ncc = _ncc(warped[b], f[b])
    # Intensity NCC is negative for T2 and weak for FLAIR even when aligned; edges line up in any
    # contrast, and a 10 mm shift or a 15 degree turn drops them below 0.45 (docs/atlas.md).
    sigma = float(max(fixed.GetSpacing()))
    grown, gf = _template_edges(fixed, brain, sigma)
    gw = sitk.GetArrayFromImage(sitk.GradientMagnitudeRecursiveGaussian(w, sigma))
    edge = _ncc(gw[grown], gf[grown])
    # Foreground of the input: Otsu on its own voxels (the threshold does not depend on the warp).
    m = sitk.GetArrayViewFromImage(moving)
    fg_thr = _otsu(m[m > 0]) if (m > 0).any() else np.inf
    fg = warped > fg_thr
    from scipy import ndimage

    fg = ndimage.binary_fill_holes(fg)
    inter = float(np.logical_and(fg, b).sum())
    dice = 2 * inter / float(fg.sum() + b.sum()) if fg.any() or b.any() else float("nan")
    coverage = inter / float(b.sum()) if b.any() else float("nan")
    return {"ncc": ncc, "edge_ncc": edge, "dice": dice, "coverage": coverage,
            "head": bool(fg.sum() > 1.25 * b.sum())}


# The template side of the edge gate is the same for every study registered to one grid: keep it.
# Keyed by the objects' ids, holding the objects so that an id is not reused while its entry lives.
_EDGES: dict[tuple[int, int, float], tuple[sitk.Image, sitk.Image, np.ndarray, np.ndarray]] = {}


def _template_edges(fixed: sitk.Image, brain: sitk.Image, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """``(brain grown by 5 mm (bool), gradient magnitude of the template)`` on the template grid."""
    key = (id(fixed), id(brain), sigma)
    hit = _EDGES.get(key)
    if hit is not None and hit[0] is fixed and hit[1] is brain:
        return hit[2], hit[3]
    grown = sitk.GetArrayFromImage(sitk.BinaryDilate(brain, [int(np.ceil(5.0 / sigma))] * 3)) > 0
    gf = sitk.GetArrayFromImage(sitk.GradientMagnitudeRecursiveGaussian(fixed, sigma))
    if len(_EDGES) >= 8:
        _EDGES.clear()
    _EDGES[key] = (fixed, brain, grown, gf)
    return grown, gf


def _ncc(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    sx, sy = x.std(), y.std()
    return float(((x - x.mean()) * (y - y.mean())).mean() / (sx * sy)) if sx > 0 and sy > 0 else float("nan")


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of ``values`` (1-D)."""
    hist, edges = np.histogram(values, bins=bins)
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0))
    return float(centres[int(np.nanargmax(between[:-1]))]) if len(between) > 1 else float(values.mean())


# --------------------------------------------------------------------------------------- warping

def warp_to_mni(image: Image, registration: RegistrationResult, reference: sitk.Image | None = None,
                interpolator: str = "linear", default: float = 0.0, *,
                settings: Settings | None = None) -> np.ndarray:
    """``image`` (input grid) resampled into MNI space on ``reference`` (default: the 1 mm
    template grid); float32 ``[k, j, i]``. Use ``"nearest"`` for label maps. ``settings``: see
    :meth:`RegistrationResult.resampling_transform`."""
    ref = reference if reference is not None else load_template()
    tx = registration.resampling_transform(settings=settings)
    out = sitk.Resample(image.to_sitk(), ref, tx, _INTERP[interpolator],
                        float(default), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def warp_from_mni(mni_image: sitk.Image, registration: RegistrationResult, target: Image,
                  interpolator: str = "linear", default: float = 0.0, *,
                  settings: Settings | None = None) -> np.ndarray:
    """An MNI-space image resampled onto ``target``'s grid (float32 ``[k, j, i]``). ``settings``: see
    :meth:`RegistrationResult.inverse`."""
    out = sitk.Resample(mni_image, target.reference(), registration.inverse(settings=settings), _INTERP[interpolator],
                        float(default), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


class RegistrationCache:
    """Registrations to MNI152 by image content, each computed once (least recently used dropped).

    The server registers an image the first time a request asks for its anatomy and reuses the
    result for every method and request on that image. The key is the SHA-256 of the voxels and the
    geometry plus the registration settings, so a changed image or setting registers anew.
    """

    def __init__(self, keep: int = 16):
        import threading
        from collections import OrderedDict

        self.keep = max(1, int(keep))
        self._items: OrderedDict[str, RegistrationResult] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(image: Image, settings: Settings) -> str:
        import hashlib

        h = hashlib.sha256(np.ascontiguousarray(image.array).tobytes())
        h.update(repr((image.size, image.spacing, image.origin, image.direction, image.array.dtype.str,
                       settings.registration_spacing_mm, settings.registration_sampling_fraction,
                       settings.registration_iterations, settings.registration_bspline,
                       settings.registration_bspline_mesh_mm)).encode())
        return h.hexdigest()

    def get(self, image: Image, settings: Settings | None = None) -> RegistrationResult:
        """The registration of ``image`` (computed now on a miss)."""
        cfg = settings or Settings()
        key = self.key(image, cfg)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        result = register_to_mni(image, settings=cfg)
        with self._lock:
            self.misses += 1
            self._items[key] = result
            while len(self._items) > self.keep:
                self._items.popitem(last=False)
        return result

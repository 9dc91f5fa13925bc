"""Out-of-distribution guard: input the model was not made for gets a flag, with reasons.

Two kinds of evidence, combined (docs/ood.md)::

    guard = OODGuard.for_model(adapter)          # fitted statistics found beside the model's weights
    result = guard.assess(adapter, inputs)       # inputs = adapter.prepare(image)
    result.flagged, result.reasons               # True, ["noise-like: neighbouring voxels uncorrelated ..."]

(a) **Input checks** on the image itself, model-agnostic, each naming what looks wrong: a constant
    or near-constant volume, CT intensities, a 2-D image stacked into 3-D (identical slices, or slices
    40 mm apart as alike as neighbours), noise (no spatial correlation), a piecewise-constant phantom
    or mask, and a foreground that is not head-sized or head-shaped (volume, extent, thickness,
    aspect, filling the whole field of view). They are set wide enough that every head passes,
    with or without skull, any contrast, thick slices, oblique grids.
(b) **Feature check**: the Mahalanobis distance of the model's pooled encoder features (mean and
    standard deviation over space of the ``down2`` and ``encoder_body`` activations, ``log1p``) to
    statistics fitted on in-distribution validation studies, with a Ledoit-Wolf shrunk covariance;
    the threshold is the 99th percentile of the leave-one-out distances of those studies. The fitted
    statistics live beside the weights (``<model>.ood.json``, written by ``xai ood fit``) and are tied
    to the weights' SHA-256: stale or missing statistics mean that only the input checks run.

All sizes are in millimetres and millilitres; arrays are ``[k, j, i]`` (see :mod:`xai_core.io`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from pydantic import BaseModel, Field
from scipy import ndimage

from .io import Image

__all__ = ["OODCheck", "OODResult", "OODStats", "OODGuard", "FeatureCapture", "input_checks", "pooled_features",
           "fit_stats", "fit_from_folder", "stats_path", "STATS_SUFFIX"]

STATS_SUFFIX = ".ood.json"
FORMAT_VERSION = 1

# Input-check limits, chosen on in-distribution studies, skull-on heads and heads from other templates
# (none may trip them) against the OOD corpus of bench/ood.py; docs/ood.md gives the measured ranges.
LIMITS: dict[str, float] = {
    "ct_fraction": 0.05,  # at most this fraction of voxels below -500 (air in Hounsfield units)
    "identical_slices": 0.5,  # at most this fraction of adjacent slices bit-identical
    "slice_similarity_40mm": 0.6,  # at most: mean r of slices 40 mm apart (heads <= 0.25, repeated slices >= 0.7)
    "neighbour_correlation": 0.35,  # at least: Pearson r of neighbouring foreground voxels; noise ~0
    "flat_fraction": 0.5,  # at most this fraction of neighbouring foreground voxels equal (phantoms, masks)
    "min_volume_ml": 300.0,  # head-like foreground (a brain alone is about 1100 to 1600 ml)
    "max_volume_ml": 9000.0,
    "max_extent_mm": 290.0,  # longest axis of the foreground (a head with neck is about 250 mm)
    "min_thickness_mm": 40.0,  # shortest axis of the foreground
    "max_aspect": 3.5,  # longest / shortest axis
    "max_filled_sides": 4.0,  # sides of the field of view more than half covered by foreground
}
SURVEY_MM = 4.0  # isotropic grid for the foreground measurements
CROP = 160  # texture checks read at most this many voxels per axis (the centre of the volume)
FAR_MM = 40.0  # slice distance of the stacked-2-D similarity test


class OODCheck(BaseModel):
    """One check: its measured value, its limit, and the reason line when it failed."""

    name: str
    value: float | None = Field(description="measured value (unit in the name or docs/ood.md); None: not measured")
    limit: float | None = None
    passed: bool = True
    reason: str | None = Field(None, description="one line naming what looks wrong (failed checks only)")


class OODResult(BaseModel):
    """The guard's verdict on one input.

    ``flagged`` is True when any input check failed or the feature distance ``score`` exceeds
    ``threshold``. ``score``/``threshold`` are None when no fitted statistics were available
    (``feature_check`` False, and ``notes`` says why).
    """

    flagged: bool
    score: float | None = Field(None, description="Mahalanobis distance of the pooled encoder features (sqrt)")
    threshold: float | None = Field(None, description="99th percentile of leave-one-out validation distances")
    reasons: list[str] = Field(default_factory=list, description="one line per failed check")
    checks: list[OODCheck] = Field(default_factory=list)
    input_flagged: bool = Field(False, description="an input check failed: not a brain MR volume as such")
    feature_flagged: bool = Field(False, description="the model's features are unlike its validation studies")
    feature_check: bool = False
    notes: list[str] = Field(default_factory=list)
    seconds: float = 0.0

    def check(self, name: str) -> OODCheck:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check {name!r}; checks: {[c.name for c in self.checks]}")


# --------------------------------------------------------------------------------- input checks

def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _check(name: str, value: float | None, limit: float, ok: bool, reason: str) -> OODCheck:
    return OODCheck(name=name, value=None if value is None else float(value), limit=float(limit), passed=bool(ok),
                    reason=None if ok else reason)


def _survey(image: Image) -> tuple[np.ndarray, float]:
    """The volume on an isotropic ``SURVEY_MM`` grid in its own index axes (rotation does not change
    lengths, so the grid's direction is dropped) by area averaging; returns the array and voxel mm."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(image.array, dtype=np.float32))
    img.SetSpacing([float(s) for s in image.spacing])
    extent = np.asarray(image.size, float) * np.asarray(image.spacing, float)
    size = [max(1, int(round(e / SURVEY_MM))) for e in extent]
    # Block averages first (cheap), so that downsampling averages instead of picking samples.
    shrink = [max(1, int(SURVEY_MM // s)) for s in image.spacing]
    if max(shrink) > 1:
        img = sitk.BinShrink(img, shrink)
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([SURVEY_MM] * 3)
    ref.SetOrigin([(SURVEY_MM - s) / 2 for s in image.spacing])
    return sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0)), SURVEY_MM


def _foreground(survey: np.ndarray, threshold: float) -> np.ndarray:
    """The largest connected component above ``threshold``, holes filled."""
    fg = survey > threshold
    lab, n = ndimage.label(fg)
    if n == 0:
        return fg
    sizes = np.bincount(lab.ravel())[1:]
    return ndimage.binary_fill_holes(lab == 1 + int(sizes.argmax()))


def _principal_extents(mask: np.ndarray, mm: float) -> np.ndarray:
    """Lengths (mm, longest first) of ``mask`` along its principal axes: the 1st to 99th percentile of
    the voxel positions projected on each axis, plus one voxel."""
    pts = np.argwhere(mask).astype(np.float64) * mm
    if len(pts) < 4:
        return np.zeros(3)
    pts -= pts.mean(0)
    _, vecs = np.linalg.eigh(np.cov(pts.T))
    proj = pts @ vecs
    ext = np.percentile(proj, 99, axis=0) - np.percentile(proj, 1, axis=0) + mm
    return np.sort(ext)[::-1]


def _filled_sides(mask: np.ndarray) -> int:
    """How many of the six faces of the field of view are more than half covered by foreground."""
    n = 0
    for ax in range(3):
        for end in (0, -1):
            n += int(np.take(mask, end, axis=ax).mean() > 0.5)
    return n


def _centre_crop(a: np.ndarray, n: int = CROP) -> np.ndarray:
    sl = tuple(slice(max(0, (s - n) // 2), max(0, (s - n) // 2) + min(s, n)) for s in a.shape)
    return a[sl]


def _pair_stats(a: np.ndarray, fg: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Neighbouring voxel pairs along ``axis`` whose both ends are foreground: (first, second)."""
    lo = a[(slice(None),) * axis + (slice(None, -1),)]
    hi = a[(slice(None),) * axis + (slice(1, None),)]
    both = fg[(slice(None),) * axis + (slice(None, -1),)] & fg[(slice(None),) * axis + (slice(1, None),)]
    return lo[both], hi[both]


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 16:
        return float("nan")
    x = x - x.mean()
    y = y - y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / den if den > 0 else 1.0


def _slice_similarity(a: np.ndarray, fg: np.ndarray, axis: int, lag: int) -> float:
    """Mean Pearson r between slices ``lag`` apart along ``axis``, over the union of their foregrounds
    (slices with under 5 % foreground are skipped); NaN when no pair qualifies."""
    # Every other voxel in-plane: a slice correlation needs no more, and it quarters the cost.
    a = np.moveaxis(a, axis, 0)[:, ::2, ::2]
    fg = np.moveaxis(fg, axis, 0)[:, ::2, ::2]
    a = a.reshape(len(a), -1).astype(np.float64)
    fg = fg.reshape(len(fg), -1)
    keep = fg.mean(1) >= 0.05
    pair = keep[:-lag] & keep[lag:]
    if not pair.any():
        return float("nan")
    m = (fg[:-lag] | fg[lag:])[pair]
    x, y = a[:-lag][pair] * m, a[lag:][pair] * m
    n = m.sum(1)
    mx, my = x.sum(1) / n, y.sum(1) / n
    cov = (x * y).sum(1) / n - mx * my
    vx, vy = (x * x).sum(1) / n - mx ** 2, (y * y).sum(1) / n - my ** 2
    ok = (vx > 0) & (vy > 0) & (n >= 16)
    if not ok.any():
        return float("nan")
    return float(np.mean(cov[ok] / np.sqrt(vx[ok] * vy[ok])))


def input_checks(image: Image) -> list[OODCheck]:
    """Model-agnostic checks of ``image`` (any 3-D geometry); each failed one names the problem.

    Cost: about 0.1 to 0.4 s for a 2.6 M-voxel study on one CPU core (large inputs are read through
    a 4 mm survey grid and a central crop of at most 160 voxels per axis).
    """
    a = np.asarray(image.array, dtype=np.float32)
    checks: list[OODCheck] = []
    if a.ndim != 3 or min(a.shape) < 2:
        checks.append(_check("dimensions", float(a.ndim), 3, False,
                             f"not a volume: array of shape {tuple(a.shape)}"))
        return checks
    flat = a.ravel()
    sample = flat[:: max(1, flat.size // 500_000)]
    lo_v, hi_v = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    vmin, vmax = float(a.min()), float(a.max())
    if vmax - vmin <= 1e-6 * max(1.0, abs(vmax)):
        checks.append(_check("constant", 0.0, 0.0, False, f"constant volume: every voxel is {_fmt(vmin)}"))
        return checks
    if hi_v - lo_v <= 1e-6 * max(1.0, abs(hi_v)):
        frac = float(np.mean(sample == np.median(sample)))
        checks.append(_check("constant", 0.0, 0.0, False,
                             f"nearly constant volume: {frac:.1%} of voxels equal {_fmt(float(np.median(sample)))}"))
        return checks
    checks.append(_check("constant", hi_v - lo_v, 0.0, True, ""))

    ct = float(np.mean(sample < -500.0))
    checks.append(_check("ct_fraction", ct, LIMITS["ct_fraction"], not (ct > LIMITS["ct_fraction"] and vmin <= -900),
                         f"intensities as in CT (Hounsfield units): {ct:.0%} of voxels below -500, minimum "
                         f"{_fmt(vmin)}; the model reads MR"))

    # Foreground: above 15 % of the robust range, as MR background is near the low end.
    survey, mm = _survey(image)
    s_lo, s_hi = (float(v) for v in np.percentile(survey, [1, 99.5]))
    thr = s_lo + 0.15 * (s_hi - s_lo)
    fg = _foreground(survey, thr)
    vol_ml = float(fg.sum()) * mm ** 3 / 1000.0
    ext = _principal_extents(fg, mm)
    checks.append(_check("min_volume_ml", vol_ml, LIMITS["min_volume_ml"], vol_ml >= LIMITS["min_volume_ml"],
                         f"too little head-like foreground: {vol_ml:.0f} ml (a brain alone is about 1100 ml)"))
    checks.append(_check("max_volume_ml", vol_ml, LIMITS["max_volume_ml"], vol_ml <= LIMITS["max_volume_ml"],
                         f"foreground of {vol_ml / 1000:.1f} l: more than a head"))
    checks.append(_check("max_extent_mm", ext[0], LIMITS["max_extent_mm"], ext[0] <= LIMITS["max_extent_mm"],
                         f"foreground {ext[0]:.0f} mm across: larger than a head (at most "
                         f"{LIMITS['max_extent_mm']:.0f} mm)"))
    checks.append(_check("min_thickness_mm", ext[2], LIMITS["min_thickness_mm"],
                         ext[2] >= LIMITS["min_thickness_mm"],
                         f"foreground only {ext[2]:.0f} mm thick: a slab, not a head"))
    aspect = float(ext[0] / max(ext[2], 1e-6))
    checks.append(_check("max_aspect", aspect, LIMITS["max_aspect"], aspect <= LIMITS["max_aspect"],
                         f"extreme aspect of the foreground: {ext[0]:.0f} x {ext[1]:.0f} x {ext[2]:.0f} mm"))
    sides = _filled_sides(fg)
    checks.append(_check("filled_sides", float(sides), LIMITS["max_filled_sides"],
                         sides <= LIMITS["max_filled_sides"],
                         f"foreground fills the field of view: no background on {sides} of 6 sides"))

    # Texture, at the stored resolution, on a central crop (raw foreground at the same threshold).
    c = _centre_crop(a)
    cfg = c > thr
    if cfg.sum() < 64:  # the crop missed the object: use everything above the background
        cfg = c > lo_v
    eq_tol = 1e-4 * (hi_v - lo_v)
    n_eq = n_all = 0
    rs = []
    for ax in range(3):
        if c.shape[ax] < 2:
            continue
        x, y = _pair_stats(c, cfg, ax)
        n_eq += int(np.count_nonzero(np.abs(x - y) <= eq_tol))
        n_all += x.size
        rs.append(_corr(x, y))
    flat_frac = n_eq / n_all if n_all else 1.0
    checks.append(_check("flat_fraction", flat_frac, LIMITS["flat_fraction"], flat_frac <= LIMITS["flat_fraction"],
                         f"piecewise-constant foreground (a phantom or a mask): {flat_frac:.0%} of neighbouring "
                         f"voxels are equal"))
    # The best-correlated axis: a thick-slice axis may be less smooth, but noise has none.
    rs = [r for r in rs if not math.isnan(r)]
    r_nb = max(rs) if rs else float("nan")
    checks.append(_check("neighbour_correlation", r_nb, LIMITS["neighbour_correlation"],
                         not (r_nb < LIMITS["neighbour_correlation"]),
                         f"noise-like: neighbouring voxels are uncorrelated (r = {r_nb:.2f}; an MR image has "
                         f"r > 0.8)"))

    # Stacked 2-D: identical adjacent slices along any axis, or slices FAR_MM apart about as alike as
    # neighbours (a repeated slice with jitter or noise). Uses the whole array along the tested axis.
    spacing_kji = image.spacing[::-1]
    worst_id, worst_axis, n_sl = 0.0, 0, 0
    for ax in range(3):
        n = a.shape[ax]
        if n < 3:
            continue
        # Slices with some foreground only: empty slices around an object are identical too.
        cm, fm = np.moveaxis(c, ax, 0), np.moveaxis(cfg, ax, 0)
        occupied = fm.reshape(len(fm), -1).mean(1) >= 0.05
        pairs = occupied[:-1] & occupied[1:]
        if not pairs.any():
            continue
        diffs = np.abs(np.diff(cm, axis=0)).reshape(len(cm) - 1, -1).max(1)[pairs]
        ident = float(np.mean(diffs <= 1e-6 * max(1.0, abs(hi_v))))
        if ident > worst_id:
            worst_id, worst_axis, n_sl = ident, ax, n
    all_same = worst_id >= 1.0
    checks.append(_check("identical_slices", worst_id, LIMITS["identical_slices"],
                         worst_id <= LIMITS["identical_slices"],
                         f"a 2-D image stacked into 3-D: all {n_sl} slices are identical" if all_same else
                         f"a 2-D image stacked into 3-D: {worst_id:.0%} of adjacent slices along array axis "
                         f"{'kji'[worst_axis]} are identical"))
    far_max, far_txt = None, ""
    for ax in range(3):
        lag = int(round(FAR_MM / spacing_kji[ax]))
        if c.shape[ax] < 2 * lag + 1 or lag < 2:
            continue
        rf = _slice_similarity(c, cfg, ax, lag)
        if math.isnan(rf) or (far_max is not None and rf <= far_max):
            continue
        far_max = rf
        r1 = _slice_similarity(c, cfg, ax, 1)
        far_txt = (f"a 2-D image stacked into 3-D: slices {FAR_MM:.0f} mm apart along array axis {'kji'[ax]} are "
                   f"as alike as neighbours (r = {rf:.2f} vs {r1:.2f}; a head has r < 0.3)")
    checks.append(_check("slice_similarity_40mm", far_max, LIMITS["slice_similarity_40mm"],
                         far_max is None or far_max <= LIMITS["slice_similarity_40mm"], far_txt))
    return checks


# ------------------------------------------------------------------------------ feature check

DEFAULT_LAYERS = ("down2", "encoder_body")


class FeatureCapture:
    """Context manager that records the pooled features of the next forward through ``adapter.net``,
    so a caller that runs the model anyway (``adapter.predict``) gives the guard its features without a
    second forward::

        with FeatureCapture(adapter) as cap:
            pred = adapter.predict(inputs)
        result = guard.assess(adapter, inputs, features=cap.features)

    ``features``: float64 ``(sum over layers of 2 C,)``: ``log1p`` of the spatial mean and standard
    deviation of each layer's activations (192 for ``BrainLesionNet``: 2 x 32 + 2 x 64).
    """

    def __init__(self, adapter: Any, layers: Sequence[str] = DEFAULT_LAYERS):
        self.net = adapter.net
        self.layers = list(layers)
        self._acts: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> FeatureCapture:
        self._handles = [self.net.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: self._acts.__setitem__(name, out.detach())) for name in self.layers]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def features(self) -> np.ndarray:
        missing = [n for n in self.layers if n not in self._acts]
        if missing:
            raise RuntimeError(f"no forward through {missing} was captured")
        parts = []
        for name in self.layers:
            h = self._acts[name].float()
            dims = tuple(range(2, h.ndim))
            parts += [h.mean(dims)[0], h.std(dims)[0]]
        f = torch.cat(parts).cpu().double().numpy()
        return np.log1p(np.maximum(f, 0.0))


def pooled_features(adapter: Any, inputs: Any, layers: Sequence[str] = DEFAULT_LAYERS) -> np.ndarray:
    """The :class:`FeatureCapture` features of one prepared input, from one class-path forward
    (``adapter.forward_func()``, no decoder); the network is not modified."""
    with FeatureCapture(adapter, layers) as cap, torch.no_grad():
        adapter.forward_func()(*inputs.inputs, *inputs.additional_forward_args)
    return cap.features


class OODStats(BaseModel):
    """Fitted in-distribution feature statistics for one model's weights (stored as JSON).

    ``features`` (N, D) are the validation studies' pooled features; the covariance is
    ``(1 - shrinkage) * S + shrinkage * mean(diag S) * I`` (Ledoit-Wolf), its inverse computed on load.
    """

    format_version: int = FORMAT_VERSION
    model: str
    model_version: str
    weights_sha256: str
    layers: list[str]
    features: list[list[float]]
    shrinkage: float
    threshold: float
    percentile: float = 99.0
    loo_distances: list[float] = Field(default_factory=list)
    data: str = ""
    command: str = ""
    study_ids: list[str] = Field(default_factory=list)

    def model_post_init(self, _ctx: Any) -> None:
        x = np.asarray(self.features, dtype=np.float64)
        self._mean, self._precision = _shrunk_gaussian(x, self.shrinkage)

    def distance(self, f: np.ndarray) -> float:
        d = np.asarray(f, dtype=np.float64) - self._mean
        return float(math.sqrt(max(float(d @ self._precision @ d), 0.0)))


def _shrunk_gaussian(x: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    s = np.cov(x.T, bias=True)
    mu = float(np.trace(s)) / s.shape[0]
    cov = (1 - shrinkage) * s + shrinkage * mu * np.eye(s.shape[0])
    return mean, np.linalg.inv(cov)


def fit_stats(features: np.ndarray, *, model: str, model_version: str, weights_sha256: str,
              layers: Sequence[str] = DEFAULT_LAYERS, percentile: float = 99.0, data: str = "", command: str = "",
              study_ids: Sequence[str] = ()) -> OODStats:
    """Fit the feature statistics on ``features`` (N, D) of in-distribution studies.

    The threshold is the ``percentile`` of the leave-one-out distances (each study against a Gaussian
    fitted without it): in-sample distances are biased low, and a threshold on them would raise
    false alarms on new studies.
    """
    from sklearn.covariance import ledoit_wolf

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 8:
        raise ValueError(f"need at least 8 studies to fit OOD statistics, got {len(x)}")
    shrink = float(ledoit_wolf(x)[1])
    loo = []
    for i in range(len(x)):
        rest = np.delete(x, i, 0)
        m, p = _shrunk_gaussian(rest, float(ledoit_wolf(rest)[1]))
        d = x[i] - m
        loo.append(math.sqrt(max(float(d @ p @ d), 0.0)))
    return OODStats(model=model, model_version=model_version, weights_sha256=weights_sha256, layers=list(layers),
                    features=np.round(x, 6).tolist(), shrinkage=shrink,
                    threshold=float(np.percentile(loo, percentile)), percentile=percentile,
                    loo_distances=[round(v, 4) for v in loo], data=data, command=command, study_ids=list(study_ids))


def stats_path(weights_dir: str | Path, model: str) -> Path:
    """Where the statistics of ``model`` live: ``<weights_dir>/<model>.ood.json``."""
    return Path(weights_dir) / f"{model}{STATS_SUFFIX}"


# --------------------------------------------------------------------------------------- guard

class OODGuard:
    """Input checks plus, when ``stats`` are given, the feature-space check.

    ``OODGuard.for_model(adapter)`` finds the statistics beside the adapter's weights; ``assess``
    costs the input checks (0.1 to 0.4 s) plus one encoder forward (about 1 s on a busy CPU core,
    milliseconds on a GPU).
    """

    def __init__(self, stats: OODStats | None = None, note: str | None = None):
        self.stats = stats
        self.note = note

    @classmethod
    def for_model(cls, adapter: Any, weights_dirs: Sequence[str | Path] | None = None,
                  settings: Any = None) -> OODGuard:
        """The guard for ``adapter``: statistics ``<name>.ood.json`` from the weights folders (user
        folder first, then the shipped one) whose ``weights_sha256`` matches the adapter's card;
        otherwise a guard with the input checks only, which says why in its result's ``notes``."""
        card = adapter.card
        if weights_dirs is None:
            from .settings import Settings

            s = settings or Settings()
            weights_dirs = [s.user_weights_dir, s.weights_dir]
        stale = []
        for d in weights_dirs:
            p = stats_path(d, card.name)
            if not p.is_file():
                continue
            stats = OODStats.model_validate(json.loads(p.read_text()))
            if card.weights_sha256 and stats.weights_sha256 != card.weights_sha256:
                stale.append(str(p))
                continue
            return cls(stats)
        why = (f"OOD statistics {', '.join(stale)} were fitted on other weights" if stale else
               f"no OOD statistics for {card.name} ({card.name}{STATS_SUFFIX})")
        return cls(None, note=f"{why}: input checks only; rebuild with `xai ood fit --model {card.name} "
                              f"--data data/val`")

    def assess(self, adapter: Any, inputs: Any, features: np.ndarray | None = None) -> OODResult:
        """The verdict on one prepared input (``inputs = adapter.prepare(image)``).

        ``features``: the pooled features when the caller already has them (else one forward runs).
        """
        t0 = time.perf_counter()
        checks = input_checks(inputs.image)
        notes = [self.note] if self.note else []
        score = threshold = None
        feature_check = False
        if self.stats is not None:
            f = pooled_features(adapter, inputs, self.stats.layers) if features is None else features
            score, threshold = self.stats.distance(f), self.stats.threshold
            feature_check = True
            checks.append(_check(
                "feature_distance", score, threshold, score <= threshold,
                f"the model's features are unlike its in-distribution studies: distance {score:.1f} > "
                f"{threshold:.1f} ({self.stats.percentile:g}th percentile of {len(self.stats.features)} "
                f"validation studies); the model was not made for input like this"))
        reasons = [c.reason for c in checks if not c.passed and c.reason]
        failed = {c.name for c in checks if not c.passed}
        return OODResult(flagged=bool(failed), input_flagged=bool(failed - {"feature_distance"}),
                         feature_flagged="feature_distance" in failed, score=score, threshold=threshold,
                         reasons=reasons, checks=checks,
                         feature_check=feature_check, notes=notes, seconds=round(time.perf_counter() - t0, 4))

    def assess_image(self, adapter: Any, image: Image) -> OODResult:
        """:meth:`assess` on ``adapter.prepare(image)``."""
        return self.assess(adapter, adapter.prepare(image))


def fit_from_folder(adapter: Any, data: str | Path, out: str | Path | None = None, limit: int | None = None,
                    command: str = "", progress: Callable[[int, int], None] | None = None) -> tuple[Path, OODStats]:
    """Fit the statistics of ``adapter`` on the studies of ``data`` (a generated folder with
    ``manifest.csv``, or any folder of images) and write them to ``out`` (default: the shipped weights
    folder when the adapter's weights are the shipped ones, else the user weights folder)."""
    from .engines import find_studies
    from .io import read_image
    from .models import sha256
    from .settings import Settings

    rows = find_studies(data)[:limit]
    if not rows:
        raise ValueError(f"no images in {data}")
    feats, ids = [], []
    for n, r in enumerate(rows):
        x = adapter.prepare(read_image(r["image"]))
        feats.append(pooled_features(adapter, x))
        ids.append(str(r.get("study_id", Path(r["image"]).name)))
        if progress:
            progress(n + 1, len(rows))
    card = adapter.card
    stats = fit_stats(np.stack(feats), model=card.name, model_version=card.version,
                      weights_sha256=card.weights_sha256, data=str(data), command=command, study_ids=ids)
    if out is None:
        s = Settings()
        shipped = Path(s.weights_dir) / f"{card.name}.pt"
        own = shipped.is_file() and (not card.weights_sha256 or sha256(shipped) == card.weights_sha256)
        out = stats_path(s.weights_dir if own else s.user_weights_dir, card.name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats.model_dump(), separators=(",", ":")))
    tmp.replace(out)
    return out, stats

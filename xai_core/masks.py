"""Binary saliency masks, connected components and nested saliency levels from a saliency map.

Works on numpy arrays of any dimension (2-D slices, 3-D volumes), with an optional boolean
foreground (brain) mask of the same shape; everything is computed over foreground voxels only
(all voxels when no foreground is given) and non-finite map values are left out of the foreground.
Larger map values mean more salient.

Adaptive threshold rule (:func:`adaptive_threshold`)
    1. Otsu's threshold on the foreground values of the map (256-bin histogram): the split that
       maximises the between-class variance of "salient" and "not salient" voxels. The mask is
       ``map >= t`` with ``t`` the smallest foreground value on the salient side.
    2. Clamped so that the mask holds between ``min_fraction`` (1 %) and ``max_fraction`` (20 %) of
       the foreground voxels: above 20 % the threshold rises to the top-20 % value, below 1 % it
       falls to the top-1 % value. :func:`clamp_threshold` is this step alone, for any candidate.
    3. Reported as the percentile it corresponds to: ``percentile = 100 * (1 - mask voxels /
       foreground voxels)``, the share of foreground voxels below the threshold.
    Ties: voxels with equal values are never split, so the threshold moves to the next distinct
    value. Hence the 1 % floor can be undershot (for instance when only a few voxels are above 0:
    the zeros are not made salient) and the 20 % cap is exceeded only by a plateau at the map's
    maximum that is itself larger than 20 %.

Saliency levels (:func:`saliency_levels`)
    A ``uint8`` volume with 0 outside every level and ``i`` = the ``i``-th largest percentage of
    ``Settings.mask_levels_percent`` (default ``(1, 5, 10, 20)``): level 1 = top 20 %, 2 = top 10 %,
    3 = top 5 %, 4 = top 1 % of foreground voxels. The levels are nested (top 1 % lies inside the
    top 5 % ...), each voxel carries its highest level, so ``levels >= i`` is the top-``p_i`` mask
    and the highest level is the most salient. Each level holds at most its share of the
    foreground (same tie rule as the 20 % cap).

Flat or empty input never raises: a map that is constant over the foreground, an empty foreground,
or no component above the minimum size gives ``empty=True`` with ``reason`` set (and, for the
first two, an all-zero mask and levels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:  # imported where needed: the mask functions themselves need numpy and scipy only
    from .settings import Settings

OTSU_BINS = 256


@dataclass(frozen=True)
class Component:
    """One connected region of a mask. Indices are array indices (``[k, j, i]`` for volumes)."""

    label: int  # 1 = largest component, 2 = next, ... (as in SaliencyMask.labels)
    size: int  # voxels
    centroid: tuple[float, ...]  # array index coordinates of the centre of mass
    bbox: tuple[tuple[int, int], ...]  # (start, stop) per axis, stop exclusive
    peak: float | None = None  # largest map value inside (None without a map)
    peak_index: tuple[int, ...] | None = None  # where it is
    volume: float | None = None  # size times the voxel volume, when spacing was given


@dataclass(frozen=True)
class Threshold:
    """Result of :func:`adaptive_threshold` (``threshold``/``percentile`` are NaN when empty)."""

    threshold: float  # mask = map >= threshold (inside the foreground)
    percentile: float  # 100 * share of foreground voxels below the threshold
    mask: np.ndarray  # bool, the map's shape
    otsu: float  # the unclamped Otsu threshold
    clamped: str | None  # None, "min_fraction" or "max_fraction"
    empty: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class SaliencyMask:
    """Result of :func:`saliency_mask`.

    mask:       bool, the map's shape: thresholded voxels in components of at least the minimum size.
    levels:     uint8 nested saliency levels (0 = none; highest = most salient; module docstring).
    threshold:  map value of the mask's threshold (NaN when the map is flat or the foreground empty).
    percentile: the threshold as a percentile of the foreground values (NaN likewise).
    components: kept components, largest first (``components[i].label == i + 1``).
    empty:      True when the mask is empty; ``reason`` says why.
    labels:     int32 component labels of the kept components (0 = background).
    level_thresholds: ``{percent: map value}`` of each level (``levels >= i`` <=> ``map >= value``).
    foreground_voxels: voxels the percentages refer to.
    """

    mask: np.ndarray
    levels: np.ndarray
    threshold: float
    percentile: float
    components: list[Component]
    empty: bool
    reason: str | None
    labels: np.ndarray
    level_thresholds: dict[float, float] = field(default_factory=dict)
    foreground_voxels: int = 0

    @property
    def fraction(self) -> float:
        """Share of the foreground voxels in the mask (0..1)."""
        return float(self.mask.sum()) / self.foreground_voxels if self.foreground_voxels else 0.0


# ----------------------------------------------------------------------------------------------------------
# Helpers on the sorted foreground values
# ----------------------------------------------------------------------------------------------------------


def _prepare(saliency: np.ndarray, foreground: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(floating map, bool foreground of finite voxels). Float maps keep their dtype: no copy of a
    large float32 volume."""
    s = np.asarray(saliency)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if foreground is None:
        fg = np.ones(s.shape, dtype=bool)
    else:
        fg = np.asarray(foreground).astype(bool, copy=False)
        if fg.shape != s.shape:
            raise ValueError(f"foreground shape {fg.shape} differs from the map's {s.shape}")
    return s, fg & np.isfinite(s)


def _at_most(sorted_vals: np.ndarray, fraction: float) -> float:
    """Smallest value ``v`` such that ``count(values >= v) <= max(1, floor(fraction * n))``; a plateau
    at the maximum larger than that is kept whole (returns the maximum)."""
    n = sorted_vals.size
    k = max(1, math.floor(fraction * n + 1e-9))
    v = sorted_vals[n - k]
    above_or_equal = n - np.searchsorted(sorted_vals, v, side="left")
    if above_or_equal > k:
        nxt = np.searchsorted(sorted_vals, v, side="right")
        if nxt < n:
            v = sorted_vals[nxt]
    return float(v)


def _at_least(sorted_vals: np.ndarray, fraction: float) -> float:
    """The ``ceil(fraction * n)``-th largest value: ``map >= v`` holds at least that many voxels."""
    n = sorted_vals.size
    k = min(n, max(1, math.ceil(fraction * n - 1e-9)))
    return float(sorted_vals[n - k])


def _count_at_least(sorted_vals: np.ndarray, v: float) -> int:
    return int(sorted_vals.size - np.searchsorted(sorted_vals, v, side="left"))


def _otsu(sorted_vals: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold: the lower edge of the first bin on the salient side."""
    hist, edges = np.histogram(sorted_vals, bins=bins, range=(sorted_vals[0], sorted_vals[-1]))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist)[:-1]
    w1 = hist.sum() - w0
    m0 = np.cumsum(hist * centres)[:-1]
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (float((hist * centres).sum()) - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _flat_reason(sorted_vals: np.ndarray) -> str | None:
    if sorted_vals.size == 0:
        return "empty foreground (no finite map values inside it)"
    if sorted_vals[-1] <= sorted_vals[0]:
        return f"flat map (every foreground value is {sorted_vals[0]:g})"
    return None


# ----------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------


def adaptive_threshold(saliency: np.ndarray, foreground: np.ndarray | None = None, *,
                       min_fraction: float = 0.01, max_fraction: float = 0.20) -> Threshold:
    """Per-map threshold: Otsu on the foreground, clamped to 1..20 % of it (rule in the module docstring)."""
    s, fg = _prepare(saliency, foreground)
    return _threshold(s, fg, np.sort(s[fg]), min_fraction, max_fraction)


def clamp_threshold(sorted_values: np.ndarray, threshold: float, *, min_fraction: float = 0.01,
                    max_fraction: float = 0.20) -> tuple[float, str | None]:
    """Step 2 of the adaptive rule for any candidate ``threshold`` of a map whose foreground values,
    sorted ascending, are ``sorted_values``: the smallest value at or above ``threshold`` (so
    ``map >= result`` is the candidate's mask), clamped so that the mask holds ``min_fraction`` ..
    ``max_fraction`` of the values, with the module docstring's tie rule.

    Returns ``(threshold, clamped)``, ``clamped`` being None, ``"min_fraction"`` or ``"max_fraction"``.
    :func:`adaptive_threshold` applies it to Otsu's threshold; ``bench/mask_rule.py`` to other rules.
    """
    if not 0.0 < min_fraction <= max_fraction <= 1.0:
        raise ValueError("need 0 < min_fraction <= max_fraction <= 1")
    vals = np.asarray(sorted_values)
    n = vals.size
    if n == 0:
        raise ValueError("no values to threshold")
    thr = float(vals[min(n - 1, np.searchsorted(vals, threshold, side="left"))])
    clamped = None
    count = _count_at_least(vals, thr)
    if count > max_fraction * n:
        thr, clamped = _at_most(vals, max_fraction), "max_fraction"
    elif count < min_fraction * n:
        clamped = "min_fraction"
        thr = _at_least(vals, min_fraction)
        if _count_at_least(vals, thr) > max_fraction * n:
            # The floor would drag in a tie block (typically the zeros of a ReLU map): keep only
            # the values above it.
            thr = _at_most(vals, max_fraction)
    return thr, clamped


def _threshold(s: np.ndarray, fg: np.ndarray, vals: np.ndarray, min_fraction: float,
               max_fraction: float) -> Threshold:
    if not 0.0 < min_fraction <= max_fraction <= 1.0:
        raise ValueError("need 0 < min_fraction <= max_fraction <= 1")
    reason = _flat_reason(vals)
    if reason is not None:
        return Threshold(math.nan, math.nan, np.zeros(s.shape, dtype=bool), math.nan, None, True, reason)
    n = vals.size
    otsu = _otsu(vals)
    # map >= thr must equal "on Otsu's salient side": the smallest value at or above the edge.
    thr, clamped = clamp_threshold(vals, otsu, min_fraction=min_fraction, max_fraction=max_fraction)
    count = _count_at_least(vals, thr)
    mask = fg & (s >= thr)
    return Threshold(thr, 100.0 * (1.0 - count / n), mask, otsu, clamped)


def connected_components(mask: np.ndarray, *, min_size: int = 1, connectivity: int | None = None,
                         saliency: np.ndarray | None = None,
                         spacing: Sequence[float] | None = None) -> tuple[np.ndarray, list[Component]]:
    """Label the connected regions of ``mask`` and keep those of at least ``min_size`` voxels.

    ``connectivity``: neighbours that touch, as in ``scipy.ndimage.generate_binary_structure``
    (1 = faces only; default ``mask.ndim`` = faces, edges and corners, i.e. 8 in 2-D, 26 in 3-D).
    ``saliency`` adds each component's peak; ``spacing`` (per array axis, mm) adds its volume (mm^3,
    mm^2 in 2-D). Returns ``(labels int32, components)``, relabelled 1 = largest (ties: first in
    array order).
    """
    m = np.asarray(mask).astype(bool, copy=False)
    structure = ndimage.generate_binary_structure(m.ndim, m.ndim if connectivity is None else connectivity)
    labels, n = ndimage.label(m, structure=structure)
    if n == 0:
        return np.zeros(m.shape, dtype=np.int32), []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-sizes, kind="stable")
    keep = [int(i) + 1 for i in order if sizes[i] >= min_size]
    lookup = np.zeros(n + 1, dtype=np.int32)
    lookup[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    new_labels = lookup[labels]
    if not keep:
        return new_labels, []
    index = list(range(1, len(keep) + 1))
    centroids = ndimage.center_of_mass(m, new_labels, index)
    boxes = ndimage.find_objects(new_labels)
    voxel_volume = float(np.prod(spacing)) if spacing is not None else None
    if saliency is not None:
        s = np.asarray(saliency)
        peaks = ndimage.maximum(s, new_labels, index)
        peak_pos = ndimage.maximum_position(s, new_labels, index)
    comps = []
    for i, old in enumerate(keep):
        size = int(sizes[old - 1])
        comps.append(Component(
            label=i + 1, size=size,
            centroid=tuple(float(c) for c in centroids[i]),
            bbox=tuple((int(sl.start), int(sl.stop)) for sl in boxes[i]),
            peak=float(peaks[i]) if saliency is not None else None,
            peak_index=tuple(int(p) for p in peak_pos[i]) if saliency is not None else None,
            volume=size * voxel_volume if voxel_volume is not None else None,
        ))
    return new_labels, comps


def _level_percents(levels_percent: Sequence[float] | None, settings: Settings | None = None) -> list[float]:
    """The level percentages, largest first: ``levels_percent`` or ``settings.mask_levels_percent``
    (``settings`` default ``Settings()``)."""
    if levels_percent is None:
        if settings is None:
            from .settings import Settings

            settings = Settings()
        levels_percent = settings.mask_levels_percent
    pcts = sorted({float(p) for p in levels_percent}, reverse=True)
    if not pcts or pcts[0] > 100.0 or pcts[-1] <= 0.0:
        raise ValueError(f"level percentages must lie in (0, 100], got {levels_percent}")
    if len(pcts) > 255:
        raise ValueError("at most 255 levels fit in uint8")
    return pcts


def saliency_levels(saliency: np.ndarray, foreground: np.ndarray | None = None,
                    levels_percent: Sequence[float] | None = None, *,
                    settings: Settings | None = None) -> tuple[np.ndarray, dict[float, float]]:
    """Nested saliency levels (encoding in the module docstring).

    ``levels_percent``: top percentages of the foreground, default ``settings.mask_levels_percent``
    (``settings`` default ``Settings()``).
    Returns ``(levels uint8, {percent: threshold})``; all zeros and ``{}`` for a flat map or an empty
    foreground.
    """
    pcts = _level_percents(levels_percent, settings)
    s, fg = _prepare(saliency, foreground)
    return _levels(s, fg, np.sort(s[fg]), pcts)


def _levels(s: np.ndarray, fg: np.ndarray, vals: np.ndarray,
            pcts: list[float]) -> tuple[np.ndarray, dict[float, float]]:
    levels = np.zeros(s.shape, dtype=np.uint8)
    if _flat_reason(vals) is not None:
        return levels, {}
    thresholds: dict[float, float] = {}
    for level, pct in enumerate(pcts, start=1):
        thr = _at_most(vals, pct / 100.0)
        thresholds[pct] = thr
        # Thresholds rise with the level, so later (higher) levels overwrite: the highest wins.
        levels[fg & (s >= thr)] = level
    return levels, thresholds


def saliency_mask(saliency: np.ndarray, foreground: np.ndarray | None = None, *,
                  min_fraction: float = 0.01, max_fraction: float = 0.20, min_component_size: int = 1,
                  connectivity: int | None = None, levels_percent: Sequence[float] | None = None,
                  spacing: Sequence[float] | None = None, settings: Settings | None = None) -> SaliencyMask:
    """Adaptive binary mask, its components (at least ``min_component_size`` voxels, largest first)
    and the nested saliency levels of one map. Never raises on flat or empty input: see ``empty``.

    ``levels_percent`` defaults to ``settings.mask_levels_percent`` (``settings`` default
    ``Settings()``). The mask bounds are the explicit ``min_fraction`` / ``max_fraction``; callers
    that want ``settings.mask_min_fraction`` / ``mask_max_fraction`` pass them.
    """
    s, fg = _prepare(saliency, foreground)
    vals = np.sort(s[fg])  # sorted once, shared by the threshold and every level
    n_fg = int(vals.size)
    thr = _threshold(s, fg, vals, min_fraction, max_fraction)
    levels, level_thr = _levels(s, fg, vals, _level_percents(levels_percent, settings))
    if thr.empty:
        return SaliencyMask(np.zeros(s.shape, dtype=bool), levels, thr.threshold, thr.percentile, [], True,
                            thr.reason, np.zeros(s.shape, dtype=np.int32), level_thr, n_fg)
    labels, comps = connected_components(thr.mask, min_size=min_component_size, connectivity=connectivity,
                                         saliency=s, spacing=spacing)
    mask = labels > 0
    empty = not comps
    reason = f"no component of at least {min_component_size} voxels above the threshold" if empty else None
    return SaliencyMask(mask, levels, thr.threshold, thr.percentile, comps, empty, reason, labels, level_thr,
                        n_fg)

"""Localisation metrics of saliency against ground truth, with bootstrap confidence intervals.

All functions take numpy arrays on the same grid (any dimension). Masks are binary; maps are
float saliency. Empty ground truth is not scored (callers skip those studies) rather than being
counted as a hit, unlike some libraries.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["dice", "iou", "auprc", "pointing_game", "bootstrap_ci", "expected_calibration_error",
           "per_class_auroc"]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap 2|A and B| / (|A| + |B|); 1.0 when both are empty, 0.0 when one is."""
    a, b = np.asarray(pred, bool), np.asarray(truth, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else float(2 * np.logical_and(a, b).sum() / s)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union; 1.0 when both are empty."""
    a, b = np.asarray(pred, bool), np.asarray(truth, bool)
    u = int(np.logical_or(a, b).sum())
    return 1.0 if u == 0 else float(np.logical_and(a, b).sum() / u)


def auprc(saliency: np.ndarray, truth: np.ndarray, within: np.ndarray | None = None) -> float:
    """Area under the precision-recall curve (average precision) of a continuous map at
    detecting ground-truth voxels, over the voxels of ``within`` (default: all). Ties are handled
    as in scikit-learn's ``average_precision_score``. Chance level is the lesion's voxel fraction."""
    from sklearn.metrics import average_precision_score

    sel = np.ones(truth.shape, bool) if within is None else np.asarray(within, bool) | np.asarray(truth, bool)
    y = np.asarray(truth, bool)[sel]
    if not y.any():
        raise ValueError("AUPRC needs at least one ground-truth voxel")
    return float(average_precision_score(y, np.asarray(saliency, np.float64)[sel]))


def pointing_game(saliency: np.ndarray, truth: np.ndarray, spacing=None, tolerance_mm: float = 0.0) -> bool:
    """True when the map's maximum lies in the ground truth, dilated by ``tolerance_mm``.

    ``spacing`` (voxel size per array axis, in array order) converts the tolerance to voxels.
    An empty ground truth raises: there is nothing to point at.
    """
    t = np.asarray(truth, bool)
    if not t.any():
        raise ValueError("pointing game needs a non-empty ground truth")
    if tolerance_mm > 0:
        sp = np.ones(t.ndim) if spacing is None else np.asarray(spacing, float)
        dist = ndimage.distance_transform_edt(~t, sampling=sp)
        t = dist <= tolerance_mm
    peak = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    return bool(t[peak])


def bootstrap_ci(values, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap ``1 - alpha`` confidence interval of ``values``."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(v.mean()), float(lo), float(hi)


# ---------------------------------------------------------------------- classification

def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Top-label expected calibration error of ``probs (N, C)`` against integer ``labels (N,)``, with
    equal-width confidence bins."""
    conf, pred = probs.max(1), probs.argmax(1)
    ece = 0.0
    for lo in np.linspace(0, 1, bins, endpoint=False):
        sel = (conf > lo) & (conf <= lo + 1.0 / bins)
        if sel.any():
            ece += sel.mean() * abs((pred[sel] == labels[sel]).mean() - conf[sel].mean())
    return float(ece)


def per_class_auroc(probs: np.ndarray, labels: np.ndarray, classes) -> dict[str, float]:
    """One-vs-rest AUROC per class name (NaN for a class absent from ``labels`` or the only one)."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for c, name in enumerate(classes):
        y = (labels == c).astype(int)
        out[name] = float(roc_auc_score(y, probs[:, c])) if 0 < y.sum() < len(y) else float("nan")
    return out

"""Localisation and classification metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from xai_core.metrics import (
    auprc,
    bootstrap_ci,
    dice,
    expected_calibration_error,
    iou,
    per_class_auroc,
    pointing_game,
)


def _boxes():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0:4, 0:4] = True  # 16 voxels
    b[2:6, 0:4] = True  # 16 voxels, 8 shared
    return a, b


def test_dice_and_iou_of_overlapping_boxes():
    a, b = _boxes()
    assert dice(a, b) == pytest.approx(2 * 8 / 32)
    assert iou(a, b) == pytest.approx(8 / 24)
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_auprc_perfect_ranking_is_one_and_reversed_ranking_is_near_chance():
    truth = np.zeros(100, bool)
    truth[:10] = True
    score = np.linspace(1, 0, 100)
    assert auprc(score, truth) == pytest.approx(1.0)
    # Ranking the 10 positives last: precision at each positive is k / (90 + k).
    expected = np.mean([k / (90 + k) for k in range(1, 11)])
    assert auprc(-score, truth) == pytest.approx(expected)
    with pytest.raises(ValueError, match="ground-truth voxel"):
        auprc(score, np.zeros(100, bool))


def test_pointing_game_with_tolerance_in_millimetres():
    truth = np.zeros((20, 20), bool)
    truth[10, 10] = True
    sal = np.zeros((20, 20))
    sal[10, 13] = 1.0  # 3 voxels away along the last axis
    assert not pointing_game(sal, truth)
    assert not pointing_game(sal, truth, spacing=(1.0, 1.0), tolerance_mm=2.5)
    assert pointing_game(sal, truth, spacing=(1.0, 1.0), tolerance_mm=3.0)
    # 2 mm voxels along that axis: 6 mm away.
    assert not pointing_game(sal, truth, spacing=(1.0, 2.0), tolerance_mm=5.0)
    with pytest.raises(ValueError, match="non-empty ground truth"):
        pointing_game(sal, np.zeros_like(truth))


def test_bootstrap_ci_brackets_the_mean_and_ignores_nan():
    v = np.r_[np.arange(20, dtype=float), np.nan]
    mean, lo, hi = bootstrap_ci(v)
    assert mean == pytest.approx(9.5)
    assert lo < mean < hi
    assert 6.0 < lo and hi < 13.0  # about mean -/+ 1.96 * 5.77 / sqrt(20) = 2.5
    assert np.isnan(bootstrap_ci([np.nan])[0])


def test_expected_calibration_error():
    labels = np.array([0, 0, 1, 1, 0])
    # Every prediction right with confidence 0.8: the gap is 0.2 in the one occupied bin.
    probs = np.tile([0.8, 0.2], (5, 1))
    probs[2:4] = [0.2, 0.8]
    assert expected_calibration_error(probs, labels) == pytest.approx(0.2)
    # Two bins: 0.9 confident and always right (gap 0.1, 3/5), 0.6 confident and always wrong (gap 0.6, 2/5).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 1, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.6 * 0.1 + 0.4 * 0.6)


def test_per_class_auroc():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1],
                      [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.1, 0.7]])
    out = per_class_auroc(probs, labels, ["a", "b", "c"])
    # Class a: positives 0.9, 0.8; negatives 0.1, 0.6, 0.1, 0.2 -> every pair ranked right.
    assert out["a"] == pytest.approx(1.0)
    # Class b: positives 0.8, 0.3; negatives 0.05, 0.1, 0.1, 0.1 -> all right.
    assert out["b"] == pytest.approx(1.0)
    assert out["c"] == pytest.approx(1.0)
    probs[3] = [0.95, 0.03, 0.02]  # now a negative of class a outranks both positives
    assert per_class_auroc(probs, labels, ["a", "b", "c"])["a"] == pytest.approx(6 / 8)
    assert np.isnan(per_class_auroc(probs[:2], labels[:2], ["a", "b", "c"])["a"])

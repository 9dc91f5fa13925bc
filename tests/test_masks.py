"""Saliency masks: adaptive threshold, nested levels, connected components, flat and empty input."""

from __future__ import annotations

import numpy as np
import pytest

from xai_core.masks import adaptive_threshold, connected_components, saliency_levels, saliency_mask
from xai_core.settings import get_settings


def ball(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    d2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return d2 <= radius**2


def blob_map(shape: tuple[int, ...], centre: tuple[float, ...], sigma: float, seed: int = 0) -> np.ndarray:
    """A Gaussian blob of height 1 over uniform noise of amplitude 0.05."""
    grid = np.indices(shape, dtype=np.float64)
    d2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    noise = np.random.default_rng(seed).uniform(0.0, 0.05, shape)
    return (np.exp(-d2 / (2 * sigma**2)) + noise).astype(np.float32)


@pytest.mark.parametrize("shape", [(32, 32, 32), (96, 96)])
def test_threshold_finds_a_known_blob(shape: tuple[int, ...]) -> None:
    n = len(shape)
    brain = ball(shape, (shape[0] / 2,) * n, shape[0] * 0.45)
    centre = (shape[0] * 0.6,) * n
    sal = blob_map(shape, centre, sigma=2.5 if n == 3 else 5.0)
    res = adaptive_threshold(sal, brain)
    assert not res.empty and res.clamped is None  # Otsu alone: the blob is a few % of the brain
    blob = ball(shape, centre, 2 * (2.5 if n == 3 else 5.0)) & brain  # within 2 sigma
    assert not (res.mask & ~brain).any()
    assert (res.mask & ~blob).sum() == 0  # nothing from the noise
    core = ball(shape, centre, 2.5 if n == 3 else 5.0)  # within 1 sigma: value > 0.6
    assert (res.mask & core).sum() == core.sum()
    frac = res.mask.sum() / brain.sum()
    assert 0.01 <= frac <= 0.20
    assert res.percentile == pytest.approx(100 * (1 - frac))
    assert res.mask.sum() == (sal[brain] >= res.threshold).sum()


def test_threshold_clamps_to_at_most_20_percent() -> None:
    sal = np.random.default_rng(1).uniform(size=(40, 40, 40))  # Otsu would take about half
    res = adaptive_threshold(sal)
    assert res.clamped == "max_fraction"
    assert res.mask.sum() == int(0.2 * sal.size)
    assert res.percentile == pytest.approx(80.0)


def test_threshold_clamps_to_at_least_1_percent() -> None:
    rng = np.random.default_rng(2)
    sal = rng.uniform(0.0, 0.01, size=(32, 32, 32))
    sal.flat[rng.choice(sal.size, 5, replace=False)] = 1.0  # Otsu would keep only these 5 voxels
    res = adaptive_threshold(sal)
    assert res.clamped == "min_fraction"
    assert res.mask.sum() == int(np.ceil(0.01 * sal.size))
    assert res.percentile == pytest.approx(100 * (1 - res.mask.sum() / sal.size))


def test_threshold_never_makes_zeros_salient() -> None:
    """A ReLU map that is zero almost everywhere: the 1 % floor must not pull in the zero plateau."""
    sal = np.zeros((32, 32, 32), np.float32)
    sal[3, 4, 5:8] = [0.5, 1.0, 0.7]
    res = adaptive_threshold(sal)
    assert res.mask.sum() == 3 and not res.empty
    levels, _ = saliency_levels(sal)
    assert (levels > 0).sum() == 3


@pytest.mark.parametrize("shape", [(48, 48, 48), (200, 200)])
def test_levels_are_nested_top_fractions(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    n = len(shape)
    brain = ball(shape, (shape[0] / 2,) * n, shape[0] * 0.4)
    sal = rng.normal(size=shape).astype(np.float32)
    levels, thr = saliency_levels(sal, brain)
    assert levels.dtype == np.uint8 and levels.shape == shape
    assert not levels[~brain].any()
    n_fg = brain.sum()
    percents = sorted(get_settings().mask_levels_percent, reverse=True)  # (20, 10, 5, 1)
    assert levels.max() == len(percents) == 4
    for level, pct in enumerate(percents, start=1):
        inside = levels >= level
        assert inside.sum() == int(np.floor(pct / 100 * n_fg))  # continuous values: exact count
        assert inside.sum() / n_fg == pytest.approx(pct / 100, abs=1 / n_fg)
        assert (sal[inside] >= thr[pct]).all()
        # Every voxel of a level outranks every foreground voxel below it.
        assert sal[inside].min() > sal[brain & ~inside].max()
    assert thr[1.0] > thr[5.0] > thr[10.0] > thr[20.0]


def test_custom_levels_and_ties() -> None:
    sal = np.zeros((10, 10))
    sal[:2] = 1.0  # a 20 % plateau at the maximum, the rest ties at 0
    levels, _ = saliency_levels(sal, levels_percent=(50, 30, 10))
    # A maximum plateau cannot be split: all three levels hold it; the zeros are in none.
    assert (levels == 3).sum() == 20 and (levels == 0).sum() == 80


def test_components_sorted_filtered_and_connectivity() -> None:
    mask = np.zeros((20, 20, 20), bool)
    mask[2:5, 2:5, 2:5] = True  # 27 voxels
    mask[10:12, 10:12, 10:12] = True  # 8 voxels
    mask[12, 12, 12] = True  # touches the 8-voxel cube at a corner only
    mask[17, 17, 17] = True  # a lone voxel
    sal = np.zeros(mask.shape)
    sal[3, 4, 2] = 5.0
    labels, comps = connected_components(mask, min_size=2, saliency=sal, spacing=(2.0, 1.0, 1.0))
    assert [c.size for c in comps] == [27, 9]  # corner-connected by default (26-neighbourhood)
    assert [c.label for c in comps] == [1, 2]
    assert (labels == 1).sum() == 27 and (labels == 2).sum() == 9 and labels[17, 17, 17] == 0
    assert comps[0].centroid == pytest.approx((3.0, 3.0, 3.0))
    assert comps[0].bbox == ((2, 5), (2, 5), (2, 5))
    assert comps[0].peak == 5.0 and comps[0].peak_index == (3, 4, 2)
    assert comps[0].volume == pytest.approx(54.0)
    _, faces = connected_components(mask, connectivity=1)
    assert [c.size for c in faces] == [27, 8, 1, 1]
    empty_labels, none = connected_components(np.zeros((5, 5), bool))
    assert none == [] and not empty_labels.any()


def test_saliency_mask_end_to_end_2d_and_3d() -> None:
    for shape in [(64, 64), (32, 32, 32)]:
        n = len(shape)
        sal = blob_map(shape, (shape[0] * 0.3,) * n, sigma=3.0)
        far = (shape[0] * 0.75,) * n
        sal = np.maximum(sal, 0.8 * blob_map(shape, far, sigma=2.0, seed=1))
        res = saliency_mask(sal, min_component_size=3)
        assert not res.empty and res.reason is None
        assert len(res.components) == 2 and res.components[0].size >= res.components[1].size
        assert res.mask.sum() == sum(c.size for c in res.components)
        assert res.fraction == pytest.approx(res.mask.sum() / sal.size)
        assert res.levels.max() == 4 and res.foreground_voxels == sal.size
        peak = np.unravel_index(np.argmax(sal), shape)
        assert res.levels[peak] == 4 and res.mask[peak]


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 8)])
def test_flat_and_empty_inputs_never_raise(shape: tuple[int, ...]) -> None:
    cases = {
        "flat": (np.full(shape, 0.3), None),
        "zeros": (np.zeros(shape), None),
        "empty foreground": (np.random.default_rng(0).uniform(size=shape), np.zeros(shape, bool)),
        "all nan": (np.full(shape, np.nan), None),
    }
    for name, (sal, fg) in cases.items():
        res = saliency_mask(sal, fg)
        assert res.empty, name
        assert res.reason, name
        assert not res.mask.any() and not res.levels.any() and res.components == []
        assert np.isnan(res.threshold) and np.isnan(res.percentile)
    assert "flat" in saliency_mask(np.zeros(shape)).reason
    assert "empty foreground" in saliency_mask(np.ones(shape), np.zeros(shape, bool)).reason


def test_flat_inside_foreground_but_not_outside() -> None:
    sal = np.zeros((16, 16))
    sal[0, 0] = 9.0  # outside the foreground: ignored
    fg = np.zeros((16, 16), bool)
    fg[4:12, 4:12] = True
    res = saliency_mask(sal, fg)
    assert res.empty and "flat" in res.reason


def test_no_component_large_enough() -> None:
    sal = np.zeros((20, 20))
    sal[5, 5] = 1.0
    sal[15, 15] = 1.0
    res = saliency_mask(sal, min_component_size=2)
    assert res.empty and "component" in res.reason
    assert not res.mask.any()
    assert res.threshold == 1.0
    assert res.levels.max() > 0  # levels do not depend on the component filter


def test_nan_voxels_are_left_out() -> None:
    sal = blob_map((32, 32), (10, 10), sigma=3.0)
    sal[0, :] = np.nan
    res = saliency_mask(sal)
    assert not res.empty and res.foreground_voxels == 32 * 31
    assert not res.mask[0].any() and not res.levels[0].any()

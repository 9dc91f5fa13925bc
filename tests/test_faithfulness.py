"""Deletion / insertion curves, AOPC and fills (xai_core.faithfulness), on hand-built models whose decision
depends on one known region, in 2-D and 3-D, through the explainer contract."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from xai_core.explain import get_explainer
from xai_core.faithfulness import (
    aopc,
    cube_ranking,
    curve_auc,
    faithfulness,
    make_fill,
    perturbation_curves,
    register_infiller,
    step_counts,
)
from xai_core.settings import Settings


class RegionGate(nn.Module):
    """Multiplies the features by a fixed 0/1 map: only the known region reaches the classifier."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.region


class RegionModel(nn.Module):
    """Class 1's logit is 4 * (mean intensity inside ``region`` - 1.5); class 0's is 0. Nothing outside the
    region changes the output. ``gate`` is the CAM layer (features after the region gate)."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        nd = region.ndim
        conv = nn.Conv3d if nd == 3 else nn.Conv2d
        self.feat = conv(1, 1, 1, bias=False)
        nn.init.ones_(self.feat.weight)
        self.gate = RegionGate(region)
        self.n = float(region.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate(torch.relu(self.feat(x)))
        m = h.flatten(1).sum(1) / self.n
        return torch.stack([torch.zeros_like(m), 4.0 * (m - 1.5)], dim=1)


def _case(nd: int, size: int = 16, patch: int = 4):
    """An image with a bright patch-aligned region (value 5) on a noisy 0.5 background."""
    rng = np.random.default_rng(0)
    shape = (size,) * nd
    region = np.zeros(shape, bool)
    sl = tuple(slice(patch, 2 * patch) for _ in range(nd))  # exactly one cube
    region[sl] = True
    x = (0.5 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    x[region] = 5.0
    return x, region


def _adapter(net: nn.Module, spacing_mm: float = 3.0):
    """The parts of a model adapter that faithfulness() uses."""
    return SimpleNamespace(forward_func=lambda: net, card=SimpleNamespace(grid_spacing_mm=spacing_mm, temperature=1.0))


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("fill", ["mean", "blur"])
def test_region_model_morf_drops_at_first_step_lerf_stays_flat(nd, fill):
    x, region = _case(nd)
    net = RegionModel(torch.from_numpy(region)).eval()
    xt = torch.from_numpy(x)[None, None]
    # The map comes from an explainer through the contract, not from the known region.
    att = get_explainer("gradcam")(net, layer="gate").attribute(xt, target=1)
    sal = att.maps[0, 0]
    assert float(sal[torch.from_numpy(region)].min()) > float(sal[~torch.from_numpy(region)].max())
    inputs = SimpleNamespace(inputs=(xt,), additional_forward_args=(), ref=None)
    cfg = Settings(faithfulness_patch_mm=12.0, faithfulness_steps=8, faithfulness_blur_mm=12.0)
    res = faithfulness(_adapter(net), inputs, sal, 1, settings=cfg, fill=fill)
    morf, lerf = res.curves["deletion_morf"].scores, res.curves["deletion_lerf"].scores
    n = res.n_cubes
    assert res.patch_voxels == (4,) * nd and n == 4 ** nd
    assert morf[0] > 0.99
    # MoRF: the region is the first cube removed, so the probability collapses at step 1 and stays down.
    assert morf[1] < 0.5 * morf[0] and max(morf[1:]) < 0.5 * morf[0]
    # LeRF: the region is the last cube removed: flat until the last step, which removes it.
    assert np.allclose(lerf[:-1], lerf[0], atol=1e-6)
    assert lerf[-1] < 0.5 * lerf[0]
    s = res.summary()
    assert s["auc_deletion_lerf"] > s["auc_deletion_morf"] + 0.5 and s["abpc"] > 0.5
    assert s["aopc_morf"] > 0.5 and abs(s["aopc_lerf"] - (lerf[0] - lerf[-1]) / len(lerf)) < 1e-6
    # Insertion: restoring the region first brings the probability back at step 1.
    ins_m, ins_l = res.curves["insertion_morf"].scores, res.curves["insertion_lerf"].scores
    assert ins_m[0] < 0.5 and ins_m[1] > 0.99 and np.allclose(ins_l[:-1], ins_l[0], atol=1e-6)
    assert s["auc_insertion_morf"] > s["auc_insertion_lerf"] + 0.5


def test_reversed_map_swaps_the_curves():
    """A map that ranks the region last is unfaithful: its MoRF curve is the flat one."""
    x, region = _case(3)
    net = RegionModel(torch.from_numpy(region)).eval()
    score = lambda b: torch.softmax(net(torch.from_numpy(b)), 1)[:, 1].detach().numpy()  # noqa: E731
    fill, _ = make_fill("mean", x[None], spacing=(3.0,) * 3)
    good, _ = perturbation_curves(score, x[None], region.astype(float), patch=4, steps=8, fill=fill)
    bad, _ = perturbation_curves(score, x[None], (~region).astype(float), patch=4, steps=8, fill=fill)
    assert good["deletion_morf"].scores == bad["deletion_lerf"].scores
    assert bad["deletion_morf"].auc > good["deletion_morf"].auc + 0.5


def test_cube_ranking_foreground_and_ties():
    sal = np.zeros((8, 8))
    sal[4:, 4:] = 1.0
    sal[0:4, 4:8] = 0.5
    fg = np.ones_like(sal, bool)
    fg[:4, :4] = False  # cube 0 has no foreground: it never takes part
    labels, order, scores = cube_ranking(sal, (4, 4), fg)
    assert labels.shape == sal.shape and list(order) == [3, 1, 2] and list(scores) == [1.0, 0.5, 0.0]
    # A partial cube at the edge (size 10 with patch 4) still counts.
    _, order, _ = cube_ranking(np.arange(10.0), (4,))
    assert list(order) == [2, 1, 0]


def test_foreground_only_is_filled():
    x = np.ones((1, 8, 8), np.float32)
    fg = np.zeros((8, 8), bool)
    fg[2:6, 2:6] = True
    seen = []

    def score(b):
        seen.extend(b)
        return np.ones(len(b))

    fill, _ = make_fill("mean", x * 3.0, spacing=(1.0, 1.0), foreground=fg)
    perturbation_curves(score, x, np.random.default_rng(0).random((8, 8)), patch=4, steps=2, fill=fill,
                        foreground=fg, curves=["deletion_morf"])
    last = seen[-1][0]
    assert (last[fg] == 3.0).all() and (last[~fg] == 1.0).all()


def test_auc_and_aopc_by_hand():
    assert curve_auc([0, 0.5, 1], [1, 0, 0]) == pytest.approx(0.25)
    assert aopc([1.0, 0.0, 0.0]) == pytest.approx(2 / 3)


def test_fills_and_infiller_hook():
    x = np.zeros((1, 4, 4, 4), np.float32)
    x[0, 1:3, 1:3, 1:3] = 8.0
    r = np.zeros((4, 4, 4), bool)
    r[0] = True
    blur, desc = make_fill("blur", x, spacing=(3.0,) * 3, settings=Settings(faithfulness_blur_mm=3.0))
    out = blur(x, r)
    assert desc["fill"] == "blur" and (out[0, 1:] == x[0, 1:]).all() and out[0, 0].max() > 0
    with pytest.raises(ValueError, match="single-channel 3-D"):
        make_fill("mae", x[0, :, :, 0][None], spacing=(3.0,) * 2)
    with pytest.raises(ValueError, match="registration"):
        make_fill("template", x, spacing=(3.0,) * 3)

    from xai_core.io import Image

    class ConstantInFiller:
        """A stand-in learned in-filler: writes 7 into the region (tests the protocol, not a model)."""

        name = "constant-test"

        def __init__(self, **kw):
            self.kw = kw

        def fill(self, image, region):
            return image.with_array(np.where(region, 7.0, image.array).astype(np.float32))

        def describe(self):
            return {"value": 7.0}

    grid = Image(array=np.zeros((4, 4, 4), np.float32), spacing=(3.0,) * 3, origin=(0.0,) * 3,
                 direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    register_infiller("constant-test", ConstantInFiller)
    fn, desc = make_fill("constant-test", x, spacing=(3.0,) * 3, grid_image=grid)
    assert desc == {"fill": "constant-test", "value": 7.0} and (fn(x, r)[0, 0] == 7.0).all()
    fn, _ = make_fill(ConstantInFiller(), x, spacing=(3.0,) * 3, grid_image=grid)
    assert (fn(x, r)[0, 1:] == x[0, 1:]).all()


@pytest.mark.parametrize(("n", "steps", "schedule", "want"), [
    (300, 4, "linear", [0, 75, 150, 225, 300]),
    (300, 4, "log", [0, 1, 150, 299, 300]),
    (300, 8, "log", [0, 1, 5, 28, 150, 272, 295, 299, 300]),
    (5, 8, "log", [0, 1, 2, 3, 4, 5]),  # repeated counts dropped
    (64, 1, "log", [0, 64]),
])
def test_step_counts(n, steps, schedule, want):
    assert step_counts(n, steps, schedule) == want


def test_log_schedule_samples_the_first_cubes():
    """On the log schedule the points crowd at both ends: a one-cube region ranked first is removed at
    step 1 by MoRF, and LeRF is sampled right before and after it removes that last cube."""
    x, region = _case(3)
    net = RegionModel(torch.from_numpy(region)).eval()
    score = lambda b: torch.softmax(net(torch.from_numpy(b)), 1)[:, 1].detach().numpy()  # noqa: E731
    fill, _ = make_fill("mean", x[None], spacing=(3.0,) * 3)
    out, n = perturbation_curves(score, x[None], region.astype(float), patch=4, steps=10, fill=fill, schedule="log")
    fr = out["deletion_morf"].fractions
    assert fr[1] == pytest.approx(1 / n) and fr[-2] == pytest.approx((n - 1) / n) and fr[-1] == 1.0
    assert sum(f <= 0.1 for f in fr) >= 4 and sum(f >= 0.9 for f in fr) >= 4 and len(fr) == 11
    morf, lerf = out["deletion_morf"].scores, out["deletion_lerf"].scores
    assert morf[1] < 0.5 * morf[0]
    assert np.allclose(lerf[:-1], lerf[0], atol=1e-6) and lerf[-1] < 0.5 * lerf[0]
    with pytest.raises(ValueError, match="schedule"):
        step_counts(10, 4, "cubic")


def test_mae_fill_restores_healthy_tissue_better_than_a_flat_cube(default_model, heldout_studies):
    """The shipped MAE, as a deletion fill, changes only the removed voxels and puts back something
    nearer the real tissue than the mean fill does (a healthy 12 mm cube of a held-out study)."""
    from xai_core.io import read_image

    row = next(r for r in heldout_studies if r["label"] == "none")
    x = default_model.prepare(read_image(row["image"])).inputs[0][0].numpy()  # (1, 64, 64, 64)
    region = np.zeros(x.shape[1:], bool)
    region[30:34, 30:34, 20:24] = True
    fg = x[0] > 0.1
    assert fg[region].all()  # inside the brain
    mae, desc = make_fill("mae", x, spacing=(3.0,) * 3)
    flat, _ = make_fill("mean", x, spacing=(3.0,) * 3, foreground=fg)
    a, b = mae(x, region), flat(x, region)
    assert desc["fill"] == "mae" and desc["model"] == "mae-3d"
    assert (a[0][~region] == x[0][~region]).all() and not np.allclose(a[0][region], x[0][region])
    err_mae = float(np.abs(a[0][region] - x[0][region]).mean())
    err_flat = float(np.abs(b[0][region] - x[0][region]).mean())
    assert err_mae < 0.8 * err_flat, (err_mae, err_flat)


def test_default_model_gradcam_beats_a_random_ranking(default_model, heldout_studies):
    """On the shipped model, Grad-CAM's MoRF deletion (mean fill) falls at once, faster than a random order's."""
    from xai_core.io import read_image

    row = next(r for r in heldout_studies if r["label"] != "none")
    inputs = default_model.prepare(read_image(row["image"]))
    target = default_model.classes.index(row["label"])
    att = default_model.explainer("gradcam").attribute(inputs.inputs, target=target)
    cfg = Settings(faithfulness_steps=10, faithfulness_schedule="linear")
    res = faithfulness(default_model, inputs, att.maps[0, 0], target, settings=cfg, fill="mean",
                       curves=["deletion_morf", "deletion_lerf"])
    noise = torch.rand(att.maps.shape[2:], generator=torch.Generator().manual_seed(0))
    rnd = faithfulness(default_model, inputs, noise, target, settings=cfg, fill="mean",
                       curves=["deletion_morf", "deletion_lerf"])
    morf = res.curves["deletion_morf"].scores
    assert morf[0] > 0.9 and morf[1] < 0.1  # the top tenth of the cubes holds the evidence
    assert res.summary()["auc_deletion_morf"] < rnd.summary()["auc_deletion_morf"]
    # A random order removes lesion cubes early in both orders (ABPC near 0); Grad-CAM keeps them for last in LeRF.
    assert res.summary()["abpc"] > 0.5 and res.summary()["abpc"] > rnd.summary()["abpc"] + 0.4

"""The fine-tune on corrected labels (issue 18): it learns where the model is weak, the guard refuses
worse weights, published versions are named by lineage, and activation and rollback move a pointer.

Everything runs on a tiny network (4-16 channels, 32^3 grid at 6 mm) trained here in seconds on
synthetic heads with one bright lesion, so nothing depends on the shipped weights, which change.
The weak condition is "skull-on": a bright rim around the head that the tiny base model, trained
without it, partly takes for lesion (the same failure the shipped model shows on skull-on scans).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "monai_app"))  # the app's modules import as ``lib.*`` (as MONAI Label loads them)

from lib.trainers.finetune import (  # noqa: E402
    FinetuneSettings,
    dice_per_sample,
    finetune,
    fit,
    overlaps,
    pooled_dice,
    split_holdout,
    split_kfold,
    to_sample,
    trainable_names,
)
from lib.versions import VersionError, VersionStore  # noqa: E402

from xai_core.data.brain import CLASSES  # noqa: E402
from xai_core.io import Image  # noqa: E402
from xai_core.models import LesionModel, ModelCard, build_network, load_card_file, sha256  # noqa: E402

MODEL = "brain-lesion-3d"
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


# ------------------------------------------------------------------------------------------- helpers

def blob_study(seed: int, condition: str = "plain", lesion: bool = True, n: int = 48) -> tuple[Image, Image]:
    """``(image, lesion mask)``: an ellipsoid head (4 mm voxels) with one bright lesion of 12-20 mm
    radius; ``condition="skull"`` adds a bright rim (the outer fifth of the head), like scalp and
    skull on a T1 scan that was not skull-stripped."""
    rng = np.random.default_rng(seed)
    k, j, i = np.ogrid[:n, :n, :n]
    c = (n - 1) / 2
    r = 0.4 * n * rng.uniform(0.9, 1.05, 3)
    d = ((k - c) / r[0]) ** 2 + ((j - c) / r[1]) ** 2 + ((i - c) / r[2]) ** 2
    head = d <= 1
    arr = np.where(head, 100.0, 0.0)
    mask = np.zeros((n, n, n), bool)
    if lesion:
        rad = rng.uniform(3, 5)
        pos = c + rng.uniform(-0.45, 0.45, 3) * r
        mask = ((k - pos[0]) ** 2 + (j - pos[1]) ** 2 + (i - pos[2]) ** 2 <= rad ** 2) & head
        arr = arr + np.where(mask, 80.0, 0.0)
    if condition == "skull":
        arr = arr + np.where((d > 0.7) & head, 130.0, 0.0)
    elif condition != "plain":
        raise ValueError(condition)
    arr = arr + rng.normal(0, 4, arr.shape)
    geo = dict(spacing=(4.0, 4.0, 4.0), origin=(-96.0, -96.0, -96.0), direction=IDENTITY)
    return Image(array=arr.astype(np.float32), **geo), Image(array=mask.astype(np.uint8), **geo)


def tiny_card(version: str = "0.0.1") -> ModelCard:
    return ModelCard(name=MODEL, version=version, classes=list(CLASSES), grid_size=32, grid_spacing_mm=6.0,
                     arch_kwargs=dict(spatial_dims=3, in_channels=1, num_classes=len(CLASSES), seg_channels=2,
                                      channels=[4, 8, 8, 16]),
                     cam_layer="encoder_out")


def pretrain(model: LesionModel, images: list[tuple[Image, Image]], steps: int = 200, lr: float = 3e-3) -> None:
    """Train ``model.net`` from scratch (batch-norm in train mode, as ``xai train`` does) with the
    fine-tune's loss and augmentation; leaves it in eval mode."""
    from monai.losses import DiceCELoss

    from xai_core.train import augment

    samples = [to_sample(model, im, lb) for im, lb in images]
    net = model.net.train()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True)
    for _ in range(steps):
        idx = torch.randint(len(samples), (4,), generator=g).tolist()
        x, m = augment(torch.stack([samples[i].x for i in idx]), torch.stack([samples[i].m for i in idx]), g)
        loss = loss_fn(net(x).seg_logits, m[:, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()


def write_pretrained_model(weights_dir: Path, version: str = "0.0.1") -> Path:
    """A tiny ``brain-lesion-3d`` trained on plain (skull-stripped) heads, written as ``xai train``
    writes it; returns the card path."""
    torch.manual_seed(0)
    card = tiny_card(version)
    model = LesionModel(card, build_network(card).eval(), torch.device("cpu"))
    pretrain(model, [blob_study(s, "plain", lesion=s % 5 != 0) for s in range(16)])
    weights_dir.mkdir(parents=True, exist_ok=True)
    pt = weights_dir / f"{MODEL}.pt"
    torch.save({k: v.detach().cpu() for k, v in model.net.state_dict().items()}, pt)
    card.weights_sha256 = sha256(pt)
    card_path = weights_dir / f"{MODEL}.json"
    card_path.write_text(card.model_dump_json(indent=2))
    return card_path


def pretrained_card(tmp_path_factory) -> Path:
    """The pretrained tiny model, trained once per test session (this module and the server test's)."""
    folder = tmp_path_factory.getbasetemp() / "tiny_pretrained"
    card = folder / f"{MODEL}.json"
    return card if card.is_file() and card.with_suffix(".pt").is_file() else write_pretrained_model(folder)


@pytest.fixture(scope="module")
def base_card(tmp_path_factory) -> Path:
    return pretrained_card(tmp_path_factory)


@pytest.fixture
def base(base_card) -> LesionModel:
    return load_card_file(base_card, device="cpu")


def samples_of(model: LesionModel, condition: str, seeds: range):
    # Every fifth study has no lesion, as some corrected labels will (a "none" study).
    return [to_sample(model, *blob_study(s, condition, lesion=s % 5 != 0), key=f"{condition}{s}") for s in seeds]


def mean_dice(net, samples) -> float:
    return float(np.mean(dice_per_sample(net, samples, torch.device("cpu"))))


# --------------------------------------------------------------------------------------------- tests

def test_the_tiny_base_is_weak_on_skull_on_heads(base):
    """The premise of the next test: the base segments plain heads well and skull-on heads worse."""
    plain = mean_dice(base.net, samples_of(base, "plain", range(200, 210)))
    skull = mean_dice(base.net, samples_of(base, "skull", range(200, 210)))
    assert plain > 0.7 and skull < plain - 0.1, (plain, skull)


WEAK_CFG = FinetuneSettings(parts="head", lr=3e-3, max_epochs=20, patience=6)


def test_finetune_on_weak_condition_labels_raises_validation_and_heldout_dice(base):
    train = samples_of(base, "skull", range(100, 112))
    held_out = samples_of(base, "skull", range(300, 310))
    reports = []
    out = finetune(base, train, WEAK_CFG, progress=reports.append)
    assert out.scheme == "holdout" and out.n_validation == 3  # 12 labels: hold-out, ceil(0.25 * 12)
    assert out.better and out.after > out.before + 0.02, (out.before, out.after)
    # The curve starts at the base's figure and has one point per epoch; progress reached 1.
    assert out.curve[0]["epoch"] == 0 and out.curve[0]["val_dice"] == pytest.approx(out.before, abs=1e-4)
    assert [c["epoch"] for c in out.curve] == list(range(len(out.curve)))
    progress = [r["progress"] for r in reports]
    assert progress == sorted(progress) and 0 <= progress[0] and progress[-1] <= 1 and len(reports) == len(out.curve)
    tuned = LesionModel(base.card, build_network(base.card).eval(), torch.device("cpu"))
    tuned.net.load_state_dict(out.state)
    # Studies no step of the fine-tune saw, in the weak condition (measured: 0.24 -> 0.74).
    before, after = mean_dice(base.net, held_out), mean_dice(tuned.net, held_out)
    assert after > before + 0.2, (before, after)


def replay_sets_of(model: LesionModel) -> tuple[list, list]:
    """Rehearsal studies and the guard's check set of the original condition (plain heads), disjoint
    from the labels and from the held-out studies of the tests."""
    return samples_of(model, "plain", range(500, 516)), samples_of(model, "plain", range(600, 608))


def test_finetune_on_weak_condition_labels_keeps_the_original_condition(base):
    """Rehearsal: without it the head forgets plain heads (measured 0.87 -> 0.50, next test); with
    plain heads replayed in every mini-batch it learns the skull-on ones and keeps the plain ones."""
    replay, check = replay_sets_of(base)
    out = finetune(base, samples_of(base, "skull", range(100, 112)), WEAK_CFG, replay=replay, replay_check=check)
    assert out.better and out.reason == "better on the labels", (out.reason, out.original())
    tuned = build_network(base.card).eval()
    tuned.load_state_dict(out.state)
    plain = samples_of(base, "plain", range(300, 310))
    before, after = mean_dice(base.net, plain), mean_dice(tuned, plain)
    assert after > before - 0.05, (before, after)
    skull = samples_of(base, "skull", range(300, 310))
    assert mean_dice(tuned, skull) > mean_dice(base.net, skull) + 0.2  # and it still learns the weak condition
    check_doc = out.validation()["original_condition"]
    assert check_doc["n_studies"] == 8 and check_doc["n_replay"] == 16 and check_doc["kept"]
    assert check_doc["drop"] <= WEAK_CFG.max_original_drop


def test_guard_refuses_a_version_that_forgets_the_original_condition(base):
    """Without rehearsal the weights are better on the (skull-on) labels but lose the plain heads: the
    guard's second condition refuses them, with the figures."""
    _, check = replay_sets_of(base)
    cfg = replace(WEAK_CFG, replay_per_batch=0)
    out = finetune(base, samples_of(base, "skull", range(100, 112)), cfg, replay_check=check)
    assert out.after > out.before + 0.02, (out.before, out.after)  # better on the labels ...
    doc = out.original()
    assert not out.better and out.state is None and out.reason == "forgets the original condition"
    assert doc["drop"] > cfg.max_original_drop and not doc["kept"], doc  # ... but forgets
    lesion = [smp for smp in check if smp.m.any()]
    assert 0 < len(lesion) < len(check) and doc["n_lesion_studies"] == len(lesion)  # the others are not scored
    assert doc["before"] == pytest.approx(mean_dice(base.net, lesion), abs=1e-4)
    assert out.validation()["better"] is False and out.candidate is not None


def test_guard_publishes_the_largest_interpolation_that_keeps_the_original_condition(base):
    """WiSE-FT: the decoder tuned on skull-on labels without rehearsal loses 0.10 on plain heads
    (measured 0.794 -> 0.695), more than a bound of 0.05. The guard then tries the weights 0.9, 0.8, ...
    of the way from the base and publishes the first that is better on the labels and keeps the bound
    (measured: alpha 0.1, plain heads 0.757); the published weights are exactly that interpolation."""
    _, check = replay_sets_of(base)
    cfg = replace(WEAK_CFG, lr=1e-3, replay_per_batch=0, max_original_drop=0.05, interpolation_steps=10)
    out = finetune(base, samples_of(base, "skull", range(100, 112)), cfg, replay_check=check)
    tries = out.interpolation
    assert [t["alpha"] for t in tries][:2] == [1.0, 0.9] and tries[0]["better"] and not tries[0]["kept"], tries
    assert out.better and out.alpha < 1.0 and out.reason.startswith(f"better on the labels at alpha {out.alpha:g}")
    assert all(not t["kept"] for t in tries[:-1]) and tries[-1]["alpha"] == out.alpha and tries[-1]["kept"]
    doc = out.original()
    assert doc["kept"] and doc["drop"] <= cfg.max_original_drop
    assert doc["after"] == round(tries[-1]["original_after"], 5)
    assert out.after == pytest.approx(tries[-1]["val_after"], abs=1e-5) and out.after > out.before
    base_state, tuned = base.net.state_dict(), out.candidate
    for k, v in out.state.items():
        want = base_state[k] + out.alpha * (tuned[k] - base_state[k]) if v.is_floating_point() else tuned[k]
        torch.testing.assert_close(v, want.to(v.dtype), rtol=1e-5, atol=1e-6)
    assert not torch.equal(out.state["seg_head.1.conv.weight"], tuned["seg_head.1.conv.weight"])
    net = build_network(base.card).eval()
    net.load_state_dict(out.state)  # what the guard measured is what is published
    lesion = [smp for smp in check if smp.m.any()]
    assert mean_dice(net, lesion) == pytest.approx(doc["after"], abs=1e-4)
    assert out.validation()["alpha"] == out.alpha and out.validation()["interpolation"] == tries


def test_guard_refuses_weights_that_are_worse_on_validation(base):
    """A learning rate of 1 on every part wrecks the network: the run ends not better, with both
    figures, and hands back no weights."""
    labels = samples_of(base, "plain", range(100, 112))
    out = finetune(base, labels, FinetuneSettings(parts="all", lr=1.0, max_epochs=3, patience=3, augment=False))
    assert not out.better and out.state is None
    assert out.after < out.before and out.before > 0.5, (out.before, out.after)
    v = out.validation()
    assert v["before"] == round(out.before, 5) and v["after"] == round(out.after, 5) and v["gain"] < 0


def test_guard_threshold_min_improvement(base):
    labels = samples_of(base, "skull", range(100, 112))
    cfg = FinetuneSettings(parts="head", lr=3e-3, max_epochs=6, patience=6, min_improvement=1.0)
    out = finetune(base, labels, cfg)
    assert not out.better and out.state is None and out.after <= out.before + 1.0


def test_few_labels_are_cross_validated_and_refit_on_all(base):
    labels = samples_of(base, "skull", range(100, 105))
    out = finetune(base, labels, FinetuneSettings(parts="head", lr=3e-3, max_epochs=6, patience=3))
    assert out.scheme == "5-fold" and len(out.folds) == 5 and out.n_validation == 5
    assert sorted(k for f in out.folds for k in f["images"]) == sorted(s.key for s in labels)
    assert 1 <= out.final_epochs <= 6
    assert (out.state is not None) == out.better


def test_splits_are_disjoint_and_cover_every_label():
    cfg = FinetuneSettings(seed=3)
    tr, va = split_holdout(10, cfg)
    assert sorted(tr + va) == list(range(10)) and len(va) == 3 and not set(tr) & set(va)
    assert split_holdout(2, cfg)[1] and split_holdout(2, cfg)[0]  # one each: never an empty side
    folds = split_kfold(7, cfg)
    assert len(folds) == 5 and sorted(i for f in folds for i in f) == list(range(7))
    assert len(split_kfold(3, cfg)) == 3
    with pytest.raises(ValueError, match="at least 2"):
        finetune(None, [object()], cfg)  # type: ignore[arg-type]


def test_splits_hold_out_a_lesion_label_whenever_two_exist():
    """Lesion-free labels alone would make a validation set that scores every epoch alike."""
    positive = [i in (3, 8) for i in range(10)]  # 2 lesion labels of 10, as a weak condition's pool may give
    for seed in range(20):
        cfg = replace(FinetuneSettings(), seed=seed)
        tr, va = split_holdout(10, cfg, positive)
        assert sorted(tr + va) == list(range(10)) and len(va) == 3
        assert any(positive[i] for i in va) and any(positive[i] for i in tr), (seed, tr, va)
        folds = split_kfold(10, replace(cfg, folds=2), positive)
        assert all(sum(positive[i] for i in f) == 1 for f in folds), folds  # one lesion label per fold
    with pytest.raises(ValueError, match="lesion flags"):
        split_holdout(4, FinetuneSettings(), [True, False])


def test_validation_keeps_an_epoch_of_the_annealed_half_only(base):
    """Epochs of the run's first half (``select_from`` 0.5, the high end of the one-cycle rate) are
    validated and shown but never kept, and patience counts from the first selectable epoch; a run that
    ends before one (a stop request) keeps the best epoch it has."""
    labels = samples_of(base, "skull", range(100, 112))
    train, val = labels[:9], labels[9:]
    cfg = FinetuneSettings(parts="head", lr=3e-3, max_epochs=8, patience=1, min_steps_per_epoch=1, keep="best")
    r = fit(base, train, val, cfg)
    epochs = [c for c in r.curve if c["epoch"] > 0]
    assert [c["selectable"] for c in epochs[:4]] == [False] * 4 and all(c["selectable"] for c in epochs[4:])
    assert len(epochs) >= 6  # epoch 5 is the first selectable one, and patience 1 allows one more
    selectable = [c for c in epochs if c["selectable"]]
    best = max(selectable, key=lambda c: (c["val_dice"], -c["epoch"]))
    assert r.best_epoch == best["epoch"] and pooled_dice(r.after) == pytest.approx(best["val_dice"], abs=1e-5)
    net = build_network(base.card).eval()
    net.load_state_dict(r.state)
    assert pooled_dice(overlaps(net, val, torch.device("cpu"))) == pytest.approx(best["val_dice"], abs=1e-5)
    anywhere = fit(base, train, val, replace(cfg, select_from=0.0))
    assert all(c["selectable"] for c in anywhere.curve[1:])
    stopped = fit(base, train, val, cfg, should_stop=lambda: True)
    assert stopped.best_epoch == 1 and len(stopped.curve) == 2 and not stopped.curve[1]["selectable"]
    assert not all(torch.equal(v, base.net.state_dict()[k]) for k, v in stopped.state.items())


def test_keep_average_publishes_the_mean_of_the_selectable_epochs_weights(base, monkeypatch):
    """``keep="average"``: the run keeps the mean of the weights after each epoch of its second half
    (stochastic weight averaging), and its validation figure is that mean's."""
    import lib.trainers.finetune as ft

    seen: list[dict[str, torch.Tensor]] = []
    scored = ft.overlaps

    def recording(net, samples, device, batch=4):  # fit scores the base, then every epoch's net
        seen.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return scored(net, samples, device, batch)

    monkeypatch.setattr(ft, "overlaps", recording)
    labels = samples_of(base, "skull", range(100, 112))
    train, val = labels[:9], labels[9:]
    cfg = FinetuneSettings(parts="head", lr=3e-3, max_epochs=8, patience=8, min_steps_per_epoch=1, keep="average")
    r = fit(base, train, val, cfg)
    assert r.averaged == (5, 8) and r.best_epoch == 8
    epochs = seen[1:9]  # after epochs 1..8; seen[0] is the base, seen[9] the average being scored
    name = next(k for k, v in r.state.items() if v.is_floating_point() and not torch.equal(v, epochs[4][k]))
    mean = torch.stack([e[name] for e in epochs[4:]]).mean(0)
    assert torch.allclose(r.state[name], mean, atol=1e-6)
    assert not torch.allclose(r.state[name], epochs[-1][name], atol=1e-6)  # not the last epoch's
    for k, v in r.state.items():
        if v.is_floating_point():
            assert torch.allclose(v, torch.stack([e[k] for e in epochs[4:]]).mean(0), atol=1e-5), k
    assert all(torch.equal(seen[9][k], v) for k, v in r.state.items())
    monkeypatch.setattr(ft, "overlaps", scored)
    net = build_network(base.card).eval()
    net.load_state_dict(r.state)
    assert pooled_dice(r.after) == pytest.approx(pooled_dice(overlaps(net, val, torch.device("cpu"))), abs=1e-6)
    # k-fold: each fold stops at epoch 4, so the refit on all 4 labels runs 4 epochs and averages 3-4
    # (min_improvement -1: judged "better" whatever the figures, so the refit runs).
    out = finetune(base, labels[:4], replace(cfg, max_epochs=4, kfold_below=10, folds=2, min_improvement=-1.0))
    assert [f["averaged_epochs"] for f in out.folds] == [[3, 4], [3, 4]] and out.final_epochs == 4
    assert out.averaged == (3, 4) and out.validation()["averaged_epochs"] == [3, 4]


def test_when_validation_dice_ties_the_probabilities_decide(base, monkeypatch):
    """A contrast the model is blind to: no weights find a voxel of the validation lesions, so their Dice
    is 0.0 for the base and the fine-tune alike (simulated: every hard overlap is empty). The pooled Dice
    of the head's probabilities then decides, and weights that learnt the weak condition are published."""
    import lib.trainers.finetune as ft

    real = ft.overlaps
    monkeypatch.setattr(ft, "overlaps", lambda *a, **k: [(0, p, t) for _, p, t in real(*a, **k)])
    labels = samples_of(base, "skull", range(100, 112))
    cfg = FinetuneSettings(parts="head", lr=3e-3, max_epochs=6, patience=6, interpolation_steps=2)
    out = finetune(base, labels, cfg)
    first = out.interpolation[0]
    assert out.before == 0.0 and first["val_after"] == 0.0 and first["soft_after"] > first["soft_before"] + 0.01
    assert out.better and out.alpha == 1.0 and "the probabilities decided" in out.reason, out.reason
    # The figure is the pooled Dice of the probabilities: the base's, recomputed here.
    val = [labels[i] for i in split_holdout(len(labels), cfg, [bool(x.m.any()) for x in labels])[1]]
    assert first["soft_before"] == pytest.approx(pooled_dice(ft.soft_overlaps(base.net, val, torch.device("cpu"))),
                                                 abs=1e-5)
    # A tie is not a pass when the probabilities say worse: a run of lr 1 wrecks the head.
    wrecked = finetune(base, labels, replace(cfg, lr=1.0, max_epochs=2, augment=False))
    assert not wrecked.better and wrecked.interpolation[0]["soft_after"] <= wrecked.interpolation[0]["soft_before"]


def test_validation_dice_is_pooled_over_the_labels(base):
    """A lesion-free label with a few false voxels costs those voxels, not a whole study's Dice."""
    assert pooled_dice([(90, 100, 100), (0, 10, 0)]) == pytest.approx(180 / 210)
    assert pooled_dice([(0, 0, 0), (0, 0, 0)]) == 1.0 and pooled_dice([(0, 5, 0)]) == 0.0
    # The per-study mean would be (0.9 + 0.0) / 2 = 0.45 for the same two labels.
    with_lesion = samples_of(base, "plain", range(941, 943))  # 940 would be lesion-free
    counts = overlaps(base.net, with_lesion, torch.device("cpu"))
    per_study = dice_per_sample(base.net, with_lesion, torch.device("cpu"))
    for (inter, pred, truth), d in zip(counts, per_study, strict=True):
        assert truth > 0 and 2 * inter / (pred + truth) == pytest.approx(d)
    assert min(per_study) - 1e-9 <= pooled_dice(counts) <= max(per_study) + 1e-9


def test_head_only_leaves_encoder_and_classification_unchanged(base):
    labels = samples_of(base, "skull", range(100, 112))
    out = finetune(base, labels, FinetuneSettings(parts="head", lr=3e-3, max_epochs=3, patience=3))
    assert out.better, "the assertions below need published weights"
    before = base.net.state_dict()
    changed = {k for k, v in out.state.items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("dec2.", "dec1.", "seg_head.")) for k in changed), changed
    assert set(trainable_names(base.net, "head")) <= set(out.state)


def test_last_stages_hold_class_logits_near_the_base(base):
    """When the class path learns, distillation keeps the class logits near the base's."""
    labels = samples_of(base, "skull", range(100, 112))
    cfg = FinetuneSettings(parts="last_stages", lr=3e-3, max_epochs=4, patience=4, min_improvement=-1.0)
    out = finetune(base, labels, cfg)
    tuned = build_network(base.card).eval()
    tuned.load_state_dict(out.state)
    before = base.net.state_dict()
    assert any(not torch.equal(out.state[k], before[k]) for k in out.state if k.startswith("down2."))
    x = torch.stack([s.x for s in samples_of(base, "skull", range(400, 404))])
    with torch.no_grad():
        p0, p1 = torch.softmax(base.net(x).class_logits, 1), torch.softmax(tuned(x).class_logits, 1)
    assert float((p0 - p1).abs().max()) < 0.15


def test_bad_settings_are_refused():
    for bad in (dict(parts="encoder"), dict(split="loo"), dict(lr=0), dict(batch_size=0), dict(folds=1),
                dict(val_fraction=1.0), dict(lr=float("nan")), dict(select_from=1.0), dict(keep="swa")):
        with pytest.raises(ValueError):
            FinetuneSettings(**bad)


# ------------------------------------------------------------------------------------------ versions

@pytest.fixture
def raw() -> LesionModel:
    """An untrained tiny model: enough for what does not look at the weights' quality."""
    torch.manual_seed(0)
    card = tiny_card()
    card.weights_sha256 = "0" * 64
    return LesionModel(card, build_network(card).eval(), torch.device("cpu"))


def test_versions_are_named_by_lineage_and_activation_moves_a_pointer(tmp_path, raw):
    base = raw
    store = VersionStore(tmp_path, MODEL)
    assert store.versions() == [] and store.active() is None
    v1 = store.publish(base.net, base.card, training={"labels": []}, metrics={"validation": {"after": 0.7}})
    assert v1.version == "0.0.1+ft1" and v1.name == MODEL
    assert v1.weights_sha256 == sha256(tmp_path / "versions" / MODEL / "0.0.1+ft1.pt")
    # A fine-tune of the fine-tune continues the numbering; names never grow.
    v2 = store.publish(base.net, v1, training={}, metrics={})
    assert v2.version == "0.0.1+ft2" and v2.training["parent"]["version"] == "0.0.1+ft1"
    # A new release starts its own numbering.
    assert store.next_version("0.0.2") == "0.0.2+ft1" and store.next_version("0.0.1+ft1") == "0.0.1+ft3"
    assert store.versions() == ["0.0.1+ft1", "0.0.1+ft2"]
    own = base.card.model_dump()
    assert [x["version"] for x in store.lineage("0.0.1+ft2", own)] == ["0.0.1", "0.0.1+ft1", "0.0.1+ft2"]
    assert store.lineage("0.0.1+ft2", own)[0]["weights_sha256"] == base.card.weights_sha256

    store.activate("0.0.1+ft2")
    assert store.active() == "0.0.1+ft2" and store.active_files()[0].name == "0.0.1+ft2.json"
    store.activate("0.0.1+ft1")
    assert store.rollback()["active"] == "0.0.1+ft2"
    assert store.rollback()["active"] is None  # back to the model's own weights
    with pytest.raises(VersionError, match="nothing to roll back"):
        store.rollback()
    for bad in ("0.0.1+ft9", "../x+ft1", "0.0.1", "0.0.1+ft1+ft2"):
        with pytest.raises(VersionError):
            store.activate(bad)
    summary = store.summary(own)
    assert summary["active_version"] == "0.0.1" and [v["version"] for v in summary["versions"]] == store.versions()


def test_a_version_whose_weights_changed_is_refused(tmp_path, raw):
    base = raw
    store = VersionStore(tmp_path, MODEL)
    card = store.publish(base.net, base.card, training={}, metrics={})
    assert store.load(card.version).card.version == card.version
    pt = store.files(card.version)[1]
    pt.write_bytes(pt.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(VersionError, match="sha256"):
        store.load(card.version)
    # The card records what it was built from.
    doc = json.loads(store.files(card.version)[0].read_text())
    assert doc["training"]["display_name"] == f"{MODEL}@{card.version}"


def test_replay_studies_are_generated_once_with_the_original_condition_and_cached(tmp_path, base, monkeypatch):
    """The trainer's rehearsal set: generated once (seeded, the generator's defaults: skull-off T1)
    into the state dir, then read from there; the check set is the same studies with or without
    rehearsal."""
    from lib.trainers import seg_head

    import xai_core.data.brain as brain
    from xai_core.io import write_image

    calls = []

    def fake_make(n, seed, out, workers=None, progress=None, options=None):
        # The tiny model's original condition (plain heads) stands in for the brain generator.
        calls.append((n, seed, options))
        out = Path(out)
        (out / "labels").mkdir(parents=True, exist_ok=True)
        lines = ["study_id,image,mask"]
        for i in range(n):
            image, mask = blob_study(seed + i, "plain", lesion=i % 5 != 0)
            write_image(image, out / f"p{i}.nii.gz")
            write_image(mask, out / "labels" / f"p{i}.nii.gz")
            lines.append(f"p{i},p{i}.nii.gz,labels/p{i}.nii.gz")
        (out / "manifest.csv").write_text("\n".join(lines) + "\n")

    monkeypatch.setattr(brain, "make_brain_studies", fake_make)
    cfg = FinetuneSettings(replay_studies=3, replay_check_studies=2, replay_seed=11)
    replay, check, info = seg_head.replay_sets(base, tmp_path, cfg)
    assert calls == [(5, 11, brain.BrainOptions())] and brain.BrainOptions() == brain.BrainOptions(
        templates=("mni152",), skull="off", contrasts=("t1",))
    assert [s.key for s in replay] == ["p0", "p1", "p2"] and [s.key for s in check] == ["p3", "p4"]
    assert info["n_replay"] == 3 and info["n_check"] == 2
    assert info["folder"] == str(tmp_path / "replay" / "original-s11")
    assert replay[0].x.shape[1:] == (32, 32, 32) and not replay[0].m.any() and replay[1].m.any()
    # Cached: no second generation; without rehearsal only the check set is read, the same studies.
    replay2, check2, _ = seg_head.replay_sets(base, tmp_path, replace(cfg, replay_per_batch=0))
    assert len(calls) == 1 and replay2 == [] and [s.key for s in check2] == ["p3", "p4"]
    assert torch.equal(check2[0].x, check[0].x)

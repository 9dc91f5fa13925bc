"""Randomisation sanity checks (xai_core.sanity): the cascade of Grad-CAM on the shipped model, a method that
ignores the model fails and is flagged in its findings, the similarity measures, label randomisation."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from xai_core.findings import quality_flags
from xai_core.sanity import (
    ORIGINAL,
    aggregate,
    cascade,
    label_randomisation,
    recorded_verdict,
    spearman,
    ssim,
    write_sanity,
)
from xai_core.settings import Settings


def test_gradcam_cascade_on_the_trained_model_falls_below_0_3(default_model, heldout_studies):
    from xai_core.io import read_image

    row = next(r for r in heldout_studies if r["label"] != "none")
    inputs = default_model.prepare(read_image(row["image"]))
    before = default_model.forward_func()(inputs.tensor).detach().clone()
    res = cascade(default_model, inputs, "gradcam", target=row["label"], settings=Settings(sanity_seed=0))
    layers = [s.layer for s in res.steps]
    assert layers == [ORIGINAL, "classifier", "encoder_seg", "encoder_body", "down2", "down1", "stem"]
    assert res.steps[0].rank_correlation == 1.0 and not res.steps[0].flat
    assert res.final_rank_correlation < 0.3 and res.passed
    # Not one lucky step: once the encoder below the CAM layer is random too, the map stays unrelated.
    assert max(abs(s.rank_correlation) for s in res.steps[-3:]) < 0.3
    assert torch.equal(default_model.forward_func()(inputs.tensor), before)  # the original is untouched


class _EdgeMaps:
    """A 'method' that ignores the model: the gradient magnitude of the input (an edge detector)."""

    def attribute(self, inputs, target=None, additional_forward_args=None):
        x = inputs[0][0, 0].numpy()
        g = np.sqrt(sum(d ** 2 for d in np.gradient(x)))
        m = torch.from_numpy((g / g.max()).astype(np.float32))[None, None]
        return SimpleNamespace(maps=m, flat=torch.zeros(1, 1, dtype=torch.bool))


class _ModelGradMaps:
    """A 'method' that is the model's own input gradient (changes with the weights)."""

    def __init__(self, net):
        self.net = net

    def attribute(self, inputs, target=None, additional_forward_args=None):
        x = inputs[0].clone().requires_grad_(True)
        self.net(x)[0, 1].backward()
        g = x.grad[0, 0].abs()
        return SimpleNamespace(maps=(g / g.max())[None, None], flat=torch.zeros(1, 1, dtype=torch.bool))


class _TinyAdapter:
    """The parts of a model adapter that the cascade uses, on a small 3-D CNN."""

    classes = ["a", "b"]
    card = SimpleNamespace(name="tiny-sanity", version="9.9")

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(),
                                       torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.Tanh(),
                                       torch.nn.Flatten(), torch.nn.Linear(4 * 12 ** 3, 2))

    def forward_func(self):
        return self.net

    def explainer(self, method):
        return _EdgeMaps() if method == "edges" else _ModelGradMaps(self.net)

    def cascade_layers(self):
        return ["5", "2", "0"]

    def randomised(self, layer, seed=0):
        clone = copy.copy(self)
        clone.net = copy.deepcopy(self.net)
        torch.manual_seed(seed + 1)
        for name in self.cascade_layers()[: self.cascade_layers().index(layer) + 1]:
            clone.net.get_submodule(name).reset_parameters()
        return clone


def _inputs():
    rng = np.random.default_rng(0)
    x = np.zeros((12, 12, 12), np.float32)
    x[3:9, 3:9, 3:9] = 1.0
    x += 0.05 * rng.standard_normal(x.shape).astype(np.float32)
    return SimpleNamespace(inputs=(torch.from_numpy(x)[None, None],), additional_forward_args=())


def test_a_method_that_ignores_the_model_fails_and_is_flagged(tmp_path):
    model, inputs = _TinyAdapter(), _inputs()
    cfg = Settings(sanity_verdicts=tmp_path / "verdicts.json", faithfulness_foreground=-1.0)
    edge = cascade(model, inputs, "edges", target=1, settings=cfg, study_id="x")
    grad = cascade(model, inputs, "grad", target=1, settings=cfg, study_id="x")
    assert all(s.rank_correlation == pytest.approx(1.0) for s in edge.steps) and not edge.passed
    assert grad.passed and grad.final_rank_correlation < 0.5

    paths = write_sanity([edge, grad], tmp_path / "out", settings=cfg)
    v = json.loads(paths["verdicts"].read_text())
    assert v["edges"]["passed"] is False and v["grad"]["passed"] is True
    assert "**fails**" in paths["markdown"].read_text() and paths["plot"].stat().st_size > 10_000
    assert len(aggregate([edge, grad])) == 2 * 4

    verdict = recorded_verdict("edges", "tiny-sanity", "9.9", cfg)
    assert verdict["final_rank_correlation"] == pytest.approx(1.0)
    assert recorded_verdict("edges", "tiny-sanity", "other-version", cfg) is None
    assert recorded_verdict("grad", "tiny-sanity", "9.9", cfg)["passed"]

    # The findings of that method carry the flag; a passing method's do not.
    f = SimpleNamespace(registration=None, location=None, explanation=SimpleNamespace(flat=[False], targets=["b"],
                                                                                       method="edges"),
                        mask=SimpleNamespace(empty=False), prediction=SimpleNamespace(label="b"),
                        counterfactual=SimpleNamespace(status="done", change=-0.5, label_before="b"))
    codes = [q.code for q in quality_flags(f, verdict)]
    assert codes == ["failed_sanity_check"]
    assert quality_flags(f, recorded_verdict("grad", "tiny-sanity", "9.9", cfg)) == []
    assert quality_flags(f) == []


def test_similarity_measures():
    rng = np.random.default_rng(1)
    a = rng.random((10, 12, 9))
    assert spearman(a, a) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.zeros_like(a)) == 0.0  # a flat map has no ranking to share
    within = np.zeros(a.shape, bool)
    within[:5] = True
    b = a.copy()
    b[5:] = rng.random(b[5:].shape)
    assert spearman(a, b, within) == pytest.approx(1.0) and spearman(a, b) < 0.9
    assert ssim(a, a) == pytest.approx(1.0) and ssim(a, rng.random(a.shape)) < 0.2
    assert ssim(a[0], a[0]) == pytest.approx(1.0)  # 2-D too


def test_label_randomisation_mechanics(heldout_studies):
    rows = heldout_studies[:4]
    out = label_randomisation(rows, ["gradcam"], epochs=3, grid_size=24, grid_spacing_mm=8.0)
    assert [r["study_id"] for r in out] == [r["study_id"] for r in rows]
    assert all(-1.0 <= r["rank_correlation"] <= 1.0 and 0.0 <= r["train_accuracy_permuted"] <= 1.0 for r in out)

"""The ``least_sure`` active-learning strategy (issue 18 item 4): its two signals on models whose
answers are set by hand, and the ranking over a datastore (labelled studies skipped, scores cached
per weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "monai_app"))  # the app's modules import as ``lib.*`` (as MONAI Label loads them)

import lib.activelearning.uncertainty as al  # noqa: E402

from xai_core.data.brain import CLASSES  # noqa: E402
from xai_core.io import Image, write_image  # noqa: E402
from xai_core.models import LesionModel, ModelCard, build_network  # noqa: E402

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def head(seed: int = 0, n: int = 40) -> Image:
    rng = np.random.default_rng(seed)
    k, j, i = np.ogrid[:n, :n, :n]
    c = (n - 1) / 2
    inside = ((k - c) ** 2 + (j - c) ** 2 + (i - c) ** 2) <= (0.4 * n) ** 2
    arr = np.where(inside, 100.0, 0.0) + rng.normal(0, 3, (n, n, n))
    return Image(array=arr.astype(np.float32), spacing=(4.0, 4.0, 4.0), origin=(-80.0, -80.0, -80.0),
                 direction=IDENTITY)


def model_with(class_bias: list[float], seg_bias: tuple[float, float], sha: str = "a" * 64) -> LesionModel:
    """A tiny model whose class logits are ``class_bias`` whatever the input, and whose segmentation
    head says background (``seg_bias`` (10, -10)) or lesion (``(-10, 10)``) everywhere."""
    torch.manual_seed(0)
    card = ModelCard(name="brain-lesion-3d", version="0.0.1", classes=list(CLASSES), grid_size=32,
                     grid_spacing_mm=6.0, cam_layer="encoder_out", weights_sha256=sha,
                     arch_kwargs=dict(spatial_dims=3, in_channels=1, num_classes=len(CLASSES), seg_channels=2,
                                      channels=[4, 8, 8, 16]))
    net = build_network(card).eval()
    with torch.no_grad():
        lin = net.classifier[1]
        # A small weight keeps a gradient for Grad-CAM++; the bias decides the class.
        lin.weight.mul_(1e-3)
        lin.bias.copy_(torch.tensor(class_bias))
        last = net.seg_head[1].conv
        last.weight.zero_()
        last.bias.copy_(torch.tensor(seg_bias))
    return LesionModel(card, net, torch.device("cpu"))


def test_a_sure_model_that_segments_nothing_for_none_scores_zero():
    s = al.score_study(model_with([20.0, 0, 0, 0], (10.0, -10.0)), head())
    assert s.label == "none" and s.p_max > 0.999 and s.class_doubt < 1e-3
    assert s.disagreement == 0.0 and s.seg_voxels == 0 and s.score == pytest.approx(s.class_doubt)


def test_equal_class_probabilities_are_full_doubt():
    s = al.score_study(model_with([0.0, 0, 0, 0], (10.0, -10.0)), head())
    assert s.class_doubt == pytest.approx(1.0, abs=1e-3) and s.score == pytest.approx(1.0, abs=1e-3)


def test_a_segmentation_that_disagrees_with_the_saliency_mask_scores_high_though_the_class_is_sure():
    # Sure of "glioma", but the head calls every voxel lesion while the saliency mask is at most a fifth
    # of the head: little overlap.
    s = al.score_study(model_with([0.0, 20.0, 0, 0], (-10.0, 10.0)), head())
    assert s.label == "glioma" and s.class_doubt < 1e-3
    assert s.seg_voxels == 32 ** 3 and 0 < s.mask_voxels < s.seg_voxels
    assert s.disagreement > 0.5 and s.score == s.disagreement


class FakeDatastore:
    def __init__(self, images: dict[str, Path], labelled: set[str]):
        self.images, self.labelled = images, labelled

    def list_images(self) -> list[str]:
        return sorted(self.images)

    def get_label_uri(self, image_id: str, tag: str) -> str:
        return f"/labels/{tag}/{image_id}" if image_id in self.labelled and tag == "final" else ""

    def get_image_uri(self, image_id: str) -> str:
        return str(self.images[image_id])


class FakeCache:
    def __init__(self, model: LesionModel):
        self.model = model

    def get(self) -> LesionModel:
        return self.model


def test_least_sure_ranks_unlabelled_studies_and_caches_per_weights(tmp_path, monkeypatch):
    images = {}
    for n, sid in enumerate(["a", "b", "c", "d"]):
        images[sid] = write_image(head(n), tmp_path / f"{sid}.nii.gz")
    set_scores = {"a": 0.2, "b": 0.9, "c": 0.5, "d": 0.99}
    calls = []

    def fake_score(model, image, method="gradcam++", settings=None):
        # Identify the study by its noise (each was written with its own seed).
        sid = min(set_scores, key=lambda k: abs(float(image.array.std()) - float(head("abcd".index(k)).array.std())))
        calls.append(sid)
        v = set_scores[sid]
        return al.StudyScore(v, v, 0.0, "glioma", 1 - v, 0, 0)

    monkeypatch.setattr(al, "score_study", fake_score)
    ds = FakeDatastore(images, labelled={"d"})  # d is the least sure but already has a label
    strategy = al.LeastSure(FakeCache(model_with([0.0, 0, 0, 0], (10.0, -10.0))), tmp_path / "state")
    pick = strategy({}, ds)
    assert pick["id"] == "b" and [r["id"] for r in pick["ranking"]] == ["b", "c", "a"]
    assert pick["candidates"] == 3 and sorted(calls) == ["a", "b", "c"]
    # Cached: a second click scores nothing again, also from a fresh strategy reading the state folder.
    assert strategy({}, ds)["id"] == "b"
    fresh = al.LeastSure(FakeCache(strategy.cache.model), tmp_path / "state")
    assert fresh({}, ds)["id"] == "b" and len(calls) == 3
    # New weights (another hash) are scored afresh.
    other = al.LeastSure(FakeCache(model_with([0.0, 0, 0, 0], (10.0, -10.0), sha="b" * 64)), tmp_path / "state")
    assert other({}, ds)["id"] == "b" and len(calls) == 6
    assert strategy({}, FakeDatastore(images, labelled=set(images))) == {}

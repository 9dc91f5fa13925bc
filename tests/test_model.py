"""The shipped default model on fresh held-out studies (a seed never used in training).

The model card states the full figures on 30 held-out studies (accuracy 1.00, mean lesion Dice 0.88;
Grad-CAM++ mask Dice 0.58 in docs/benchmarks.md). These tests check the 12 studies of the
``heldout_studies`` fixture, where the shipped model measured accuracy 1.00, Dice 0.86 and Grad-CAM++
mask Dice 0.58; thresholds are the issue's targets or sit a little below those measurements.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xai_core.evaluate import read_mask
from xai_core.io import read_image
from xai_core.metrics import dice
from xai_core.models import available_models, load, sha256
from xai_core.pipeline import explain
from xai_core.settings import get_settings


@pytest.fixture(scope="module")
def predictions(heldout_studies, default_model):
    out = []
    for r in heldout_studies:
        image = read_image(r["image"])
        out.append((r, image, default_model.predict(image)))
    return out


def test_shipped_model_is_listed_and_its_card_matches_the_weights():
    wdir = get_settings().weights_dir
    assert "brain-lesion-3d" in available_models(wdir)
    card = json.loads((wdir / "brain-lesion-3d.json").read_text())
    assert card["weights_sha256"] == sha256(wdir / "brain-lesion-3d.pt")
    assert card["classes"] == ["none", "glioma", "meningioma", "metastasis"]
    assert card["metrics"]["heldout"]["n"] == 30
    assert card["metrics"]["heldout"]["accuracy"] >= 0.90
    assert card["metrics"]["heldout"]["mean_dice"] >= 0.60
    assert (wdir / "brain-lesion-3d.pt").stat().st_size < 5_000_000


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown model 'no-such-model'"):
        load("no-such-model")


def test_heldout_classification_accuracy(predictions):
    correct = [p.label == r["label"] for r, _, p in predictions]
    assert np.mean(correct) >= 0.90, [(r["label"], p.label) for r, _, p in predictions]


def test_heldout_segmentation_dice_on_the_input_grid(predictions):
    dices = []
    for r, image, p in predictions:
        assert p.lesion_probability.same_geometry(image)
        assert p.lesion_mask.array.dtype == np.uint8
        if r["label"] != "none":
            dices.append(dice(p.lesion_mask.array, read_mask(r["mask"]).array))
    assert len(dices) >= 4
    assert np.mean(dices) >= 0.75, dices


def test_probabilities_are_calibrated_softmax(predictions, default_model):
    for _, _, p in predictions:
        assert p.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
        expected = torch.softmax(torch.from_numpy(p.logits) / default_model.card.temperature, 0).numpy()
        np.testing.assert_allclose(p.probabilities, expected, rtol=1e-5)


def test_gradcampp_masks_overlap_the_lesions(heldout_studies, default_model):
    """Grad-CAM++ masks from the default model reach the issue's mean Dice of 0.5 (measured 0.58)."""
    dices = []
    for r in heldout_studies:
        if r["label"] == "none":
            continue
        exp = explain(read_image(r["image"]), "gradcam++", target=r["label"], model=default_model)
        dices.append(dice(exp.mask.mask, read_mask(r["mask"]).array))
    assert np.mean(dices) >= 0.50, dices


def test_model_eval_figures_agree_with_the_predictions(heldout_studies, default_model, predictions, tmp_path):
    """``xai model-eval`` (via ``model_accuracy``) reports per-class figures consistent with the model's
    own predictions, and ``--card`` writes them into a card as ``metrics.heldout``."""
    from pathlib import Path

    from xai_core.cli import main
    from xai_core.evaluate import model_accuracy

    folder = Path(heldout_studies[0]["mask"]).parent.parent
    res = model_accuracy(folder, default_model, limit=6)
    first = predictions[:6]
    assert res["n"] == 6
    assert res["accuracy"] == pytest.approx(np.mean([p.label == r["label"] for r, _, p in first]))
    for name, acc in res["accuracy_per_class"].items():
        sel = [p.label == r["label"] for r, _, p in first if r["label"] == name]
        assert acc == pytest.approx(np.mean(sel))
    assert "none" not in res["dice_per_class"]
    lesion = [p.label != "none" for r, _, p in first if r["label"] != "none"]
    clear = [p.label == "none" for r, _, p in first if r["label"] == "none"]
    assert res["sensitivity"] == pytest.approx(np.mean(lesion))
    assert (res["specificity"] == pytest.approx(np.mean(clear))) if clear else np.isnan(res["specificity"])
    assert all(0.0 <= v <= 1.0 for v in res["auroc"].values() if not np.isnan(v))
    assert 0.0 <= res["ece_calibrated"] <= 1.0

    card = tmp_path / "card.json"
    card.write_text(json.dumps({"name": "brain-lesion-3d", "metrics": {"validation": {"n": 1}}}))
    assert main(["model-eval", "brain-lesion-3d", "--data", str(folder), "--limit", "2", "--card", str(card),
                 "--card-data", "fixture"]) == 0
    written = json.loads(card.read_text())
    assert written["metrics"]["validation"] == {"n": 1}
    assert written["metrics"]["heldout"]["n"] == 2 and written["metrics"]["heldout"]["data"] == "fixture"
    # A named condition goes beside the historic held-out figures, not over them.
    assert main(["model-eval", "brain-lesion-3d", "--data", str(folder), "--limit", "1", "--card", str(card),
                 "--condition", "skull_on_t2"]) == 0
    written = json.loads(card.read_text())
    assert written["metrics"]["heldout"]["n"] == 2
    assert written["metrics"]["heldout_conditions"]["skull_on_t2"]["n"] == 1

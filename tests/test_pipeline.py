"""The explain pipeline end to end: geometry is kept and the peak lands at the right physical place."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from xai_core.io import Image, read_image
from xai_core.models import LesionModel, ModelCard
from xai_core.models.brain_lesion_net import LesionOutput
from xai_core.pipeline import explain, write_explanation


class BrightSpotNet(nn.Module):
    """Hand-built model: class 1's logit is the mean of ReLU(x - 1.2), so only voxels brighter than
    normal tissue (~1 after intensity normalisation), i.e. the bright spot, drive it; class 0 is its
    negation. The segmentation output marks x > 1.2."""

    default_cam_layer = "encoder_out"

    def __init__(self):
        super().__init__()
        conv = nn.Conv3d(1, 2, kernel_size=1)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([1.0, 0.5]).view(2, 1, 1, 1, 1))
            conv.bias.copy_(torch.tensor([-1.2, -0.6]))
        # Non-negative activations at the hooked layer, as CAM methods assume.
        self.encoder_out = nn.Sequential(conv, nn.ReLU())

    def forward(self, x: torch.Tensor) -> LesionOutput:
        a = self.encoder_out(x)
        score = a.mean(dim=(2, 3, 4)).sum(1, keepdim=True) * 100
        logits = torch.cat([-score, score], dim=1)
        seg = torch.cat([-(x - 1.2), x - 1.2], dim=1)
        return LesionOutput(logits, seg)


def _card() -> ModelCard:
    return ModelCard(name="bright-spot", version="test", classes=["none", "spot"], grid_size=32,
                     grid_spacing_mm=6.0, cam_layer="encoder_out")


def _oblique_image_with_spot(spot_lps: np.ndarray) -> Image:
    """A smooth 'head' volume on an oblique, anisotropic grid with a bright blob at ``spot_lps``."""
    c, s = np.cos(0.4), np.sin(0.4)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    spacing = np.array([1.3, 1.1, 3.0])
    size = np.array([100, 110, 40])  # (i, j, k)
    centre = np.array([5.0, -12.0, 20.0])
    origin = centre - direction @ (spacing * (size - 1) / 2)
    img = Image(np.zeros(size[::-1], np.float32), tuple(spacing), tuple(origin), tuple(direction.flatten()))
    kji = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), axis=-1)
    xyz = img.index_to_physical(kji[..., ::-1].reshape(-1, 3)).reshape(*size[::-1], 3)
    head = np.linalg.norm((xyz - centre) / [70, 85, 55], axis=-1) < 1
    spot = np.exp(-np.sum((xyz - spot_lps) ** 2, axis=-1) / (2 * 6.0**2))
    return img.with_array((1.0 * head + 1.0 * spot).astype(np.float32))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam"])
def test_saliency_keeps_geometry_and_peaks_at_the_physical_spot(method, tmp_path):
    spot = np.array([30.0, -30.0, 25.0])
    image = _oblique_image_with_spot(spot)
    model = LesionModel(_card(), BrightSpotNet(), torch.device("cpu"))
    exp = explain(image, method, model=model, target="spot")

    assert exp.prediction.label == "spot"
    assert exp.primary.same_geometry(image, tol=1e-9)
    assert exp.primary.array.dtype == np.float32
    assert exp.primary.array.max() == pytest.approx(1.0) and exp.primary.array.min() >= 0.0
    peak = np.unravel_index(int(np.argmax(exp.primary.array)), image.array.shape)
    peak_lps = image.index_to_physical(np.array(peak[::-1], float))
    # Within one model-grid voxel (6 mm) of the true spot, in physical space.
    assert np.linalg.norm(peak_lps - spot) < 6.0 * np.sqrt(3)
    assert not exp.mask.empty
    assert exp.mask.mask[peak]

    files = write_explanation(exp, tmp_path)
    for key in ("saliency", "levels", "mask"):
        back = read_image(files[key], dtype=None)
        assert back.same_geometry(image, tol=1e-4), key
    levels = read_image(files["levels"], dtype=None).array
    assert levels.dtype == np.uint8 and levels.max() == len(exp.mask.level_thresholds)
    assert levels[peak] == levels.max()
    result = json.loads(files["result"].read_text())
    assert result["method"] == method and result["prediction"]["label"] == "spot"
    assert np.allclose(result["saliency"]["peak_lps_mm"], peak_lps, atol=1e-2)
    assert set(result["software"]) >= {"xai_core", "torch", "monai"}
    assert files["overlay"].stat().st_size > 10_000


def test_target_all_gives_one_map_per_class_primary_first(tmp_path):
    image = _oblique_image_with_spot(np.array([0.0, 0.0, 20.0]))
    model = LesionModel(_card(), BrightSpotNet(), torch.device("cpu"))
    exp = explain(image, "gradcam", model=model, target="all")
    assert exp.targets == ["spot", "none"]
    assert len(exp.saliency) == 2
    files = write_explanation(exp, tmp_path, overlay=False)
    assert {"saliency_spot", "saliency_none"} <= set(files)


def test_flat_map_gives_empty_mask_not_an_exception():
    """Class 'none' has a negative gradient everywhere: Grad-CAM's ReLU leaves a flat zero map."""
    image = _oblique_image_with_spot(np.array([0.0, 0.0, 20.0]))
    model = LesionModel(_card(), BrightSpotNet(), torch.device("cpu"))
    exp = explain(image, "gradcam", model=model, target="none")
    assert exp.flat == [True]
    assert exp.mask.empty and exp.mask.reason
    assert exp.primary.array.max() == 0.0
    summary = exp.summary()
    assert summary["mask"]["empty"] is True and summary["mask"]["voxels"] == 0


def test_unknown_method_and_target_are_clear_errors():
    image = _oblique_image_with_spot(np.array([0.0, 0.0, 20.0]))
    model = LesionModel(_card(), BrightSpotNet(), torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        explain(image, "nope", model=model)
    with pytest.raises(ValueError, match="unknown target 'glioma'"):
        explain(image, "gradcam", model=model, target="glioma")

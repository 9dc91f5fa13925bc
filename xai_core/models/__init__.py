"""Models by name: model cards, weights, and prediction on any input geometry.

``load("brain-lesion-3d")`` reads the model card (``weights/<name>.json``) and weights
(``weights/<name>.pt``) that the training command wrote, and returns a :class:`LesionModel` that
predicts on an :class:`~xai_core.io.Image` of any geometry: it resamples to the model grid
(:mod:`xai_core.models.grid`), runs the network, and maps the outputs back onto the input grid.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from pydantic import BaseModel, Field

from ..io import Image
from ..settings import get_settings, resolve_device
from .brain_lesion_net import BrainLesionNet, ClassLogits
from .grid import ModelGrid, normalise_intensity, to_tensor

__all__ = ["ModelCard", "LesionModel", "ModelInput", "Prediction", "load", "available_models", "build_network"]

ARCHITECTURES = {"BrainLesionNet": BrainLesionNet}


class ModelCard(BaseModel):
    """What a model is, how it was made and how well it does. Stored next to the weights."""

    name: str
    version: str
    architecture: str = "BrainLesionNet"
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    classes: list[str]
    grid_size: int
    grid_spacing_mm: float
    cam_layer: str = Field(description="dotted module name CAM methods hook by default")
    temperature: float = Field(1.0, description="softmax temperature fitted on validation data")
    calibration: str = "temperature scaling (validation set, NLL)"
    weights_sha256: str = ""
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)


def build_network(card: ModelCard) -> torch.nn.Module:
    return ARCHITECTURES[card.architecture](**card.arch_kwargs)


@dataclass
class ModelInput:
    """A volume on the model grid. ``tensor`` is ``(1, 1, K, J, I)`` float32; ``ref`` the grid."""

    tensor: torch.Tensor
    ref: sitk.Image
    image: Image


@dataclass
class Prediction:
    """Model outputs for one image.

    Attributes:
        logits: raw class logits, shape ``(C,)``.
        probabilities: calibrated class probabilities (softmax of logits / T), shape ``(C,)``.
        label: most probable class name.
        lesion_probability: float32 segmentation-head lesion probability on the *input* grid.
        lesion_mask: uint8 (0/1) lesion mask on the input grid (probability >= 0.5).
    """

    logits: np.ndarray
    probabilities: np.ndarray
    label: str
    lesion_probability: Image
    lesion_mask: Image


class LesionModel:
    """A loaded dual-output model with its card, device and model grid."""

    def __init__(self, card: ModelCard, net: torch.nn.Module, device: torch.device):
        self.card = card
        self.net = net.to(device).eval()
        self.device = device
        self.grid = ModelGrid(card.grid_size, card.grid_spacing_mm)

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    def classifier(self) -> torch.nn.Module:
        """The class-logit view ``(B, 1, K, J, I) -> (B, C)`` that explainers attribute."""
        return ClassLogits(self.net, 0)

    def prepare(self, image: Image) -> ModelInput:
        """Resample and normalise ``image`` onto the model grid."""
        arr, ref = self.grid.to_model(image)
        return ModelInput(to_tensor(normalise_intensity(arr), self.device), ref, image)

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits / self.card.temperature, dim=-1)

    @torch.no_grad()
    def predict(self, image: Image, inputs: ModelInput | None = None) -> Prediction:
        inputs = inputs or self.prepare(image)
        out = self.net(inputs.tensor)
        logits = out.class_logits[0].float()
        probs = self.calibrated(logits).cpu().numpy()
        seg = torch.softmax(out.seg_logits.float(), dim=1)[0, 1].cpu().numpy()
        seg_in = self.grid.to_input(seg, inputs.ref, image)
        return Prediction(
            logits=logits.cpu().numpy(),
            probabilities=probs,
            label=self.classes[int(probs.argmax())],
            lesion_probability=image.with_array(seg_in.astype(np.float32)),
            lesion_mask=image.with_array((seg_in >= 0.5).astype(np.uint8)),
        )


def _weights_dirs(weights_dir: Path | None) -> list[Path]:
    s = get_settings()
    # Fine-tuned weights (user dir) take precedence over the shipped ones, which are never written.
    return [weights_dir] if weights_dir else [s.user_weights_dir, s.weights_dir]


def available_models(weights_dir: Path | None = None) -> list[str]:
    names = set()
    for d in _weights_dirs(weights_dir):
        names |= {p.stem for p in Path(d).glob("*.json") if (p.with_suffix(".pt")).exists()}
    return sorted(names)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load(name: str = "brain-lesion-3d", device: str | torch.device | None = None,
         weights_dir: Path | None = None) -> LesionModel:
    """Load model ``name`` (card + weights) onto ``device`` (default: CUDA when present)."""
    for d in _weights_dirs(weights_dir):
        card_path = Path(d) / f"{name}.json"
        if card_path.exists() and card_path.with_suffix(".pt").exists():
            break
    else:
        raise KeyError(f"unknown model {name!r}; available: {available_models(weights_dir)}")
    card = ModelCard.model_validate(json.loads(card_path.read_text()))
    net = build_network(card)
    state = torch.load(card_path.with_suffix(".pt"), map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() for k, v in state.items()})
    dev = resolve_device(str(device)) if device is not None else resolve_device()
    return LesionModel(card, net, dev)

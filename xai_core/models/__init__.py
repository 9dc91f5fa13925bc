"""Models by name: model cards, weights, and one adapter per model kind.

``load("brain-lesion-3d")`` reads the model card (``weights/<name>.json``) and weights
(``weights/<name>.pt``) that the training command wrote and returns the adapter of the card's
``kind`` (:mod:`xai_core.models.adapter`). Kinds:

* ``volume-classifier``: :class:`LesionModel`, a 3-D classifier with a segmentation head that
  predicts on an :class:`~xai_core.io.Image` of any geometry: it resamples to the model grid
  (:mod:`xai_core.models.grid`), runs the network, and maps the outputs back onto the input grid.
* ``vqa``: :class:`~xai_core.models.vqa.VQAModel` (``brain-vqa``), a question about a slice of a
  volume in patient coordinates; its tokenizer is ``<name>.tokenizer.json`` beside the card.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from ..io import Image
from ..settings import Settings, resolve_device
from .adapter import ModelAdapter, ModelInput
from .brain_lesion_net import BrainLesionNet, ClassLogits
from .grid import ModelGrid, normalise_intensity, to_tensor
from .vqa import VQAModel, VQAPrediction

__all__ = ["ModelCard", "ModelAdapter", "LesionModel", "ModelInput", "Prediction", "load", "available_models",
           "build_network", "ADAPTERS", "load_card_file", "VQAModel", "VQAPrediction"]

ARCHITECTURES = {"BrainLesionNet": BrainLesionNet}


class ModelCard(BaseModel):
    """What a model is, how it was made and how well it does. Stored next to the weights."""

    name: str
    version: str
    kind: str = Field("volume-classifier", description="adapter kind (xai_core.models.ADAPTERS)")
    architecture: str = "BrainLesionNet"
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    classes: list[str]
    grid_size: int
    grid_spacing_mm: float
    cam_layer: str = Field(description="dotted module name CAM methods hook by default")
    layers: dict[str, str] = Field(default_factory=dict,
                                   description="default layer per explanation method (e.g. relig), when not "
                                               "the method's own default")
    temperature: float = Field(1.0, description="softmax temperature fitted on validation data")
    calibration: str = "temperature scaling (validation set, NLL)"
    weights_sha256: str = ""
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)


def build_network(card: ModelCard) -> torch.nn.Module:
    if card.architecture == "BrainVQANet":  # imported on use: transformers is slow to import
        from .brain_vqa import BrainVQANet

        return BrainVQANet(**card.arch_kwargs)
    return ARCHITECTURES[card.architecture](**card.arch_kwargs)


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


class LesionModel(ModelAdapter):
    """Kind ``volume-classifier``: a dual-output 3-D network on an axis-aligned model grid.

    ``prepare`` resamples and normalises the image onto the model grid (``inputs[0]`` is
    ``(1, 1, K, J, I)`` float32); ``to_input`` resamples maps back with the identity transform.
    """

    kind = "volume-classifier"
    output_index = 0

    def __init__(self, card: ModelCard, net: torch.nn.Module, device: torch.device):
        super().__init__(card, net, device)
        self.grid = ModelGrid(card.grid_size, card.grid_spacing_mm)

    def classifier(self) -> torch.nn.Module:
        """The class-logit view ``(B, 1, K, J, I) -> (B, C)`` (for libraries that want one tensor)."""
        return ClassLogits(self.net, 0)

    def forward_func(self):
        # The class path only: the segmentation decoder does not feed the class logits.
        classify = getattr(self.net, "classify", None)
        return classify if callable(classify) else super().forward_func()

    def prepare(self, image: Image, **request: Any) -> ModelInput:
        """Resample and normalise ``image`` onto the model grid."""
        arr, ref = self.grid.to_model(image)
        return ModelInput(inputs=(to_tensor(normalise_intensity(arr), self.device),), image=image, ref=ref)

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits / self.card.temperature, dim=-1)

    @torch.no_grad()
    def predict(self, inputs: ModelInput | Image) -> Prediction:
        inputs = self.prepare(inputs) if isinstance(inputs, Image) else inputs
        image = inputs.image
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

    def to_input(self, maps: torch.Tensor | np.ndarray, inputs: ModelInput) -> list[Image]:
        """``(T, K, J, I)`` model-grid maps -> float32 images on the input grid (linear resampling;
        values keep their unit per model-grid voxel)."""
        arr = maps.detach().float().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
        return [inputs.image.with_array(self.grid.to_input(m, inputs.ref, inputs.image).astype(np.float32))
                for m in arr]


# Adapter class per card kind.
ADAPTERS: dict[str, type[ModelAdapter]] = {LesionModel.kind: LesionModel, VQAModel.kind: VQAModel}


def _weights_dirs(weights_dir: Path | None, settings: Settings | None) -> list[Path]:
    if weights_dir:
        return [Path(weights_dir)]
    s = settings or Settings()
    # Fine-tuned weights (user dir) take precedence over the shipped ones, which are never written.
    return [Path(s.user_weights_dir), Path(s.weights_dir)]


def available_models(weights_dir: Path | None = None, settings: Settings | None = None) -> list[str]:
    names = set()
    for d in _weights_dirs(weights_dir, settings):
        names |= {p.stem for p in Path(d).glob("*.json") if (p.with_suffix(".pt")).exists()}
    return sorted(names)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load(name: str = "brain-lesion-3d", device: str | torch.device | None = None,
         weights_dir: Path | None = None, settings: Settings | None = None) -> ModelAdapter:
    """Load model ``name`` (card + weights) onto ``device`` (default: the settings' device, CUDA when
    present) as the adapter of its card's kind."""
    for d in _weights_dirs(weights_dir, settings):
        card_path = Path(d) / f"{name}.json"
        if card_path.exists() and card_path.with_suffix(".pt").exists():
            break
    else:
        raise KeyError(f"unknown model {name!r}; available: {available_models(weights_dir, settings)}")
    return load_card_file(card_path, device=device, settings=settings)


def load_card_file(card_path: Path, device: str | torch.device | None = None,
                   settings: Settings | None = None, weights: Path | None = None) -> ModelAdapter:
    """Load the model whose card is ``card_path`` (weights: ``weights``, default the ``.pt`` beside
    it) as the adapter of its card's kind. Published fine-tuned versions live under their version
    name (``<user weights>/versions/<model>/<version>.json``), not ``<name>.json``, so they are
    loaded by path."""
    card_path = Path(card_path)
    card = ModelCard.model_validate(json.loads(card_path.read_text()))
    adapter = ADAPTERS.get(card.kind)
    if adapter is None:
        raise ValueError(f"model {card.name!r} has kind {card.kind!r}, which no adapter serves ({sorted(ADAPTERS)})")
    net = build_network(card)
    state = torch.load(weights or card_path.with_suffix(".pt"), map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() for k, v in state.items()})
    dev = resolve_device(str(device) if device is not None else (settings or Settings()).device)
    return adapter.from_files(card, net, dev, card_path)

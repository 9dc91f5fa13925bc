"""Kind ``vqa``: the adapter of a visual-question-answering model (``brain-vqa``).

A request is a volume, a question and a slice: ``prepare(image, question=..., plane="axial",
slice_mm=None)`` resamples the slice in patient coordinates (:mod:`xai_core.slices`; the default
position is the volume's centre), windows it as ``xai data make-vqa`` does (1st to 99.5th percentile
of the study's non-zero voxels, 8-bit), pads it to a square and resizes it to the model's
``run_size``; the question is tokenised. ``inputs[0]`` is ``(1, 1, S, S)`` in 0..1 and
``additional_forward_args`` are ``(input_ids (1, L), attention_mask (1, L))``.

``to_input`` takes maps ``(T, S, S)`` on the model image back onto the slice and writes them into
the volume's grid on that slice's one-voxel slab (zero elsewhere), so a heatmap lines up in a viewer.

Explanations: ``explainer("relig")`` attributes at the image embedding (the card's ``layers.relig``)
and, along the same path, at the question embedding (``layers.relig_tokens``), with the question's
reference ``[CLS] [PAD]... [SEP]`` as its baseline; :meth:`VQAModel.token_scores` reads one score per
token from it. ``explainer("ig")`` is vanilla IG on the pixels (the paper's baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import Image
from ..slices import PLANES, Slice, sample_slice, slice_to_volume, to_png8
from .adapter import ModelAdapter, ModelInput

__all__ = ["VQAModel", "VQAPrediction", "study_window", "to_png8"]


@dataclass
class VQAPrediction:
    """The answer to one question.

    Attributes:
        answer: the most probable answer; answer_index its index in the card's answer vocabulary.
        answer_type: ``CLOSED`` or ``OPEN`` (the answer's type in the training data).
        confidence: its softmax probability.
        top: the 5 most probable answers, ``[(answer, probability), ...]``.
        logits, probabilities: ``(A,)`` over the answer vocabulary.
    """

    answer: str
    answer_index: int
    answer_type: str
    confidence: float
    top: list[tuple[str, float]]
    logits: np.ndarray
    probabilities: np.ndarray


def study_window(image: Image) -> tuple[float, float]:
    """The study's display window: the 1st and 99.5th percentiles of its non-zero voxels (as in
    ``xai data make-vqa``)."""
    arr = np.asarray(image.array, dtype=np.float32)
    fg = arr[arr > 0]
    if not fg.size:
        return 0.0, 1.0
    lo, hi = np.percentile(fg, [1, 99.5])
    return float(lo), float(hi)


class VQAModel(ModelAdapter):
    """Kind ``vqa``: :class:`~xai_core.models.brain_vqa.BrainVQANet` with its tokenizer.

    ``card.classes`` is the answer vocabulary; ``card.training["answer_types"]`` the type of each.
    """

    kind = "vqa"
    output_index = 0

    def __init__(self, card: Any, net: torch.nn.Module, device: torch.device, tokenizer: Any = None):
        super().__init__(card, net, device)
        self.tokenizer = tokenizer

    @classmethod
    def from_files(cls, card: Any, net: torch.nn.Module, device: torch.device, card_path: Path) -> VQAModel:
        """The adapter with the tokenizer saved beside the card (``<name>.tokenizer.json``)."""
        from .brain_vqa import load_tokenizer

        tok_path = Path(card_path).with_name(Path(card_path).stem + ".tokenizer.json")
        if not tok_path.is_file():
            raise FileNotFoundError(f"model {card.name!r} has no tokenizer beside its card ({tok_path})")
        return cls(card, net, device, load_tokenizer(tok_path))

    @property
    def run_size(self) -> int:
        return int(self.net.run_size)

    # -- inputs -------------------------------------------------------------------------------------------

    def tokenise(self, question: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """``(input_ids (1, L), attention_mask (1, L), tokens)`` of a question."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty: type a question about the slice")
        enc = self.tokenizer(question.strip(), truncation=True, return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        return ids, enc["attention_mask"].to(self.device), self.tokenizer.convert_ids_to_tokens(ids[0].tolist())

    def reference_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The question's baseline ids: special tokens kept, every other token ``[PAD]``."""
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), device=input_ids.device)
        return torch.where(torch.isin(input_ids, special), input_ids,
                           torch.full_like(input_ids, self.tokenizer.pad_token_id))

    def prepare_slice(self, png8: np.ndarray, question: str, *, image: Image | None = None,
                      slice_: Slice | None = None, size: int | None = None) -> ModelInput:
        """A model input from an 8-bit slice ``(rows, cols)`` (a SLAKE image, or a resampled slice)."""
        from .brain_vqa import to_model_image

        pixels, frame = to_model_image(png8, size or self.run_size, self.net.vision.config.num_channels)
        ids, mask, tokens = self.tokenise(question)
        meta = {"question": question.strip(), "tokens": tokens}
        if slice_ is not None:
            meta.update(slice_.to_json())
        return ModelInput(inputs=(pixels.to(self.device),), image=image, additional_forward_args=(ids, mask),
                          ref={"frame": frame, "slice": slice_}, meta=meta)

    def prepare(self, image: Image, **request: Any) -> ModelInput:
        """``question`` (required), ``plane`` (axial | coronal | sagittal, patient coordinates) and
        ``slice_mm`` (the slice's LPS coordinate along the plane's axis; default the volume centre)."""
        question = request.get("question")
        plane = request.get("plane") or "axial"
        if plane not in PLANES:
            raise ValueError(f"plane must be one of {', '.join(PLANES)}, got {plane!r}")
        sl = sample_slice(image, plane, request.get("slice_mm"))
        if not np.any(sl.array):
            raise ValueError(f"the {plane} slice at {sl.position_mm:.1f} mm lies outside the volume's content")
        return self.prepare_slice(to_png8(sl.array, study_window(image)), question, image=image, slice_=sl,
                                  size=request.get("size"))

    # -- outputs ------------------------------------------------------------------------------------------

    def answer_type(self, answer: str) -> str:
        return str((self.card.training.get("answer_types") or {}).get(answer, "OPEN"))

    @torch.no_grad()
    def predict(self, inputs: ModelInput | Image) -> VQAPrediction:
        if isinstance(inputs, Image):
            raise ValueError("a vqa model needs a question: call prepare(image, question=...) first")
        logits = self.net(*inputs.inputs, *inputs.additional_forward_args)[0].float()
        probs = torch.softmax(logits, dim=-1).cpu().numpy()
        order = np.argsort(-probs)[:5]
        best = int(order[0])
        answers = self.classes
        return VQAPrediction(answer=answers[best], answer_index=best, answer_type=self.answer_type(answers[best]),
                             confidence=float(probs[best]), top=[(answers[i], float(probs[i])) for i in order],
                             logits=logits.cpu().numpy(), probabilities=probs)

    def slice_maps(self, maps: torch.Tensor | np.ndarray, inputs: ModelInput) -> np.ndarray:
        """Maps ``(T, S, S)`` on the model image -> ``(T, rows, cols)`` on the slice."""
        from .brain_vqa import from_model_map

        arr = maps.detach().float().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
        return np.stack([from_model_map(m, inputs.ref["frame"]) for m in arr])

    def to_input(self, maps: torch.Tensor | np.ndarray, inputs: ModelInput) -> list[Image]:
        """Maps ``(T, S, S)`` -> float32 volumes on the input's grid: the slice's slab holds the map,
        every other voxel is zero."""
        sl = inputs.ref.get("slice")
        if sl is None or inputs.image is None:
            raise ValueError("this input was not resampled from a volume: use slice_maps")
        return [slice_to_volume(m.astype(np.float32), sl, inputs.image) for m in self.slice_maps(maps, inputs)]

    # -- explanations -------------------------------------------------------------------------------------

    def explainer(self, method: str, **params: Any):
        """As :meth:`ModelAdapter.explainer`; layer methods that take ``also`` attribute the question
        embedding too (``layers.relig_tokens``), from the reference ids."""
        from ..explain import get_explainer
        from .adapter import _takes

        cls = get_explainer(method)
        token_layer = self.layer_for(f"{cls.name}_tokens")
        if _takes(cls, "also") and token_layer is not None:
            params.setdefault("also", (token_layer,))
            params.setdefault("baseline_args", lambda ids, mask: (self.reference_ids(ids), mask))
        return super().explainer(method, **params)

    def token_scores(self, attribution: Any, inputs: ModelInput, item: int = 0, target: int = 0) -> list[dict]:
        """``[{"token", "score"}]``: each question token's attribution (summed over the embedding), in
        logit units; empty when the method did not attribute the question."""
        layer = self.layer_for("relig_tokens")
        raw = attribution.aux_raw.get(layer) if layer else None
        if raw is None:
            return []
        scores = raw[item, target].sum(-1).float().cpu().numpy()
        return [{"token": t, "score": float(s)} for t, s in zip(inputs.meta["tokens"], scores, strict=True)]

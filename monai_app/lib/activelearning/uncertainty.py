"""``least_sure``: the unlabelled study the served model is least sure of.

Two signals, each in 0..1, and the study's score is the larger:

* **class doubt**: ``(1 - p_max) / (1 - 1/C)`` from the calibrated class probabilities (0 when the
  model is certain, 1 when every class is equally likely);
* **disagreement**: ``1 - Dice(segmentation head's lesion mask, saliency mask)`` on the model grid,
  the saliency mask being the adaptive mask of the predicted class's Grad-CAM++ map (the mask a
  user corrects in Slicer). Where the two parts of the model point at different places, at least
  one is wrong, and a corrected label settles which. It is 0 when the model predicts no lesion and
  its head segments nothing (a saliency map of "none" points at nothing in particular).

The larger of the two, not a sum: a study can be worth correcting for either reason alone.
Scores are cached per study and weights (``weights_sha256``), in memory and in
``<datastore>/.xai/activelearning/<sha>.json``, so "Next sample" costs one forward and one backward
per study only the first time after a model switch. Studies that already have a label with the
tag (default ``final``) are skipped.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from xai_core.io import read_image
from xai_core.masks import saliency_mask
from xai_core.metrics import dice
from xai_core.models import LesionModel
from xai_core.settings import Settings

log = logging.getLogger("xai.activelearning")

NO_LESION = "none"


@dataclass(frozen=True)
class StudyScore:
    """Why a study was ranked where it was."""

    score: float
    class_doubt: float
    disagreement: float
    label: str
    p_max: float
    seg_voxels: int
    mask_voxels: int


@torch.no_grad()
def _forward(model: LesionModel, x: torch.Tensor):
    return model.net(x)


def score_study(model: LesionModel, image: Any, method: str = "gradcam++",
                settings: Settings | None = None) -> StudyScore:
    """The two signals for one study (an ``xai_core.io.Image``), on the model grid."""
    s = settings or Settings()
    inputs = model.prepare(image)
    out = _forward(model, inputs.tensor)
    probs = model.calibrated(out.class_logits[0].float()).cpu().numpy()
    c = int(probs.argmax())
    n = len(probs)
    doubt = float((1.0 - probs[c]) / (1.0 - 1.0 / n)) if n > 1 else 0.0
    seg = out.seg_logits.argmax(1)[0].cpu().numpy().astype(bool)
    label = model.classes[c]
    mask_voxels = 0
    if label == NO_LESION and not seg.any():
        disagreement = 0.0
    else:
        with torch.enable_grad():
            att = model.explainer(method).attribute(inputs.inputs, target=[[c]],
                                                    additional_forward_args=inputs.additional_forward_args)
        sal = att.maps[0][0].detach().float().cpu().numpy()
        # The head on the grid (normalised intensity > 0): the mask bounds count brain voxels.
        fg = inputs.tensor[0, 0].cpu().numpy() > 0.05
        sm = saliency_mask(sal, fg, min_fraction=s.mask_min_fraction, max_fraction=s.mask_max_fraction,
                           spacing=(model.grid.spacing,) * 3, settings=s)
        mask_voxels = int(sm.mask.sum())
        disagreement = 1.0 - dice(seg, sm.mask)
    return StudyScore(round(max(doubt, disagreement), 6), round(doubt, 6), round(disagreement, 6), label,
                      round(float(probs[c]), 6), int(seg.sum()), mask_voxels)


class LeastSure(Strategy):
    """MONAI Label strategy ``least_sure`` over the stored studies without a label."""

    def __init__(self, cache: Any, state_dir: Path | str | None = None, tag: str = "final",
                 method: str = "gradcam++", settings: Settings | None = None):
        super().__init__("Least sure first: the unlabelled study with the lowest class confidence or the largest "
                         "disagreement between the segmentation head and the Grad-CAM++ saliency mask")
        self.cache = cache  # lib.models.ModelCache of the served model (the active version)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.tag = tag
        self.method = method
        self.settings = settings or Settings()
        self._scores: dict[str, dict[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {"description": self.description, "tag": self.tag, "method": self.method,
                "score": "max(class doubt, 1 - Dice(segmentation, saliency mask))"}

    def _file(self, sha: str) -> Path | None:
        return self.state_dir / "activelearning" / f"{sha[:16]}.json" if self.state_dir and sha else None

    def _known(self, sha: str) -> dict[str, dict[str, Any]]:
        if sha not in self._scores:
            f = self._file(sha)
            try:
                self._scores[sha] = json.loads(f.read_text()) if f and f.is_file() else {}
            except (OSError, ValueError):
                self._scores[sha] = {}
        return self._scores[sha]

    def _save(self, sha: str) -> None:
        f = self._file(sha)
        if f is None:
            return
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=f.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as out:
            json.dump(self._scores[sha], out)
        os.replace(tmp, f)

    def rank(self, datastore: Datastore, tag: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Every unlabelled study with its score, least sure first (ties by id, so the order is stable)."""
        tag = tag or self.tag
        candidates = [i for i in datastore.list_images() if not datastore.get_label_uri(i, tag)]
        if not candidates:
            return []
        model = self.cache.get()
        sha = model.card.weights_sha256 or f"{model.card.name}@{model.card.version}"
        with self._lock:
            known = self._known(sha)
            fresh = 0
            for image_id in candidates:
                if image_id in known:
                    continue
                try:
                    image = read_image(datastore.get_image_uri(image_id))
                    known[image_id] = asdict(score_study(model, image, self.method, self.settings))
                except Exception as e:  # one unreadable study must not hide the others
                    log.warning("active learning: cannot score %s: %s", image_id, e)
                    continue
                fresh += 1
            if fresh:
                self._save(sha)
        ranked = [(i, known[i]) for i in candidates if i in known]
        return sorted(ranked, key=lambda t: (-t[1]["score"], t[0]))

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        ranked = self.rank(datastore, request.get("label_tag") or request.get("tag"))
        if not ranked:
            return {}
        image_id, why = ranked[0]
        model = self.cache.get()
        return {"id": image_id, **why,
                "model": {"name": model.card.name, "version": model.card.version},
                "ranking": [{"id": i, "score": r["score"]} for i, r in ranked[:10]], "candidates": len(ranked)}

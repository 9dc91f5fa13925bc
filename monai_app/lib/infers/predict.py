"""Prediction tasks: ``classify`` (JSON only) and ``segment`` (the segmentation head's lesion mask)."""

from __future__ import annotations

from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType

from xai_core.io import Image, write_image
from xai_core.models import ModelAdapter, Prediction
from xai_core.pipeline import software_versions
from xai_core.schema import ClassificationResult, SegmentationResult

from ..runtime import XAIRuntime
from .base import IMAGE_KEY, Progress, XAIInferTask, timed


def prediction_json(pred: Prediction, model: ModelAdapter, image: Image) -> dict[str, Any]:
    """The ``prediction`` block, in the same shape as ``Explanation.summary()["prediction"]``."""
    card = model.card
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    return {
        "label": pred.label,
        "probabilities": {c: round(float(v), 6) for c, v in zip(model.classes, pred.probabilities, strict=True)},
        "calibration": card.calibration,
        "temperature": card.temperature,
        "logits": [round(float(v), 6) for v in pred.logits],
        "lesion_volume_ml_segmentation_head": round(float(pred.lesion_mask.array.sum()) * voxel_ml, 3),
    }


def model_json(model: ModelAdapter) -> dict[str, Any]:
    return {"name": model.card.name, "version": model.card.version, "weights_sha256": model.card.weights_sha256}


def predict_with_progress(task: XAIInferTask, data: dict[str, Any], progress: Progress):
    """The task's current model, the request's image, its prediction, the seconds it took and the
    out-of-distribution verdict."""
    progress("load", 0.0)
    model = task.cache.get()
    image = data[IMAGE_KEY]
    inputs = model.prepare(image)
    pred, seconds = timed(lambda: model.predict(inputs))
    # Out of distribution: the class comes with a flag that it is not to be trusted (docs/ood.md).
    ood = model.assess_input(inputs).model_dump(mode="json")
    progress("write", 0.9)
    return model, image, pred, seconds, ood


class ClassifyTask(XAIInferTask):
    """Calibrated class probabilities; the reply is JSON only."""

    def __init__(self, runtime: XAIRuntime, name: str, classes: list[str], model: str | None = None):
        super().__init__(runtime, name, InferType.CLASSIFICATION, labels=classes,
                         description="Lesion class with calibrated probabilities (JSON only)", model=model)

    def compute(self, data: dict[str, Any], progress: Progress) -> None:
        model, image, pred, seconds, ood = predict_with_progress(self, data, progress)
        result_id, _ = self.runtime.results.create()
        result = {**self.base_json(data, result_id), "prediction": prediction_json(pred, model, image),
                  "model": model_json(model), "timings_s": {"predict": round(seconds, 4)}, "ood": ood,
                  "software": software_versions()}
        self.finish(data, result_id, ClassificationResult.model_validate(result).model_dump(mode="json"), None)


class SegmentTask(XAIInferTask):
    """The segmentation head's lesion mask (uint8 0/1, probability >= 0.5) on the input grid."""

    def __init__(self, runtime: XAIRuntime, name: str, model: str | None = None):
        super().__init__(runtime, name, InferType.SEGMENTATION, labels={"lesion": 1},
                         description="Lesion mask of the model's segmentation head (uint8 0/1, input grid)",
                         model=model)

    def compute(self, data: dict[str, Any], progress: Progress) -> None:
        model, image, pred, seconds, ood = predict_with_progress(self, data, progress)
        result_id, folder = self.runtime.results.create()
        write_image(pred.lesion_mask, folder / "mask.nii.gz")
        write_image(pred.lesion_probability, folder / "probability.nii.gz")
        voxels = int(pred.lesion_mask.array.sum())
        result = {**self.base_json(data, result_id), "prediction": prediction_json(pred, model, image),
                  "mask": {"voxels": voxels, "volume_ml": round(voxels * float(np.prod(image.spacing)) / 1000, 3),
                           "threshold": 0.5, "empty": voxels == 0},
                  "model": model_json(model), "timings_s": {"predict": round(seconds, 4)}, "ood": ood,
                  "software": software_versions()}
        self.finish(data, result_id, SegmentationResult.model_validate(result).model_dump(mode="json"),
                    "mask.nii.gz")

"""Infer tasks (MONAI Label ``InferTask``s) that call ``xai_core``; no explanation logic lives here."""

from .base import XAIInferTask
from .explain import ExplainTask, SaliencyMaskTask
from .predict import ClassifyTask, SegmentTask
from .vqa import VQATask

__all__ = ["ClassifyTask", "ExplainTask", "SaliencyMaskTask", "SegmentTask", "VQATask", "XAIInferTask"]

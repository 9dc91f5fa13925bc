"""The tasks of the ``brain-lesion-3d`` model: every explanation method, the saliency mask,
classification, segmentation, and the segmentation-head fine-tune.

The method list comes from ``xai_core.explain.available_methods()`` at start-up, so a method
registered there is served without touching the app.
"""

from __future__ import annotations

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from xai_core.data.brain import CLASSES
from xai_core.explain import available_methods

from ..infers import ClassifyTask, ExplainTask, SaliencyMaskTask, SegmentTask
from ..runtime import XAIRuntime
from ..trainers import SegHeadFinetuneTask

DEFAULT_MASK_METHOD = "gradcam++"


def wire_name(method: str) -> str:
    """Task name of an ``xai_core`` method on the wire: ``+`` becomes ``p`` (``gradcam++`` -> ``gradcampp``),
    since ``+`` means a space in a URL query."""
    return method.replace("+", "p")


class BrainLesionConfig(TaskConfig):
    """Needs ``init(..., runtime=XAIRuntime)``."""

    @property
    def runtime(self) -> XAIRuntime:
        return self.kwargs["runtime"]

    def classes(self) -> list[str]:
        # The card is read without loading weights; before any weights exist, the generator's classes.
        return list(self.runtime.models.card().get("classes") or CLASSES)

    def infer(self) -> dict[str, InferTask]:
        rt, classes = self.runtime, self.classes()
        methods = {wire_name(m): m for m in available_methods()}
        if len(methods) != len(available_methods()):
            raise ValueError(f"two methods share a wire name: {available_methods()}")
        tasks: dict[str, InferTask] = {w: ExplainTask(rt, w, m, classes) for w, m in methods.items()}
        default = wire_name(DEFAULT_MASK_METHOD) if DEFAULT_MASK_METHOD in available_methods() else next(iter(methods))
        tasks["saliency_mask"] = SaliencyMaskTask(rt, "saliency_mask", methods, default)
        tasks["classify"] = ClassifyTask(rt, "classify", classes)
        tasks["segment"] = SegmentTask(rt, "segment")
        return tasks

    def trainer(self) -> TrainTask | None:
        return SegHeadFinetuneTask(self.runtime.options.model, self.runtime.options.device)

"""The tasks of one ``volume-classifier`` model (``brain-lesion-3d`` by default): every explanation
method that fits the kind, the saliency mask, classification, segmentation, and (for the default
model) the segmentation-head fine-tune.

The method list comes from ``xai_core.explain.available_methods(kind)`` at start-up, so a method
registered there is served without touching the app, and only where it fits the model. The default
model's tasks keep their plain names (``gradcampp``, ``classify``, ...); a further model's are
prefixed with its name (``brain-lesion-3d-ft.gradcampp``).
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

KIND = "volume-classifier"
DEFAULT_MASK_METHOD = "gradcam++"


def wire_name(method: str) -> str:
    """Task name of an ``xai_core`` method on the wire: ``+`` becomes ``p`` (``gradcam++`` -> ``gradcampp``),
    since ``+`` means a space in a URL query."""
    return method.replace("+", "p")


def task_name(model: str, task: str, default_model: str) -> str:
    """``task`` for the default model, ``<model>.<task>`` for any other."""
    return task if model == default_model else f"{model}.{task}"


class VolumeClassifierConfig(TaskConfig):
    """Needs ``init(name, model_dir, conf, planner, runtime=XAIRuntime, model=<model name>)``."""

    @property
    def runtime(self) -> XAIRuntime:
        return self.kwargs["runtime"]

    @property
    def model(self) -> str:
        return self.kwargs["model"]

    def classes(self) -> list[str]:
        # The card is read without loading weights; before any weights exist, the generator's classes.
        return list(self.runtime.cache(self.model).card().get("classes") or CLASSES)

    def infer(self) -> dict[str, InferTask]:
        rt, classes, model = self.runtime, self.classes(), self.model

        def named(task: str) -> str:
            return task_name(model, task, rt.options.model)

        fitting = available_methods(KIND)
        methods = {wire_name(m): m for m in fitting}
        if len(methods) != len(fitting):
            raise ValueError(f"two methods share a wire name: {fitting}")
        tasks: dict[str, InferTask] = {named(w): ExplainTask(rt, named(w), m, classes, model=model)
                                       for w, m in methods.items()}
        default = wire_name(DEFAULT_MASK_METHOD) if DEFAULT_MASK_METHOD in fitting else next(iter(methods))
        tasks[named("saliency_mask")] = SaliencyMaskTask(rt, named("saliency_mask"), methods, default, model=model)
        tasks[named("classify")] = ClassifyTask(rt, named("classify"), classes, model=model)
        tasks[named("segment")] = SegmentTask(rt, named("segment"), model=model)
        return tasks

    def trainer(self) -> TrainTask | None:
        if self.model != self.runtime.options.model:
            return None  # corrected labels fine-tune the default model only
        return SegHeadFinetuneTask(self.model, self.runtime.options.device, self.runtime.settings,
                                   state_dir=self.runtime.options.state_dir)

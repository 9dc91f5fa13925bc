"""The task of one ``vqa`` model (``brain-vqa`` by default): ``vqa``, a question about one slice.

The app's vqa model (``--conf vqa_model``, default ``brain-vqa``) and the default model name theirs
``vqa``; any further vqa model's is ``<model>.vqa``. The task is listed in ``/info/`` only while the
model's weights exist (:meth:`lib.infers.vqa.VQATask.is_valid`). There is no trainer: the model is
trained offline (``xai train brain-vqa``).
"""

from __future__ import annotations

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from ..infers.vqa import VQATask
from ..runtime import XAIRuntime

KIND = "vqa"
TASK = "vqa"


class VQAConfig(TaskConfig):
    """Needs ``init(name, model_dir, conf, planner, runtime=XAIRuntime, model=<model name>)``."""

    @property
    def runtime(self) -> XAIRuntime:
        return self.kwargs["runtime"]

    @property
    def model(self) -> str:
        return self.kwargs["model"]

    def task_name(self) -> str:
        options = self.runtime.options
        return TASK if self.model in (options.vqa_model, options.model) else f"{self.model}.{TASK}"

    def infer(self) -> dict[str, InferTask]:
        name = self.task_name()
        return {name: VQATask(self.runtime, name, model=self.model)}

    def trainer(self) -> TrainTask | None:
        return None

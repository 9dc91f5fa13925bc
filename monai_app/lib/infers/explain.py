"""Explanation tasks: one per ``xai_core`` method, and ``saliency_mask`` for segmentation clients.

Both call :func:`xai_core.pipeline.explain` and write its parts with
:func:`xai_core.pipeline.write_explanation` into the result folder; they differ only in the file
the HTTP response carries: the float32 heatmap (``explanation`` type) or the uint8 mask
(``segmentation`` type, which MONAI Label's stock Slicer plugin and client understand).
"""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferType

from xai_core.explain import get_explainer
from xai_core.pipeline import explain, write_explanation

from ..errors import BadInput
from ..runtime import XAIRuntime
from .base import IMAGE_KEY, Progress, XAIInferTask

EXPLANATION_TYPE = "explanation"  # not one of MONAI Label's InferType values: stock viewers skip it

# xai_core.pipeline reports the stage running now; after its last stage the task writes files.
RUNNING_STAGE = {"done": ("write", 0.9)}


class ExplainTask(XAIInferTask):
    """Heatmap of ``method`` for the model's decision; the response file is the float32 saliency."""

    response_artifact = "saliency.nii.gz"

    def __init__(self, runtime: XAIRuntime, name: str, method: str, classes: list[str], model: str | None = None):
        super().__init__(runtime, name, EXPLANATION_TYPE, labels=classes,
                         description=f"{get_explainer(method).title}: float32 heatmap 0..1 on the input grid",
                         config={"target": "predicted"}, model=model)
        self.method = method

    def method_for(self, data: dict[str, Any]) -> str:
        return self.method

    def compute(self, data: dict[str, Any], progress: Progress) -> None:
        progress("load", 0.0)
        method = self.method_for(data)
        model = self.cache.get()

        def running(stage: str, fraction: float) -> None:
            progress(*RUNNING_STAGE.get(stage, (stage, fraction)))

        exp = explain(data[IMAGE_KEY], method, target=data.get("target"), model=model, progress=running,
                      settings=self.runtime.settings)
        result_id, folder = self.runtime.results.create()
        write_explanation(exp, folder, overlay=False)
        result = {**self.base_json(data, result_id), **exp.summary()}
        self.finish(data, result_id, result, self.response_artifact)


class SaliencyMaskTask(ExplainTask):
    """The adaptive saliency mask (uint8 0/1) of a chosen method, as a segmentation task."""

    response_artifact = "mask.nii.gz"

    def __init__(self, runtime: XAIRuntime, name: str, methods: dict[str, str], default: str,
                 model: str | None = None):
        XAIInferTask.__init__(
            self, runtime, name, InferType.SEGMENTATION, labels={"salient_region": 1},
            description="Saliency mask (uint8 0/1) of an explanation method, input grid; "
                        f"params: method ({', '.join(methods)}), target",
            config={"method": default, "target": "predicted"}, model=model)
        self.methods = methods  # wire name -> xai_core method name
        self.method = methods[default]

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        self.method_for(params)

    def method_for(self, data: dict[str, Any]) -> str:
        wire = data.get("method") or self._config["method"]
        if isinstance(wire, list | tuple):
            wire = wire[0] if wire else self._config["method"]
        if wire in self.methods:
            return self.methods[wire]
        if wire in self.methods.values():  # the xai_core spelling (gradcam++) is accepted too
            return wire
        raise BadInput(f"unknown method {wire!r}; use one of {sorted(self.methods)}")

"""Explanation tasks: one per ``xai_core`` method, and ``saliency_mask`` for segmentation clients.

Both call :func:`xai_core.pipeline.explain` and write its parts with
:func:`xai_core.pipeline.write_explanation` into the result folder; they differ only in the file
the HTTP response carries: the float32 heatmap (``explanation`` type) or the uint8 mask
(``segmentation`` type, which MONAI Label's stock Slicer plugin and client understand).
"""

from __future__ import annotations

import json
import time
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferType

from xai_core.explain import get_explainer
from xai_core.explain.base import check_method_params
from xai_core.export_dicom import write_dicom_outputs
from xai_core.findings import build_findings
from xai_core.pipeline import explain, write_explanation
from xai_core.report import draft_report
from xai_core.schema import ExplanationResult

from ..errors import BadInput
from ..jobs import IMAGE_ID_KEY
from ..runtime import XAIRuntime
from .base import IMAGE_KEY, Progress, XAIInferTask

EXPLANATION_TYPE = "explanation"  # not one of MONAI Label's InferType values: stock viewers skip it

# xai_core.pipeline reports the stage running now; after its last stage the task writes files.
RUNNING_STAGE = {"done": ("write", 0.9)}


def wants_report(params: dict[str, Any]) -> bool:
    """The ``report`` parameter: findings (anatomy, counterfactual, flags) and a drafted report in the
    reply. Off by default: it adds a registration to MNI (once per image) and a counterfactual."""
    value = params.get("report", False)
    if isinstance(value, list | tuple) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", ""):
        return value.lower() in ("true", "1", "yes")
    raise BadInput(f"report must be true or false, got {value!r}")


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

        settings = self.runtime.settings
        method_kwargs = check_method_params(get_explainer(method), data.get("method_params"))
        exp = explain(data[IMAGE_KEY], method, target=data.get("target"), model=model, progress=running,
                      settings=settings, method_kwargs=method_kwargs)
        result_id, folder = self.runtime.results.create()
        write_explanation(exp, folder, overlay=False)
        result = {**self.base_json(data, result_id), **exp.summary()}
        if wants_report(data):
            progress("report", 0.8)
            t = time.perf_counter()
            # Registration to MNI is the costly part: once per image, reused by every method and request.
            registration = self.runtime.registrations.get(exp.image, settings)
            findings = build_findings(exp, model=model, registration=registration, with_levels=True,
                                      settings=settings)
            report = draft_report(findings, settings=settings).markdown
            (folder / "findings.json").write_text(json.dumps(findings, indent=2))
            (folder / "report.md").write_text(report)
            result.update(findings=findings, report=report)
            result["timings_s"]["report"] = round(time.perf_counter() - t, 4)
        series = self.runtime.dicom_source(data.get(IMAGE_ID_KEY))
        if series is not None:
            t = time.perf_counter()
            # Anatomy for the segment codes from the findings when asked for; else the brain (no
            # registration is paid for a request that did not want anatomy).
            write_dicom_outputs(exp, series, folder, findings=result.get("findings"),
                                anatomy=result.get("findings") is not None, settings=settings)
            result["timings_s"]["dicom"] = round(time.perf_counter() - t, 4)
        self.finish(data, result_id, ExplanationResult.model_validate(result).model_dump(mode="json"),
                    self.response_artifact)

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        wants_report(params)
        try:
            check_method_params(get_explainer(self.method_for(params)), params.get("method_params"))
        except ValueError as e:
            raise BadInput(str(e)) from None


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

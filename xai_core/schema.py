"""The one result schema: pydantic models for every result the system hands out.

``Explanation.summary()`` (files and the CLI), the server's replies (``monai_app``), the findings
(:mod:`xai_core.findings`) and the Slicer module's parsing all follow these models. Their JSON Schema
is served at ``GET /xai/schema`` and written to ``docs/result_schema.json``
(``python -m xai_core.schema > docs/result_schema.json``); a test keeps the file in step.

Reply types:

* :class:`ExplanationResult`: an explanation task (``gradcampp``, ``relig``, ``saliency_mask``, ...);
  with ``report: true`` it also carries ``findings`` (:class:`~xai_core.findings.Findings`) and ``report``
  (Markdown);
* :class:`ClassificationResult`: ``classify``;
* :class:`SegmentationResult`: ``segment``.

Inner models forbid unknown keys (a typo fails loudly); the top level allows the keys MONAI Label
adds to a reply (``label_names``, ``latencies``).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .findings import Findings
from .ood import OODResult

__all__ = ["SCHEMA_VERSION", "ClassificationResult", "EvidenceCase", "EvidenceSummary", "ExplanationResult",
           "ImageGeometry", "MaskSummary", "ModelRef", "PredictionSummary", "SaliencySummary", "SegmentationResult",
           "result_json_schema"]

SCHEMA_VERSION = "2.0"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Reply(BaseModel):
    # MONAI Label adds its own keys (label_names, latencies) to a reply's JSON.
    model_config = ConfigDict(extra="allow")


class PredictionSummary(_Strict):
    label: str = Field(description="most probable class")
    probabilities: dict[str, float] = Field(description="calibrated class probabilities")
    calibration: str | None = Field(None, description="how the probabilities were calibrated")
    temperature: float | None = Field(None, description="softmax temperature")
    logits: list[float] = Field(description="raw class logits, in the order of the model's classes")
    lesion_volume_ml_segmentation_head: float = Field(description="lesion volume of the segmentation head, mL")


class EvidenceCase(_Strict):
    case: str = Field(description="id of the past case in the evidence library")
    label: str = Field(description="its class")
    distance: float = Field(description="cosine distance of its features to this study's")
    weight: float = Field(description="Nadaraya-Watson kernel weight (the weights of all cases sum to 1)")


class EvidenceSummary(_Strict):
    """The similar past cases MedLIME's evidence-based regularisation drew on (docs/medlime.md)."""

    mode: str = Field(description="'knn' (nearest abnormal cases), 'random' (the ablation) or 'off'")
    reason: str | None = Field(None, description="why no evidence was used, when mode is 'off'")
    library: str | None = Field(None, description="the evidence library file")
    k: int | None = Field(None, description="cases asked for")
    bandwidth: float | None = Field(None, description="kernel bandwidth (cosine distance)")
    cases: list[EvidenceCase] = Field(default_factory=list, description="the cases used, nearest first")


class SaliencySummary(_Strict):
    flat: list[bool] = Field(description="per target: the map was flat (no ranking possible)")
    peak_index_ijk: list[int] = Field(description="primary map's maximum, voxel index (i, j, k)")
    peak_lps_mm: list[float] = Field(description="primary map's maximum, LPS mm")
    display: str = Field(description="how the 0..1 heatmap was made from the raw attribution: minmax, positive "
                                     "or absolute")
    raw_max: list[float] = Field(description="per target: maximum of the view before scaling, method's unit")
    convergence_delta: list[float] | None = Field(None, description="path methods, per target: sum of attributions "
                                                                    "minus the logit difference to the baseline")
    evidence: EvidenceSummary | None = Field(None, description="MedLIME: the similar past cases behind the "
                                                               "explanation, with their weights")
    extras: dict[str, Any] = Field(default_factory=dict, description="method diagnostics")


class MaskSummary(_Strict):
    empty: bool
    reason: str | None = Field(description="why the mask is empty, when it is")
    threshold: float | None
    percentile: float | None
    voxels: int
    volume_ml: float
    fraction_of_brain: float
    components: int
    levels_percent: list[float] = Field(description="top-p % of brain voxels per saliency level, widest first")
    levels_encoding: str


class ImageGeometry(_Strict):
    size: list[int] = Field(description="voxels along i, j, k")
    spacing: list[float] = Field(description="mm along i, j, k")
    origin: list[float] = Field(description="LPS mm of voxel (0, 0, 0)")
    direction: list[float] = Field(description="row-major 3 x 3; columns are the i, j, k directions")


class ModelRef(_Strict):
    name: str
    version: str
    weights_sha256: str | None = None


class _ServerFields(BaseModel):
    """Keys the server adds (absent from ``xai explain``'s result.json)."""

    task: str | None = Field(None, description="the task that made the result")
    image_id: str | None = Field(None, description="datastore image id (None for an uploaded volume)")
    result_id: str | None = Field(None, description="send it with a corrected label: the server stamps "
                                                    "the label's provenance from it")
    artifacts: dict[str, str] = Field(default_factory=dict, description="artifact name -> download URL")


class ExplanationResult(_ServerFields, _Reply):
    schema_version: str = SCHEMA_VERSION
    prediction: PredictionSummary
    method: str = Field(description="registry name of the method")
    method_title: str = Field(description="the method's title, for display")
    targets: list[str] = Field(description="explained classes; the first is the primary map")
    params: dict[str, Any] = Field(description="method parameters, for provenance")
    saliency: SaliencySummary
    mask: MaskSummary
    image: ImageGeometry
    timings_s: dict[str, float]
    model: ModelRef
    software: dict[str, str]
    files: dict[str, str] | None = Field(None, description="xai explain: file names written")
    ood: OODResult | None = Field(None, description="out-of-distribution guard: flagged input is not what "
                                                    "the model was made for, and its class is not to be trusted")
    findings: Findings | None = Field(None, description="with report: true")
    report: str | None = Field(None, description="with report: true: the drafted report, Markdown")


class ClassificationResult(_ServerFields, _Reply):
    schema_version: str = SCHEMA_VERSION
    prediction: PredictionSummary
    ood: OODResult | None = Field(None, description="out-of-distribution guard (see ExplanationResult)")
    model: ModelRef
    timings_s: dict[str, float]
    software: dict[str, str]


class SegmentationMask(_Strict):
    voxels: int
    volume_ml: float
    threshold: float
    empty: bool


class SegmentationResult(ClassificationResult):
    mask: SegmentationMask


def result_json_schema() -> dict[str, Any]:
    """One JSON Schema document: ``{"explanation", "classification", "segmentation", "findings"}`` under
    ``properties`` (each a reply type), with shared definitions in ``$defs``."""
    from pydantic.json_schema import models_json_schema

    types = {"explanation": ExplanationResult, "classification": ClassificationResult,
             "segmentation": SegmentationResult, "findings": Findings}
    keys, defs = models_json_schema([(m, "serialization") for m in types.values()],
                                    ref_template="#/$defs/{model}")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "xai_core results",
            "version": SCHEMA_VERSION,
            "properties": {name: keys[(m, "serialization")] for name, m in types.items()}, **defs}


if __name__ == "__main__":
    print(json.dumps(result_json_schema(), indent=2, sort_keys=True))

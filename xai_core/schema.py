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
* :class:`SegmentationResult`: ``segment``;
* :class:`VQAAnswer`: ``vqa`` (a question about one slice of the volume; also ``xai ask``'s answer.json).

Inner models forbid unknown keys (a typo fails loudly); the top level allows the keys MONAI Label
adds to a reply (``label_names``, ``latencies``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .findings import Findings
from .ood import OODResult

__all__ = ["SCHEMA_VERSION", "AnswerProbability", "ClassificationResult", "EvidenceCase", "EvidenceSummary",
           "ExplanationResult", "ImageGeometry", "MaskSummary", "ModelRef", "PredictionSummary", "SaliencySummary",
           "SegmentationResult", "SliceGeometry", "TokenScore", "VQAAnswer", "VQASaliency", "result_json_schema"]

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


class AnswerProbability(_Strict):
    answer: str
    probability: float = Field(description="softmax probability over the model's answer vocabulary")


class TokenScore(_Strict):
    token: str = Field(description="a question token as the model's tokenizer split it ([CLS] and [SEP] included)")
    score: float = Field(description="its attribution (RE-LIG at the question embedding, summed over the embedding "
                                     "dimensions), logit units; positive tokens pushed towards the answer")


class SliceGeometry(_Strict):
    """The slice a question was asked about (``xai_core.slices``: planes in patient coordinates, LPS)."""

    plane: Literal["axial", "coronal", "sagittal"]
    axis: Literal["L", "P", "S"] = Field(description="the LPS axis held constant: S (axial), P (coronal), L (sagittal)")
    position_mm: float = Field(description="the slice's LPS coordinate along that axis, mm")
    thickness_mm: float = Field(description="the slab it stands for: one voxel of the volume along the plane normal")
    size: list[int] = Field(description="pixels: columns, rows")
    spacing: list[float] = Field(description="mm: column, row, thickness")
    origin: list[float] = Field(description="LPS mm of pixel (row 0, column 0)")
    direction: list[float] = Field(description="row-major 3 x 3; columns are the column axis, the row axis and "
                                               "the plane normal")


class VQASaliency(_Strict):
    """The image attribution of the answer (absent with method ``none``)."""

    flat: bool = Field(description="the map was flat (no ranking possible; the heatmap is all zeros)")
    display: str = Field(description="how the 0..1 heatmap was made from the raw attribution")
    raw_max: float = Field(description="maximum of the view before scaling, method's unit")
    convergence_delta: float | None = Field(None, description="sum of attributions minus the logit difference to "
                                                              "the baseline")
    layer: str | None = Field(None, description="layer attributed (None: the pixels)")
    peak_index_ijk: list[int] | None = Field(None, description="heatmap maximum in the volume, voxel index (i, j, k); "
                                                               "None when flat")
    peak_lps_mm: list[float] | None = Field(None, description="heatmap maximum in the volume, LPS mm; None when flat")
    nonzero_voxels: int = Field(description="voxels of the heatmap volume above zero (all on the slice's slab)")
    extras: dict[str, Any] = Field(default_factory=dict, description="method diagnostics (integration rule, noise "
                                                                     "samples, seed, ...)")


class VQAAnswer(_ServerFields, _Reply):
    """The answer to a question about one slice, and what in the slice and the question led to it."""

    schema_version: str = SCHEMA_VERSION
    question: str = Field(description="the question as asked (stripped)")
    answer: str = Field(description="the most probable answer")
    answer_type: str = Field(description="CLOSED (yes/no, normal/abnormal) or OPEN")
    confidence: float = Field(description="the answer's softmax probability")
    top: list[AnswerProbability] = Field(description="the 5 most probable answers, most probable first")
    tokens: list[TokenScore] = Field(description="one score per question token; empty when the method does not "
                                                 "attribute the question (ig, none)")
    method: Literal["relig", "ig", "none"] = Field(description="explanation of the answer: relig (image and "
                                                                "question), ig (pixels only) or none")
    method_title: str | None = Field(None, description="the method's title, for display")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters, for provenance")
    slice: SliceGeometry
    saliency: VQASaliency | None = Field(None, description="None with method none")
    image: ImageGeometry = Field(description="the input volume's geometry (the heatmap volume's too)")
    model: ModelRef
    timings_s: dict[str, float]
    software: dict[str, str]
    files: dict[str, str] | None = Field(None, description="xai ask: file names written")


def result_json_schema() -> dict[str, Any]:
    """One JSON Schema document: ``{"explanation", "classification", "segmentation", "findings", "vqa"}``
    under ``properties`` (each a reply type), with shared definitions in ``$defs``."""
    from pydantic.json_schema import models_json_schema

    types = {"explanation": ExplanationResult, "classification": ClassificationResult,
             "segmentation": SegmentationResult, "findings": Findings, "vqa": VQAAnswer}
    keys, defs = models_json_schema([(m, "serialization") for m in types.values()],
                                    ref_template="#/$defs/{model}")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "xai_core results",
            "version": SCHEMA_VERSION,
            "properties": {name: keys[(m, "serialization")] for name, m in types.items()}, **defs}


if __name__ == "__main__":
    print(json.dumps(result_json_schema(), indent=2, sort_keys=True))

"""Structured findings: one versioned, JSON-ready record of what the model said and why.

:func:`build_findings` runs what an explanation still needs to become findings (registration to
MNI152, atlas labelling of the explanation mask, the counterfactual check) and returns the record
as a plain dict that validates against :class:`Findings` (``schema_version`` "1.1"). The MONAI
Label app, the CLI (``xai explain --report``) and the report drafter (:mod:`xai_core.report`) all use
this one function.

Privacy: the record holds no patient identifiers. :class:`~xai_core.io.Image` carries none (no
DICOM header fields), and the one free-text field an image has, its ``source`` path, is left out
(a file or folder name can be a patient's name); geometry, model outputs and derived numbers only.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .codes import lesion_type_code, structure_code
from .settings import Settings

__all__ = ["SCHEMA_VERSION", "CodedConcept", "Findings", "LevelLabel", "QualityFlag", "build_findings",
           "findings_json_schema", "level_labels", "quality_flags"]

# 1.1: SNOMED CT codes added (lesion type, structures); otherwise the same record as 1.0.
SCHEMA_VERSION = "1.1"

# Below this absolute drop of the predicted class's probability the region is said not to carry the
# prediction (a weak counterfactual): 0.05 is above the jitter of re-predicting a resampled image.
WEAK_COUNTERFACTUAL_CHANGE = 0.05
# Above this share of the mask outside every atlas structure, the labels describe little of it.
MOSTLY_UNLABELLED = 0.5


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudyGeometry(_Model):
    """The input grid (ITK order (i, j, k), LPS mm). No file names or header fields."""

    size: list[int] = Field(description="voxels along i, j, k")
    spacing_mm: list[float]
    origin_lps_mm: list[float]
    direction: list[float] = Field(description="row-major 3 x 3, columns are the i, j, k axis directions")


class ModelInfo(_Model):
    name: str
    version: str
    weights_sha256: str
    classes: list[str]


class CodedConcept(_Model):
    """A standard code (:mod:`xai_core.codes`): code value, coding scheme ("SCT" = SNOMED CT), meaning."""

    value: str
    scheme: str
    meaning: str


class PredictionInfo(_Model):
    label: str
    probabilities: dict[str, float] = Field(description="calibrated class probabilities")
    calibration: str | None = Field(description="calibration method")
    temperature: float | None
    lesion_volume_ml_segmentation_head: float
    lesion_type_code: CodedConcept | None = Field(None, description="SNOMED CT lesion type of the predicted class "
                                                                    "(None: no lesion)")


class ExplanationInfo(_Model):
    method: str
    targets: list[str] = Field(description="explained classes; the first is the primary map")
    params: dict[str, Any]
    flat: list[bool] = Field(description="per target: the raw map was flat (no ranking possible)")
    peak_lps_mm: list[float] = Field(description="primary map's maximum, input space")


class MaskStats(_Model):
    empty: bool
    reason: str | None
    voxels: int
    volume_ml: float
    fraction_of_brain: float
    components: int
    threshold: float | None
    percentile: float | None


class RegistrationInfo(_Model):
    kind: Literal["affine", "affine+bspline"]
    metric: str
    metric_value: float | None
    ncc: float | None = Field(description="intensity NCC with the template in its brain (reported; not a gate)")
    edge_ncc: float | None = Field(None, description="NCC of gradient magnitudes with the template "
                                   "(the gate, any contrast)")
    dice: float | None
    coverage: float | None = Field(None, description="fraction of the template brain inside the input's foreground")
    det: float
    likely_failed: bool
    reason: str | None
    seconds: float
    stop: str


class StructureInfo(_Model):
    name: str = Field(description="Harvard-Oxford name, e.g. Left_Superior_Frontal_Gyrus")
    label: str
    lobe: str
    hemisphere: Literal["left", "right", "midline"]
    volume_ml: float = Field(description="input-space volume of the region inside the structure")
    fraction: float = Field(description="share of the region inside the structure")
    mean_probability: float = Field(description="mean atlas probability (0..1) over the overlap")
    saliency_share: float | None = Field(description="share of the saliency mass in the structure")
    code: CodedConcept | None = Field(None, description="SNOMED CT code of the structure, or of its lobe (code_scope)")
    code_scope: Literal["structure", "lobe", "uncoded"] | None = Field(
        None, description="structure: the code names it; lobe: it has no code of its own, the lobe's is given; "
                          "uncoded: no code fits (xai_core.codes)")


class LocationInfo(_Model):
    atlas: str = "Harvard-Oxford cortical and subcortical, max-probability >= 25 %, on MNI152 1 mm"
    coordinates: str = "MNI152 RAS mm"
    region: str = Field(description="which region was labelled, e.g. 'explanation mask'")
    structures: list[StructureInfo]
    top_structure: str | None
    lobes: dict[str, float]
    hemisphere: Literal["left", "right", "bilateral", "none"]
    left_fraction: float | None
    crosses_midline: bool
    outside_atlas_fraction: float | None
    centroid_mni_ras_mm: list[float] | None
    peak_mni_ras_mm: list[float] | None
    peak_structure: str | None
    volume_ml: float
    components: int
    notes: list[str]


class LevelLabel(_Model):
    """Anatomy of one nested saliency level (the viewer names its segment from it)."""

    level: int = Field(description="1 = widest (top p_1 %), highest = most salient")
    percent: float = Field(description="top-p % of brain voxels")
    voxels: int
    volume_ml: float
    top_structure: str | None = Field(description="Harvard-Oxford structure holding the largest share")
    hemisphere: Literal["left", "right", "bilateral", "none"]
    structures: list[str] = Field(description="up to three structures, largest share first")


class CounterfactualInfo(_Model):
    status: Literal["done", "skipped"]
    reason: str | None = None
    infiller: dict[str, Any] | None = None
    region_voxels: int | None = None
    region_ml: float | None = None
    label_before: str | None = None
    p_before: float | None = None
    label_after: str | None = None
    p_after: float | None = None
    p_before_class_after: float | None = None
    change: float | None = None
    lesion_probability_before: float | None = None
    lesion_probability_after: float | None = None
    probabilities_before: dict[str, float] | None = None
    probabilities_after: dict[str, float] | None = None
    sentence: str | None = None


class QualityFlag(_Model):
    code: Literal["registration_failed", "empty_mask", "flat_map", "mostly_unlabelled", "weak_counterfactual",
                  "counterfactual_skipped", "explained_class_not_predicted", "failed_sanity_check",
                  "out_of_distribution"]
    severity: Literal["info", "warning", "error"]
    message: str


class Findings(_Model):
    """Findings record, version :data:`SCHEMA_VERSION`."""

    schema_version: Literal["1.1"] = SCHEMA_VERSION
    study: StudyGeometry
    model: ModelInfo
    prediction: PredictionInfo
    explanation: ExplanationInfo
    mask: MaskStats
    registration: RegistrationInfo | None
    location: LocationInfo | None
    counterfactual: CounterfactualInfo
    levels: list[LevelLabel] = Field(default_factory=list, description="anatomy of each saliency level")
    quality_flags: list[QualityFlag]
    software: dict[str, str]


def findings_json_schema() -> dict[str, Any]:
    """JSON Schema of :class:`Findings` (pydantic's ``model_json_schema``)."""
    return Findings.model_json_schema()


def quality_flags(f: Findings, sanity: dict[str, Any] | None = None,
                  ood: dict[str, Any] | None = None) -> list[QualityFlag]:
    """The quality flags a findings record calls for (rules in the messages). ``sanity``: the method's
    recorded randomisation verdict (:func:`xai_core.sanity.recorded_verdict`), when there is one;
    ``ood``: the out-of-distribution guard's verdict on the input (:class:`xai_core.ood.OODResult`)."""
    flags = []
    if ood is not None and ood.get("flagged"):
        flags.append(QualityFlag(code="out_of_distribution", severity="error",
                                 message="the input is not what the model was made for ("
                                         + "; ".join(ood.get("reasons") or ["unlike its validation studies"])
                                         + "): its class and this explanation are not to be trusted"))
    if f.registration is not None and f.registration.likely_failed:
        flags.append(QualityFlag(code="registration_failed", severity="error",
                                 message=f"registration to MNI152 likely failed ({f.registration.reason}); "
                                         "anatomical labels are unreliable"))
    if f.explanation.flat and f.explanation.flat[0]:
        flags.append(QualityFlag(code="flat_map", severity="error",
                                 message="the saliency map is flat: it ranks no region above another"))
    if f.mask.empty:
        flags.append(QualityFlag(code="empty_mask", severity="warning",
                                 message=f"the explanation mask is empty ({f.mask.reason})"))
    if f.location is not None and (f.location.outside_atlas_fraction or 0.0) > MOSTLY_UNLABELLED:
        flags.append(QualityFlag(code="mostly_unlabelled", severity="info",
                                 message=f"{100 * f.location.outside_atlas_fraction:.0f} % of the region lies "
                                         "outside every atlas structure (white matter, or outside the brain)"))
    cf = f.counterfactual
    if cf.status == "skipped":
        flags.append(QualityFlag(code="counterfactual_skipped", severity="info",
                                 message=f"no counterfactual check: {cf.reason}"))
    elif cf.change is not None and cf.change > -WEAK_COUNTERFACTUAL_CHANGE and cf.label_before != "none":
        # For a "no lesion" prediction healthy in-fill is expected to change little: no flag.
        flags.append(QualityFlag(code="weak_counterfactual", severity="warning",
                                 message=f"in-filling the region changes the probability of {cf.label_before} by "
                                         f"{cf.change:+.2f} only (less than {WEAK_COUNTERFACTUAL_CHANGE} down): "
                                         "the region does not carry the prediction"))
    if f.explanation.targets and f.explanation.targets[0] != f.prediction.label:
        flags.append(QualityFlag(code="explained_class_not_predicted", severity="info",
                                 message=f"the map explains {f.explanation.targets[0]}, the model predicts "
                                         f"{f.prediction.label}"))
    if sanity is not None and not sanity.get("passed", True):
        flags.append(QualityFlag(code="failed_sanity_check", severity="warning",
                                 message=f"{f.explanation.method} failed the model randomisation check: its map keeps "
                                         f"a rank correlation of {sanity['final_rank_correlation']:.2f} with the "
                                         "original once the model is random, so it shows the image more than the "
                                         "model's reasoning"))
    return flags


def level_labels(exp, registration, settings: Settings | None = None) -> list[LevelLabel]:
    """Atlas labels of each nested saliency level of ``exp`` (``exp.mask.levels``), widest first."""
    from .atlas import label_region

    percents = sorted(exp.mask.level_thresholds, reverse=True)
    voxel_ml = float(np.prod(exp.image.spacing)) / 1000.0
    out = []
    for n, pct in enumerate(percents, start=1):
        region = exp.mask.levels >= n
        if not region.any():
            continue
        lab = label_region(exp.image.with_array(region.astype(np.uint8)), registration, settings=settings)
        out.append(LevelLabel(level=n, percent=float(pct), voxels=int(region.sum()),
                              volume_ml=round(float(region.sum()) * voxel_ml, 3), top_structure=lab.top_structure,
                              hemisphere=lab.hemisphere, structures=[s.name for s in lab.structures[:3]]))
    return out


def build_findings(exp, *, model=None, registration=None, bspline: bool | None = None,
                   infiller=None, with_counterfactual: bool = True, with_levels: bool = False,
                   settings: Settings | None = None, sanity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Findings for an explanation, as a JSON-ready dict that validates against :class:`Findings`.

    Args:
        exp: a :class:`~xai_core.pipeline.Explanation`.
        model: the model that made it (re-predicts for the counterfactual); default: loaded by the
            name on ``exp.model_card`` (``xai_core.models.load``).
        registration: a :class:`~xai_core.registration.RegistrationResult` of ``exp.image`` when
            already computed; otherwise the image is registered here (a few seconds).
        bspline: add the deformable stage when registering here (default: settings).
        infiller: the counterfactual in-filler (default: :class:`~xai_core.counterfactual.TemplateInFiller`).
        with_counterfactual: False skips the counterfactual (recorded as skipped).
        with_levels: also label each saliency level (``levels``; about 0.5 s a level).
        sanity: the method's randomisation verdict (default: the one recorded for this method and model
            version by ``xai sanity`` / ``xai evaluate``, :func:`xai_core.sanity.recorded_verdict`).
        settings: passed to the registration, the labelling, the in-filler and the model loader
            (default ``Settings()``).

    Returns:
        ``Findings.model_dump(mode="json")``.
    """
    from .atlas import label_region
    from .counterfactual import TemplateInFiller, counterfactual
    from .registration import register_to_mni

    cfg = settings or Settings()
    s = exp.summary()
    card = exp.model_card
    reg = registration if registration is not None else register_to_mni(exp.image, bspline=bspline, settings=cfg)
    empty = bool(exp.mask.empty) or not bool(exp.mask.mask.any())
    lab = label_region(exp.mask_image(), reg, exp.primary, settings=cfg)
    location = LocationInfo(region=f"{exp.method} explanation mask of {exp.targets[0]}", **{
        k: v for k, v in lab.to_dict().items() if k not in ("mni_voxels", "registration_failed")})
    for st in location.structures:
        st.code, st.code_scope = _structure_code(st.name)

    if not with_counterfactual:
        cf = CounterfactualInfo(status="skipped", reason="not requested")
    elif empty:
        cf = CounterfactualInfo(status="skipped", reason="the explanation mask is empty")
    else:
        if model is None:
            from .models import load

            model = load(card["name"], settings=cfg)
        res = counterfactual(exp.image, exp.mask.mask, model, infiller or TemplateInFiller(reg, settings=cfg),
                             prediction=exp.prediction)
        cf = CounterfactualInfo(status="done", **res.to_dict())

    f = Findings(
        study=StudyGeometry(size=s["image"]["size"], spacing_mm=[float(v) for v in s["image"]["spacing"]],
                            origin_lps_mm=[float(v) for v in s["image"]["origin"]],
                            direction=[float(v) for v in s["image"]["direction"]]),
        model=ModelInfo(name=card["name"], version=card["version"], weights_sha256=card.get("weights_sha256", ""),
                        classes=list(card["classes"])),
        prediction=PredictionInfo(
            label=s["prediction"]["label"], probabilities=s["prediction"]["probabilities"],
            calibration=s["prediction"]["calibration"], temperature=s["prediction"]["temperature"],
            lesion_volume_ml_segmentation_head=s["prediction"]["lesion_volume_ml_segmentation_head"],
            lesion_type_code=_coded(lesion_type_code(s["prediction"]["label"]))),
        explanation=ExplanationInfo(method=exp.method, targets=list(exp.targets), params=s["params"],
                                    flat=list(s["saliency"]["flat"]), peak_lps_mm=s["saliency"]["peak_lps_mm"]),
        mask=MaskStats(**{k: s["mask"][k] for k in MaskStats.model_fields}),
        registration=RegistrationInfo(**_finite(reg.quality())),
        location=location, counterfactual=cf, quality_flags=[], software=s["software"],
        levels=level_labels(exp, reg, settings=cfg) if with_levels else [])
    if sanity is None:
        from .sanity import recorded_verdict

        sanity = recorded_verdict(exp.method, card["name"], card["version"], cfg)
    f.quality_flags = quality_flags(f, sanity, ood=getattr(exp, "ood", None))
    return f.model_dump(mode="json")


def _coded(c) -> CodedConcept | None:
    return CodedConcept(**c.as_dict()) if c is not None else None


def _structure_code(name: str) -> tuple[CodedConcept | None, str | None]:
    """(code, scope) of a Harvard-Oxford structure; (None, None) for a name the code table lacks."""
    try:
        sc = structure_code(name)
    except KeyError:
        return None, None
    return _coded(sc.concept), sc.scope


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf floats as None: JSON has no NaN."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}

"""The one result schema: the JSON Schema in docs/ is the models' own, and what the pipeline
writes validates against it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from xai_core.schema import ExplanationResult, result_json_schema

DOCS = Path(__file__).resolve().parent.parent / "docs" / "result_schema.json"


def test_docs_schema_is_the_models_schema():
    assert json.loads(DOCS.read_text()) == json.loads(json.dumps(result_json_schema())), \
        "docs/result_schema.json is stale: python -m xai_core.schema > docs/result_schema.json"


def test_schema_names_every_reply_type_and_the_findings():
    s = result_json_schema()
    assert set(s["properties"]) == {"explanation", "classification", "segmentation", "findings", "vqa"}
    assert {"answer", "answer_type", "confidence", "top", "tokens", "slice", "model"} <= set(
        s["$defs"]["VQAAnswer"]["properties"])
    expl = s["$defs"]["ExplanationResult"]
    assert {"prediction", "method", "method_title", "saliency", "mask", "findings", "report"} <= set(expl["properties"])
    assert "levels" in s["$defs"]["Findings"]["properties"]


def test_inner_models_refuse_unknown_keys():
    good = {"label": "glioma", "probabilities": {"glioma": 1.0}, "logits": [1.0],
            "lesion_volume_ml_segmentation_head": 0.0}
    from xai_core.schema import PredictionSummary

    PredictionSummary.model_validate(good)
    with pytest.raises(ValidationError):
        PredictionSummary.model_validate({**good, "probabilty": 1})


def test_pipeline_summary_validates(default_model, heldout_studies):
    from xai_core.io import read_image
    from xai_core.pipeline import explain

    row = next(r for r in heldout_studies if r["label"] != "none")
    exp = explain(read_image(row["image"]), "gradcam", model=default_model)
    s = exp.summary()
    ExplanationResult.model_validate(s)
    assert s["method_title"].startswith("Grad-CAM") and s["saliency"]["display"] == "minmax"
    assert len(s["saliency"]["raw_max"]) == 1 and s["saliency"]["raw_max"][0] > 0

"""XAIExplain text builders: segment names from findings, summaries, answers, label provenance."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[1] / "slicer_extension" / "XAIExplain"
sys.path.insert(0, str(MODULE_DIR))

from XAIExplainLib import report  # noqa: E402

RESULT = {
    "result_id": "r1",
    "method": "gradcam++",
    "targets": ["glioma"],
    "params": {"target": "predicted"},
    "prediction": {"label": "glioma", "probabilities": {"healthy": 0.05, "glioma": 0.9, "metastasis": 0.05}},
    "mask": {"empty": False, "volume_ml": 12.345, "fraction_of_brain": 0.0321, "components": 2,
             "levels_percent": [1.0, 5.0, 10.0, 20.0]},
    "model": {"name": "brain-lesion-3d", "version": "1.0.0"},
}


@pytest.mark.parametrize("value,expected", [
    ("Left_Insular_Cortex", ["Left Insular Cortex"]),
    (["A_b", "C"], ["A b", "C"]),
    ([{"name": "small", "fraction": 0.1}, {"region": "big", "fraction": 0.8}], ["big", "small"]),
    ({"x": 0.2, "y": 0.7}, ["y", "x"]),
    ({"label": "one"}, ["one"]),
    (None, []),
    (42, []),
])
def test_region_names_accepts_the_documented_shapes(value, expected):
    assert report.region_names(value) == expected


def test_level_names_from_percent_and_findings():
    with_findings = {**RESULT, "findings": [{"level": 3, "regions": ["Right_Putamen"]},
                                            {"percent": 1.0, "anatomy": {"Left_Thalamus": 0.9, "Brain_Stem": 0.1}}]}
    assert report.level_segment_names(with_findings, 4) == [
        "Saliency top 20 %", "Saliency top 10 %", "Saliency top 5 % – Right Putamen",
        "Saliency top 1 % – Left Thalamus, Brain Stem"]
    # Without percentages (or with a count that does not match) the levels are numbered.
    assert report.level_segment_names({}, 2) == ["Saliency level 1", "Saliency level 2"]
    assert report.level_segment_names(RESULT, 3) == ["Saliency level 1", "Saliency level 2", "Saliency level 3"]


def test_mask_name_with_fraction_and_anatomy():
    assert report.mask_segment_name(RESULT) == "Saliency mask (3.2 % of brain)"
    assert report.mask_segment_name({"anatomy": ["Left_Caudate"]}) == "Saliency mask – Left Caudate"
    named = {**RESULT, "findings": {"mask": {"anatomy": [{"name": "A", "fraction": 0.1},
                                                         {"name": "B", "fraction": 0.5}, {"name": "C"}]}}}
    assert report.mask_segment_name(named) == "Saliency mask (3.2 % of brain) – B, A"


def test_summary_text_lists_prediction_probabilities_mask_findings_report():
    result = {**RESULT, "findings": [{"region": "Left_Insula", "fraction": 0.61234, "level": 4},
                                     {"region": "Left_Putamen", "fraction": 0.2}],
              "report": {"text": "Saliency concentrates in the left insula."}}
    text = report.summary_text(result)
    lines = text.splitlines()
    assert lines[0] == "Method: gradcam++ (target: glioma)"
    assert lines[1] == "Prediction: glioma (p = 0.900)"
    assert lines[3].split() == ["glioma", "0.900"]  # most probable first
    assert "Saliency mask: 12.3 ml, 3.2 % of brain, 2 component(s)" in text
    assert "  region | fraction | level" in text and "  Left Insula | 0.6123 | 4" in text
    assert text.endswith("Saliency concentrates in the left insula.\nModel: brain-lesion-3d 1.0.0")


def test_summary_html_escapes_server_text():
    result = {**RESULT, "prediction": {"label": "<script>x</script>", "probabilities": {"<b>": 1.0}},
              "report": "a & b\nc"}
    out = report.summary_html(result)
    assert "<script>" not in out and "&lt;script&gt;" in out and "&lt;b&gt;" in out
    assert "a &amp; b<br>c" in out
    assert out.count("&#9608;") == 20  # the probability bar of p = 1


def test_empty_mask_and_missing_fields_do_not_break_the_text():
    assert report.summary_text({}) == ""
    assert "empty (flat map)" in report.summary_text({"mask": {"empty": True, "reason": "flat map"}})
    assert report.findings_table({"findings": "not a list"}) == ([], [])


def test_answer_text():
    assert report.answer_text({"answer": "Yes, left frontal.", "confidence": 0.834}) == \
        "Yes, left frontal. (confidence 0.83)"
    assert report.answer_text({}) == "The server gave no answer."
    assert report.answer_html({"answer": {"text": "a<b"}}) == "<p>a&lt;b</p>"


def test_label_provenance():
    p = report.label_provenance(RESULT, "gradcampp", ["Saliency mask"], "AB", "XAIExplain 0.1.0")
    assert p["source"] == "corrected_saliency" and p["method"] == "gradcam++" and p["task"] == "gradcampp"
    assert p["model"] == "brain-lesion-3d" and p["model_version"] == "1.0.0" and p["result_id"] == "r1"
    assert p["target"] == "predicted" and p["segments"] == ["Saliency mask"] and p["user"] == "AB"
    assert p["created"].endswith("+00:00")
    bare = report.label_provenance(None, None, ["s"], "", "c")
    assert bare["method"] is None and bare["user"] is None and bare["result_id"] is None

"""XAIExplain text from a reply of the result schema: validator, segment names, findings table, flags,
counterfactual, report Markdown, label parameters.

The replies are the module's own sample (``selftest.sample_result``) checked here with the project's
pydantic models (``xai_core.schema``), so that every case is a reply the server could send.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

from xai_core.schema import ExplanationResult

MODULE_DIR = Path(__file__).resolve().parents[1] / "slicer_extension" / "XAIExplain"
sys.path.insert(0, str(MODULE_DIR))

from XAIExplainLib import report, schema  # noqa: E402
from XAIExplainLib.selftest import sample_result  # noqa: E402

GEOMETRY = {"size": [12, 14, 16], "spacing": [0.9, 1.3, 2.2], "origin": [1.0, 2.0, 3.0],
            "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]}


@pytest.fixture
def result() -> dict:
    r = sample_result(GEOMETRY)
    ExplanationResult.model_validate(r)  # a reply the server could send
    return r


@pytest.fixture
def bare() -> dict:
    """The same request without ``report: true``: no findings, no report."""
    r = sample_result(GEOMETRY, with_findings=False)
    ExplanationResult.model_validate(r)
    assert r["findings"] is None and r["report"] is None
    return r


# ------------------------------------------------------------------------------------ validator

def test_valid_replies_pass_the_check(result, bare):
    assert schema.check_reply(result) == [] and schema.check_reply(bare) == []
    assert report.check(result) is result


def test_check_names_every_missing_required_field_and_wrong_type(result):
    del result["mask"]["levels_percent"]
    del result["prediction"]
    result["method"] = 7
    result["findings"]["levels"][1]["hemisphere"] = "up"
    del result["findings"]["location"]["structures"][1]["label"]
    problems = schema.check_reply(result)
    assert "mask.levels_percent is missing" in problems
    assert "prediction is missing" in problems
    assert "method should be string, not an integer 7" in problems
    assert ("findings.levels[1].hemisphere should be one of 'left', 'right', 'bilateral', 'none', not a string "
            '"up"') in problems
    assert "findings.location.structures[1].label is missing" in problems
    assert len(problems) == 5, problems
    with pytest.raises(schema.ReplyError, match=r"does not follow the result schema 2\.0.*mask\.levels_percent "
                                                r"is missing") as e:
        report.check(result)
    assert e.value.problems == problems


def test_check_reads_item_and_value_types(result):
    result["prediction"]["probabilities"]["glioma"] = "high"
    result["mask"]["levels_percent"] = [20.0, "10"]
    result["findings"]["quality_flags"] = {"code": "x"}
    assert schema.check_reply(result) == [
        'prediction.probabilities should be an object of number, not an object {"none": 0.05, "glioma": "high", '
        '"mening...',
        'mask.levels_percent should be an array of number, not an array [20.0, "10"]',
        'findings.quality_flags should be an array of object, not an object {"code": "x"}']


def test_optional_fields_may_be_absent_or_null_and_unknown_fields_are_ignored(bare, result):
    for key in ("findings", "report", "result_id", "task", "artifacts"):
        bare.pop(key)
    bare["a_field_from_a_newer_server"] = {"anything": 1}
    result["findings"]["location"]["structures"][0]["code"] = {"scheme": "SCT", "value": "36813005"}
    result["findings"]["counterfactual"]["sentence"] = None
    assert schema.check_reply(bare) == [] and schema.check_reply(result) == []


def test_another_major_schema_version_is_refused(result):
    result["schema_version"] = "3.0"
    assert schema.check_reply(result) == ["schema_version is 3.0, the module reads 2.0"]
    result["schema_version"] = "2.7"
    assert schema.check_reply(result) == []
    assert schema.check_reply([1]) == ["the reply is an array [1], not a JSON object"]


def test_reading_a_path_outside_reads_is_a_programming_error(result):
    with pytest.raises(KeyError, match="not in schema.READS"):
        schema.get(result, "saliency.peak_lps_mm")
    assert schema.get(result, "findings.location.top_structure") == "Left_Insular_Cortex"
    assert schema.get({"findings": None}, "findings.location.top_structure", "x") == "x"
    assert schema.items({"findings": {"levels": None}}, "findings.levels") == []


def test_the_servers_schema_is_compared_field_by_field():
    served = copy.deepcopy(schema.load_schema())
    assert schema.server_schema_problems(served) == []
    served["$defs"]["Findings"]["properties"]["new_thing"] = {"type": "string"}  # additions do not matter
    assert schema.server_schema_problems(served) == []
    del served["$defs"]["MaskSummary"]["properties"]["levels_percent"]
    del served["$defs"]["StructureInfo"]["properties"]["lobe"]
    problems = schema.server_schema_problems(served)
    assert [p.split(" (")[0] for p in problems] == ["mask.levels_percent is not in the server's schema",
                                                    "findings.location.structures[].lobe is not in the server's schema"]
    # A 2.0 server from before the vqa task has no vqa reply (and sends none): nothing to warn about;
    # a vqa reply without a field the module reads is a problem.
    older = copy.deepcopy(schema.load_schema())
    del older["properties"]["vqa"]
    assert schema.server_schema_problems(older) == []
    newer = copy.deepcopy(schema.load_schema())
    del newer["$defs"]["VQAAnswer"]["properties"]["confidence"]
    assert [p.split(" (")[0] for p in schema.server_schema_problems(newer)] == [
        "confidence is not in the server's schema"]
    del older["properties"]["explanation"]
    assert schema.server_schema_problems(older) == ["the server's schema has no explanation reply"]
    assert schema.server_schema_problems({"version": "3.1", "properties": {}}) == [
        "the server's result schema is 3.1, the module reads 2.0"]
    assert schema.server_schema_problems([]) == ["the server's schema is not a result schema document"]


# ------------------------------------------------------------------------------------ names

def test_level_and_mask_segments_are_named_by_percent_and_anatomy(result):
    assert report.level_segment_names(result, 4) == [
        "Saliency top 20 % – Left central opercular cortex", "Saliency top 10 %",
        "Saliency top 5 % – Left insular cortex", "Saliency top 1 % – Left insular cortex"]
    assert report.mask_segment_name(result) == "Salient region – Left insular cortex"


def test_structure_names_come_from_labels_else_from_the_atlas_name(result):
    assert report.structure_name(result, "Left_Insular_Cortex") == "Left insular cortex"
    # Not in the mask's structure list (a level's own top structure): spaces, lower case like the labels.
    result["findings"]["levels"][0]["top_structure"] = "Right_Frontal_Pole"
    assert report.level_segment_names(result, 4)[0] == "Saliency top 20 % – Right frontal pole"


def test_without_findings_names_carry_the_level_percent_only(bare):
    assert report.level_segment_names(bare, 4) == ["Saliency top 20 %", "Saliency top 10 %", "Saliency top 5 %",
                                                   "Saliency top 1 %"]
    assert report.level_segment_names(bare, 3)[-1] == "Saliency top 5 %"  # the top level was empty
    assert report.mask_segment_name(bare) == "Salient region (3 % of brain)"
    bare["mask"].update(empty=True, reason="flat map")
    assert report.mask_segment_name(bare) == "Salient region (empty)"


def test_more_levels_than_percentages_is_a_reply_error(bare):
    with pytest.raises(schema.ReplyError, match="levels file has 5 levels but mask.levels_percent lists 4"):
        report.level_segment_names(bare, 5)


def test_title(result):
    assert report.explanation_title(result) == "XAI Grad-CAM++ (glioma)"


# ------------------------------------------------------------------------------------ findings

def test_findings_table_lists_structure_lobe_side_volume_and_shares(result, bare):
    cols, rows = report.findings_table(result)
    assert cols == ("Structure", "Lobe", "Side", "Volume (ml)", "Share of region", "Share of saliency")
    assert rows == [["Left insular cortex", "insula", "left", "1.90", "61.0 %", "54.9 %"],
                    ["Left central opercular cortex", "frontal", "left", "0.80", "25.0 %", "22.5 %"]]
    result["findings"]["location"]["structures"][1]["saliency_share"] = None
    assert report.findings_table(result)[1][1][-1] == ""
    assert report.findings_table(bare) == (cols, [])


def test_quality_flags_errors_first_and_counterfactual_sentence(result, bare):
    result["findings"]["quality_flags"].append({"code": "registration_failed", "severity": "error",
                                                "message": "registration to MNI152 likely failed"})
    assert report.quality_flags(result) == [
        ("error", "registration_failed", "registration to MNI152 likely failed"),
        ("info", "mostly_unlabelled", "14 % of the region lies outside every atlas structure")]
    assert report.counterfactual_sentence(result).startswith("In-filling the region with healthy tissue lowers")
    assert report.quality_flags(bare) == [] and report.counterfactual_sentence(bare) is None


def test_out_of_distribution_input_is_a_warning_with_or_without_findings(result, bare):
    ood = {"flagged": True, "reasons": ["a 2-D image stacked into 3-D: all 64 slices are identical"],
           "score": None, "threshold": None}
    bare["ood"] = ood
    ExplanationResult.model_validate(bare)
    flags = report.quality_flags(bare)
    assert flags[0][:2] == ("error", "out_of_distribution") and "stacked into 3-D" in flags[0][2]
    assert "stacked into 3-D" in report.summary_text(bare) and "out_of_distribution" in report.summary_html(bare)
    # The findings carry the server's own flag: it is shown once.
    result["ood"] = ood
    result["findings"]["quality_flags"].insert(0, {"code": "out_of_distribution", "severity": "error",
                                                   "message": "the input is not what the model was made for"})
    assert [c for _, c, _ in report.quality_flags(result)].count("out_of_distribution") == 1
    bare["ood"] = {**ood, "flagged": False}
    assert report.quality_flags(bare) == []


def test_summary_text_has_prediction_location_flags_counterfactual_table_report(result):
    text = report.summary_text(result)
    lines = text.splitlines()
    assert lines[0] == "Method: Grad-CAM++ (target: glioma)"
    assert lines[1] == "Prediction: glioma (p = 0.810)"
    assert lines[3].split() == ["glioma", "0.810"]  # most probable first
    assert "Saliency mask: 0.312 ml, 3 % of brain, 1 component(s)" in lines
    assert "Location: left hemisphere, mostly Left insular cortex" in lines
    assert "Info: 14 % of the region lies outside every atlas structure" in lines
    assert any(line.startswith("Counterfactual: In-filling the region") for line in lines)
    assert "  Left insular cortex | insula | left | 1.90 | 61.0 % | 54.9 %" in lines
    assert "Report:" in lines and "- **Prediction:** glioma (p = 0.81)." in lines
    assert lines[-1] == "Model: brain-lesion-3d 1.2.0"


def test_summary_html_shows_report_as_html_and_escapes_server_text(result, bare):
    result["prediction"]["label"] = "<script>x</script>"
    result["prediction"]["probabilities"] = {"<b>": 1.0}
    result["findings"]["quality_flags"][0]["message"] = "a < b & c"
    out = report.summary_html(result)
    assert "<script>" not in out and "&lt;script&gt;" in out and "&lt;b&gt;" in out
    assert "a &lt; b &amp; c" in out and "color:#555555" in out
    assert out.count("&#9608;") == 20  # the probability bar of p = 1
    assert "<h3>Draft report</h3>" in out and "<li><b>Prediction:</b> glioma (p = 0.81).</li>" in out
    assert "<td>Left insular cortex</td><td>insula</td><td>left</td>" in out
    assert "without the report option" in report.summary_html(bare)


def test_markdown_html_subset():
    md = ("# Title\n\nSome *soft* and **bold** text\ncontinued with `code`.\n\n- one\n- two <x>\n\n"
          "| a | b |\n|---|:---:|\n| 1 | **2** |\n\nEnd & done")
    assert report.markdown_html(md).splitlines() == [
        "<h3>Title</h3>", "<p>Some <i>soft</i> and <b>bold</b> text continued with <code>code</code>.</p>",
        "<ul>", "<li>one</li>", "<li>two &lt;x&gt;</li>", "</ul>",
        "<table border='1' cellspacing='0' cellpadding='2'><tr><th>a</th><th>b</th></tr>",
        "<tr><td>1</td><td><b>2</b></td></tr>", "</table>", "<p>End &amp; done</p>"]


# ------------------------------------------------------------------------------------ answers, labels

def test_answer_text():
    assert report.answer_text({"answer": "Yes, left frontal.", "confidence": 0.834}) == \
        "Yes, left frontal. (confidence 0.83)"
    assert report.answer_text({}) == "The server gave no answer."
    assert report.answer_html({"answer": "a<b"}) == "<p>a&lt;b</p>"


def test_label_params_send_the_result_id_and_leave_provenance_to_the_server(result):
    p = report.label_params(result, ["Salient region – Left insular cortex"], "AB")
    assert p == {"source": "corrected_saliency", "result_id": "selftest",
                 "segments": ["Salient region – Left insular cortex"], "annotator": "AB"}
    # Nothing the server stamps from the result id comes from the client.
    assert not {"method", "model", "model_version", "task", "created", "user"} & set(p)
    assert report.label_params(None, ["s"], "") == {"source": "manual", "segments": ["s"]}
    no_id = copy.deepcopy(result)
    no_id["result_id"] = None
    assert report.label_params(no_id, [], None) == {"source": "manual", "segments": []}


def test_medlime_evidence_cases_are_named_in_the_summary(bare):
    r = copy.deepcopy(bare)
    assert report.evidence_line(r) is None  # other methods carry no evidence
    cases = [{"case": f"brain_s{i}", "label": "glioma", "distance": 0.1 * i, "weight": w}
             for i, w in enumerate((0.5, 0.3, 0.2))]
    r["saliency"]["evidence"] = {"mode": "knn", "library": "evidence.npz", "k": 3, "bandwidth": 0.1, "cases": cases}
    ExplanationResult.model_validate(r)  # the typed field the server fills
    assert schema.check_reply(r) == []
    line = report.evidence_line(r)
    assert line == ("Evidence: 3 similar cases: brain_s0 (glioma, weight 0.50), brain_s1 (glioma, weight 0.30), "
                    "brain_s2 (glioma, weight 0.20)")
    assert line in report.summary_text(r) and "brain_s2 (glioma, weight 0.20)" in report.summary_html(r)
    r["saliency"]["evidence"] = {"mode": "off", "reason": "no evidence library loaded", "cases": []}
    assert report.evidence_line(r) == "Evidence: none used (no evidence library loaded)"

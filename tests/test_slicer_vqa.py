"""XAIExplain's question box, library side, on slicer-core (no Qt, no server): the Red view's slice as the
``vqa`` task's plane and LPS position, the request, the reply read through the schema copy, the answer's
text, and the answer's heatmap on that slice. The module against the real server is in
tests/test_slicer_vqa_e2e.py."""

from __future__ import annotations

import copy
import html
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "slicer_extension" / "XAIExplain"
sys.path.insert(0, str(MODULE_DIR))

import slicer  # noqa: E402
import vtk  # noqa: E402
from XAIExplainLib import report  # noqa: E402
from XAIExplainLib import schema as lib_schema  # noqa: E402
from XAIExplainLib.client import VQA_METHODS, VQA_PLANES, vqa_params  # noqa: E402
from XAIExplainLib.headless import headless_scene  # noqa: E402
from XAIExplainLib.scene import (  # noqa: E402
    PLANE_TOLERANCE_DEG,
    ObliqueSliceError,
    SlicePosition,
    find_slice_node,
    slice_position,
)
from XAIExplainLib.schema import ReplyError  # noqa: E402
from XAIExplainLib.selftest import oblique_ijk_to_ras, synthetic_input  # noqa: E402


def _rot(axis: str, degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    c, s = np.cos(t), np.sin(t)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]), "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def _slice_to_ras(x_axis, y_axis, normal, origin) -> np.ndarray:
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x_axis, y_axis, normal, origin
    return m


def _views_scene():
    """A headless scene with the module logics and Red/Yellow/Green slice nodes made the way the
    application makes them (from the scene's default slice node, which carries the orientation presets)."""
    xs = headless_scene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(xs.scene)
    for view, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        node = xs.scene.CreateNodeByClass("vtkMRMLSliceNode")
        node.SetLayoutName(view)
        node.SetSingletonTag(view)
        xs.scene.AddNode(node)
        node.UnRegister(None)
        assert node.SetOrientation(orientation)
    return xs


@pytest.fixture
def xs():
    return _views_scene()


# ------------------------------------------------------------------------------ Red view -> plane, LPS mm

@pytest.mark.parametrize(("orientation", "offset", "plane", "axis", "lps_mm"), [
    ("Axial", 12.5, "axial", "S", 12.5),
    ("Axial", -40.25, "axial", "S", -40.25),
    # Slicer 5.12's coronal normal points anteriorly: offset = A, so P = -A.
    ("Coronal", 12.5, "coronal", "P", -12.5),
    # Its sagittal normal points to the patient's left: offset = -R = L. Reading GetSliceOffset()
    # as R (the brief's L = -R with R = offset) would give -12.5, the wrong side of the head.
    ("Sagittal", 12.5, "sagittal", "L", 12.5),
    ("Sagittal", -7.0, "sagittal", "L", -7.0),
])
def test_red_view_orientation_presets_give_the_lps_plane_and_position(xs, orientation, offset, plane, axis, lps_mm):
    red = find_slice_node(xs.scene, "Red")
    assert red is not None and red.GetID() == "vtkMRMLSliceNodeRed"
    assert red.SetOrientation(orientation)
    red.SetSliceOffset(offset)
    pos = slice_position(red)
    assert (pos.plane, pos.axis) == (plane, axis)
    assert pos.slice_mm == pytest.approx(lps_mm, abs=1e-9) and pos.tilt_deg == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("orientation", "plane", "lps_mm"),
                         [("Axial", "axial", 5.0), ("Coronal", "coronal", -4.0), ("Sagittal", "sagittal", 3.0)])
def test_jumping_to_a_point_gives_that_points_lps_coordinate(xs, orientation, plane, lps_mm):
    """Jump the view to RAS (-3, 4, 5), i.e. LPS (3, -4, 5): each plane reports that point's L, P or S."""
    red = find_slice_node(xs.scene, "Red")
    red.SetOrientation(orientation)
    red.JumpSliceByOffsetting(-3.0, 4.0, 5.0)
    pos = slice_position(red)
    assert pos.plane == plane and pos.slice_mm == pytest.approx(lps_mm, abs=1e-9)


def test_slice_to_ras_matrices_with_any_normal_sign_and_in_plane_rotation():
    # Axial with the normal pointing down and the image turned 30° in plane: still S = origin's S.
    r = _rot("z", 30.0)
    m = _slice_to_ras(r[:, 0], r[:, 1], (0, 0, -1), (10.0, -20.0, 33.0))
    assert slice_position(m) == SlicePosition("axial", "S", 33.0, 0.0)
    # Coronal at A = 7.5 (normal -A): P = -7.5.
    assert slice_position(_slice_to_ras((-1, 0, 0), (0, 0, 1), (0, -1, 0), (1.0, 7.5, 2.0))).slice_mm == -7.5
    # Sagittal at R = 21 (normal +R): L = -21.
    pos = slice_position(_slice_to_ras((0, 1, 0), (0, 0, 1), (1, 0, 0), (21.0, 3.0, -4.0)))
    assert (pos.plane, pos.axis, pos.slice_mm) == ("sagittal", "L", -21.0)
    assert pos.describe() == "sagittal slice at L = -21.0 mm"
    # A vtkMatrix4x4 is read too; a zero offset is 0.0, not -0.0.
    vm = vtk.vtkMatrix4x4()
    vm.SetElement(2, 3, 0.0)
    pos = slice_position(vm)
    assert pos == SlicePosition("axial", "S", 0.0, 0.0) and str(pos.slice_mm) == "0.0"
    assert str(slice_position(_slice_to_ras((-1, 0, 0), (0, 0, 1), (0, 1, 0), (0, 0.0, 0))).slice_mm) == "0.0"


def test_an_oblique_red_view_is_refused_with_a_clear_message(xs):
    red = find_slice_node(xs.scene, "Red")
    red.SetOrientation("Coronal")
    m = np.eye(4)
    m[:3, :3] = _rot("z", 20.0) @ np.array([[-1, 0, 0], [0, 0, 1], [0, 1, 0]])
    m[:3, 3] = (0.0, 5.0, 0.0)
    xs.set_slice_to_ras(red, m)
    with pytest.raises(ObliqueSliceError) as e:
        slice_position(red)
    text = str(e.value)
    assert "Red view is oblique" in text and "20.0°" in text and "(coronal)" in text
    assert "Axial, Coronal or Sagittal" in text
    # Within the tolerance the plane counts; just beyond it, it does not.
    for tilt, ok in ((0.3, True), (PLANE_TOLERANCE_DEG + 0.1, False)):
        r = _rot("x", tilt)
        m = _slice_to_ras(r[:, 0], r[:, 1], r[:, 2], (0.0, 0.0, -12.0))
        if ok:
            pos = slice_position(m)
            assert pos.plane == "axial" and pos.slice_mm == -12.0 and pos.tilt_deg == pytest.approx(tilt)
        else:
            with pytest.raises(ObliqueSliceError):
                slice_position(m)
    # A view exactly between two planes and a degenerate matrix are refused too.
    r = _rot("z", 45.0)
    with pytest.raises(ObliqueSliceError, match="oblique"):
        slice_position(_slice_to_ras((0, 0, 1), r[:, 1], r[:, 0], (0, 0, 0)))
    with pytest.raises(ObliqueSliceError, match="degenerate"):
        slice_position(np.zeros((4, 4)))


def test_slice_view_lookup_and_restoring_a_view(xs):
    assert find_slice_node(xs.scene, "Yellow").GetLayoutName() == "Yellow"
    assert find_slice_node(headless_scene().scene, "Red") is None  # no views: the widget says so
    red = find_slice_node(xs.scene, "Red")
    red.SetOrientation("Axial")
    red.SetSliceOffset(10.0)
    kept = vtk.vtkMatrix4x4()
    kept.DeepCopy(red.GetSliceToRAS())
    red.SetSliceOffset(-30.0)  # the user scrolled while the server answered
    xs.set_slice_to_ras(red, kept)
    assert red.GetSliceOffset() == pytest.approx(10.0) and slice_position(red).slice_mm == pytest.approx(10.0)


# ------------------------------------------------------------------------------ the request

def test_vqa_params_follow_the_task_contract():
    p = vqa_params("  Is there a lesion?  ", "coronal", -12.499999999997, "relig")
    assert p == {"question": "Is there a lesion?", "plane": "coronal", "slice_mm": -12.5, "method": "relig"}
    assert vqa_params("q", "axial", 0)["method"] == "relig" and VQA_METHODS[0] == "relig"
    assert isinstance(vqa_params("q", "axial", 3)["slice_mm"], float)
    assert set(VQA_PLANES) == {"axial", "coronal", "sagittal"} and set(VQA_METHODS) == {"relig", "ig", "none"}
    for args, words in ((("  ", "axial", 0.0), "type a question"), (("q", "oblique", 0.0), "plane must be one of"),
                        (("q", "axial", float("nan")), "finite"), (("q", "axial", "x"), "must be a number"),
                        (("q", "axial", 0.0, "gradcam"), "method must be one of")):
        with pytest.raises(ValueError, match=words):
            vqa_params(*args)


# ------------------------------------------------------------------------------ the reply

def sample_answer(**changes) -> dict:
    """A ``vqa`` reply as the contract describes it (checked against xai_core's VQAAnswer below)."""
    reply = {
        "schema_version": "2.0", "task": "vqa", "image_id": "slicer_T1_0123456789ab", "result_id": "r-vqa-1",
        "artifacts": {"saliency": "/xai/results/r-vqa-1/saliency.nii.gz"},
        "question": "Is there a lesion on the left?", "answer": "yes", "answer_type": "CLOSED", "confidence": 0.834,
        "top": [{"answer": "yes", "probability": 0.834}, {"answer": "no", "probability": 0.12},
                {"answer": "left", "probability": 0.02}, {"answer": "normal", "probability": 0.015},
                {"answer": "glioma", "probability": 0.011}],
        "tokens": [{"token": "[CLS]", "score": 0.9}, {"token": "is", "score": 0.02},
                   {"token": "there", "score": 0.01}, {"token": "a", "score": -0.03},
                   {"token": "lesion", "score": 0.41}, {"token": "on", "score": 0.0},
                   {"token": "the", "score": -0.01}, {"token": "left", "score": -0.25},
                   {"token": "?", "score": 0.05}, {"token": "[SEP]", "score": -0.6}],
        "method": "relig", "method_title": "RE-LIG", "params": {"n_samples": 8, "n_steps": 16},
        "slice": {"plane": "axial", "axis": "S", "position_mm": 12.5, "thickness_mm": 1.0, "size": [24, 20],
                  "spacing": [1.0, 1.0, 1.0], "origin": [-11.5, -9.5, 12.5], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]},
        "saliency": {"flat": False, "display": "abs, 99.5th percentile", "raw_max": 0.12, "nonzero_voxels": 310},
        "image": {"size": [24, 20, 16], "spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0],
                  "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]},
        "model": {"name": "brain-vqa", "version": "0.0.1-test"}, "timings_s": {"total": 1.0},
        "software": {"xai_core": "0.1"},
    }
    reply.update(changes)
    return reply


def test_sample_answer_follows_xai_cores_vqa_model():
    from xai_core.schema import VQAAnswer

    VQAAnswer.model_validate(sample_answer())


def test_every_answer_field_read_is_in_the_bundled_schema_and_read_only_through_its_path():
    import ast

    assert "vqa" in lib_schema.load_schema()["properties"], "the module's schema copy has no vqa reply"
    assert not hasattr(report, "ANSWER_READS")  # the paths live in the schema module, with the others
    for path in lib_schema.READS["vqa"]:
        lib_schema.field_schema(path, "vqa")  # KeyError names a path the schema lacks
    # The answer functions of report.py read only the vqa paths (not merely some reply's path).
    used = set()
    tree = ast.parse((MODULE_DIR / "XAIExplainLib" / "report.py").read_text())
    functions = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and "answer" in f.name]
    for node in (n for f in functions for n in ast.walk(f)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("get", "items")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
            used.add(node.args[1].value)
            assert node.args[1].value in lib_schema.READS["vqa"], f"report.py:{node.lineno}"
    assert len(used) >= 18, sorted(used)


def test_answer_check_accepts_the_contract_and_names_every_problem():
    good = sample_answer()
    assert report.answer_check(good) is good
    # Fields the module does not read may come and go (a newer server adds some).
    assert report.answer_check(sample_answer(extra_field={"x": 1}, saliency=None, method_title=None))
    bad = sample_answer(confidence="high")
    del bad["answer"]
    bad["slice"] = dict(bad["slice"], plane="oblique")
    bad["tokens"] = [{"token": "is"}]
    with pytest.raises(ReplyError) as e:
        report.answer_check(bad)
    text = str(e.value)
    assert "answer is missing" in text and "confidence should be number" in text
    assert "slice.plane should be one of 'axial', 'coronal', 'sagittal'" in text
    assert "tokens[0].score is missing" in text and "vqa reply" in text
    with pytest.raises(ReplyError, match="schema_version is 3.0"):
        report.answer_check(sample_answer(schema_version="3.0"))
    with pytest.raises(ReplyError, match="not a JSON object"):
        report.answer_check(["yes"])


def test_answer_check_says_when_the_module_schema_has_no_vqa_reply(monkeypatch):
    doc = copy.deepcopy(lib_schema.load_schema())
    doc["properties"].pop("vqa", None)
    monkeypatch.setattr(lib_schema, "load_schema", lambda: doc)
    with pytest.raises(ReplyError, match="has no vqa reply"):
        report.answer_check(sample_answer())


# ------------------------------------------------------------------------------ the answer's text

def test_answer_text_shows_answer_confidence_top_answers_and_token_attributions():
    r = sample_answer()
    assert report.answer_text(r) == "yes (confidence 0.83)"
    assert report.answer_top(r)[:2] == [("yes", 0.834), ("no", 0.12)]
    toks = report.answer_tokens(r)
    assert [t for t, _, _ in toks][:5] == ["[CLS]", "is", "there", "a", "lesion"]
    # The strongest question words: |score| >= half the largest among words (0.41); markers never.
    assert [t for t, _, strong in toks if strong] == ["lesion", "left"]
    text = report.answer_summary_text(r)
    lines = text.splitlines()
    assert lines[0] == "Answer: yes (confidence 0.83)"
    assert "Question: Is there a lesion on the left?" in lines
    assert "Slice: axial at S = 12.5 mm (LPS), 1 mm thick" in lines
    assert "  yes                      0.834" in lines
    assert "[CLS] +0.9 is +0.02 there +0.01 a -0.03 **lesion** +0.41" in text and "**left** -0.25" in text
    assert "RE-LIG relevance on the slice asked about" in text and lines[-1] == "Model: brain-vqa 0.0.1-test"
    assert report.answer_title(r) == "XAI answer RE-LIG: Is there a lesion on the left?"
    long = report.answer_title(sample_answer(question="x" * 80))
    assert len(long.split(": ", 1)[1]) == 40 and long.endswith("…")


def test_answer_html_escapes_server_text_and_highlights_the_strongest_tokens():
    r = sample_answer(question="<script>lesion?</script>", answer="a<b",
                      tokens=[{"token": "<img>", "score": 1.0}, {"token": "b", "score": -0.2}])
    page = report.answer_summary_html(r)
    assert "<script>" not in page and "&lt;script&gt;lesion?&lt;/script&gt;" in page
    assert "<b>Answer: a&lt;b</b> (confidence 0.83) <small>closed question</small>" in page
    assert "<b>&lt;img&gt;</b>" in page and ">&nbsp;b&nbsp;<" in page  # strongest bold, the weak one not
    assert "background-color:#ff5f5f" in page  # the strongest positive: deepest red
    assert "background-color:#dfdfff" in page  # -0.2 of 1.0: pale blue
    assert report.answer_html({"answer": "a<b"}) == "<p>a&lt;b</p>"


@pytest.mark.parametrize(("method", "words"), [
    ("ig", "the question was not attributed (integrated gradients explains the image only)"),
    ("none", "the question was not attributed (method none)")])
def test_answer_text_without_token_scores(method, words):
    r = sample_answer(method=method, method_title=None, tokens=[])
    text = report.answer_summary_text(r)
    assert f"Question tokens: {words}" in text
    assert report.answer_tokens(r) == []
    if method == "none":
        assert "Heatmap: none (method none: the answer only)" in text
    else:
        assert "Heatmap: integrated gradients relevance" in text
    flat = report.answer_summary_text(sample_answer(saliency={"flat": True}))
    assert "gave a flat map (all zeros)" in flat
    assert html.escape(words) in report.answer_summary_html(r)


# ------------------------------------------------------------------------------ the answer's heatmap

def _slice_heatmap(reference_file: Path, out: Path, axis: int, position_mm: float) -> np.ndarray:
    """A heatmap as the server writes it: the input's grid (ITK, LPS), zero except on voxels whose
    centre lies within half a voxel of the plane ``LPS[axis] = position_mm``."""
    ref = sitk.ReadImage(str(reference_file))
    size = ref.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3)
    lps = np.array([ref.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i))) for i in idx])
    d = np.asarray(ref.GetDirection()).reshape(3, 3)
    half = 0.5 * float(np.sum(np.abs(d[axis]) * np.asarray(ref.GetSpacing())))
    on = np.abs(lps[:, axis] - position_mm) < half
    heat = np.zeros(size, np.float32)  # (i, j, k)
    heat.reshape(-1)[on] = np.linspace(0.1, 1.0, int(on.sum()), dtype=np.float32)
    img = sitk.GetImageFromArray(np.transpose(heat, (2, 1, 0)).copy())
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(out))
    return np.transpose(heat, (2, 1, 0))


def test_answer_heatmap_goes_to_the_red_view_only_and_lies_on_the_slice(xs, tmp_path):
    node = xs.add_volume(synthetic_input((16, 20, 24), seed=3), oblique_ijk_to_ras(), "T1")
    upload = xs.write_volume(node, tmp_path / "T1.nii.gz")
    earlier = xs.add_volume(np.zeros((16, 20, 24), np.float32), xs.ijk_to_ras(node), "explanation heatmap")
    comps = {c.GetLayoutName(): c for c in xs.composite_nodes()}
    for c in comps.values():
        c.SetForegroundVolumeID(earlier.GetID())
    red = find_slice_node(xs.scene, "Red")
    red.SetOrientation("Coronal")
    centre = xs.ijk_to_ras(node) @ np.array([11.5, 9.5, 7.5, 1.0])
    red.SetSliceOffset(float(centre[1]) + 2.0)
    pos = slice_position(red)
    assert pos.plane == "coronal"
    expected = _slice_heatmap(upload, tmp_path / "saliency.nii.gz", 1, pos.slice_mm)
    assert expected.any()

    heat = xs.import_answer_heatmap(tmp_path / "saliency.nii.gz", node, "XAI answer", opacity=0.6,
                                    threshold=0.3).heatmap
    assert xs.same_grid(heat, node) and np.array_equal(xs.array(heat), expected)
    assert comps["Red"].GetForegroundVolumeID() == heat.GetID()
    assert comps["Red"].GetBackgroundVolumeID() == node.GetID()
    assert comps["Red"].GetForegroundOpacity() == pytest.approx(0.6)
    assert comps["Yellow"].GetForegroundVolumeID() == comps["Green"].GetForegroundVolumeID() == earlier.GetID()
    assert heat.GetDisplayNode().GetLowerThreshold() == pytest.approx(0.3)
    # Every nonzero voxel of the node is on the Red view's slice (P within half a voxel of slice_mm).
    k, j, i = np.nonzero(xs.array(heat))
    ras = xs.ijk_to_ras(heat) @ np.stack([i, j, k, np.ones_like(i)]).astype(float)
    p_lps = -ras[1]
    assert np.abs(p_lps - pos.slice_mm).max() < 0.5 * 3.0 + 1e-6  # the oblique grid's voxels are at most 3 mm


def test_an_answer_heatmap_off_the_input_grid_leaves_nothing_behind(xs, tmp_path):
    node = xs.add_volume(synthetic_input((8, 10, 12), seed=1), oblique_ijk_to_ras(), "T1")
    other = sitk.Image([12, 10, 9], sitk.sitkFloat32)
    sitk.WriteImage(other, str(tmp_path / "saliency.nii.gz"))
    before = xs.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(ValueError, match="answer heatmap volume is not on the input image's grid"):
        xs.import_answer_heatmap(tmp_path / "saliency.nii.gz", node, "XAI answer")
    assert xs.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before


# ------------------------------------------------------------------------------ the module's Logic

def _load_module(monkeypatch, xs):
    """XAIExplain.py with the application objects its Logic uses (as tests/test_slicer_client.py does)."""
    import importlib.util
    import types

    base = types.ModuleType("slicer.ScriptedLoadableModule")

    class Plain:
        def __init__(self, *args, **kwargs):
            pass

    base.ScriptedLoadableModule = base.ScriptedLoadableModuleWidget = base.ScriptedLoadableModuleLogic = Plain
    base.ScriptedLoadableModuleTest = Plain
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", base)
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setattr(slicer, "mrmlScene", xs.scene, raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: xs.segmentations_logic),
        volumes=types.SimpleNamespace(logic=lambda: xs.volumes_logic)), raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(applicationLogic=lambda: xs.application_logic,
                                                             applicationVersion="5.12.4"), raising=False)
    spec = importlib.util.spec_from_file_location("XAIExplain_vqa_under_test", MODULE_DIR / "XAIExplain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_logic_reads_the_red_view_and_builds_the_question(xs, monkeypatch):
    mod = _load_module(monkeypatch, xs)
    logic = mod.XAIExplainLogic()
    try:
        red = find_slice_node(xs.scene, "Red")
        red.SetOrientation("Sagittal")
        red.SetSliceOffset(-18.0)
        node, matrix, pos = logic.questionSlice()
        assert node is red and (pos.plane, pos.slice_mm) == ("sagittal", -18.0)
        red.SetSliceOffset(5.0)  # the kept matrix is a copy: what the user saw when asking
        assert slice_position(matrix).slice_mm == -18.0
        params_node = xs.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
        logic.setDefaultParameters(params_node)
        assert logic.vqaMethod(params_node) == "relig" == params_node.GetParameter(mod.VQA_METHOD_PARAMETER)
        params_node.SetParameter(mod.VQA_METHOD_PARAMETER, "ig")
        logic.setDefaultParameters(params_node)  # keeps the user's choice
        assert logic.questionParams(" Lesion? ", pos, logic.vqaMethod(params_node)) == {
            "question": "Lesion?", "plane": "sagittal", "slice_mm": -18.0, "method": "ig"}
        m = np.eye(4)
        m[:3, :3] = _rot("y", 30.0)
        xs.set_slice_to_ras(red, m)
        with pytest.raises(ObliqueSliceError, match="Red view is oblique"):
            logic.questionSlice()
    finally:
        logic.cleanup()


def test_logic_says_when_there_is_no_red_view(monkeypatch):
    xs = headless_scene()
    mod = _load_module(monkeypatch, xs)
    logic = mod.XAIExplainLogic()
    try:
        with pytest.raises(ObliqueSliceError, match="no Red slice view"):
            logic.questionSlice()
    finally:
        logic.cleanup()

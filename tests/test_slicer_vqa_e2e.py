"""XAIExplain's question box against the real server (monai_app's ``vqa`` task), end to end, on slicer-core.

The module's Logic reads the Red view of a headless scene (coronal, off the volume's centre, over an
oblique anisotropic volume), sends the question with that plane and LPS position through the job API
the way the widget does, reads the reply through the schema, and shows the heatmap in the Red view.
The heatmap's nonzero voxels must lie on the slice asked about, and the answer's text must show the
server's answer. A question with ``method: none`` has no heatmap, and a slice outside the volume comes
back as the server's refusal.

The server runs as a subprocess (``xai serve`` through tests/server_utils.py) on a free 127.0.0.1
port, stopped when the module's tests end, with tiny random-weight models (tests/vqa_tiny.py): this
checks geometry and data flow, not answers' quality.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "slicer_extension" / "XAIExplain"
sys.path.insert(0, str(MODULE_DIR))

import slicer  # noqa: E402
from XAIExplainLib import report  # noqa: E402
from XAIExplainLib import schema as lib_schema  # noqa: E402
from XAIExplainLib.client import VQA_TASK, XAIClient  # noqa: E402
from XAIExplainLib.headless import headless_scene  # noqa: E402
from XAIExplainLib.scene import find_slice_node  # noqa: E402
from XAIExplainLib.selftest import oblique_ijk_to_ras, synthetic_input  # noqa: E402

NEEDED = [ROOT / "monai_app" / "main.py", ROOT / "monai_app" / "lib" / "infers" / "vqa.py",
          ROOT / "tests" / "server_utils.py", ROOT / "tests" / "vqa_tiny.py"]
MISSING = [str(p.relative_to(ROOT)) for p in NEEDED if not p.is_file()]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"vqa server task not built yet: {', '.join(MISSING)} missing"),
]

# Generous: on the 2-core test machine under load the server's imports alone take minutes of wall time.
START_TIMEOUT_S = 600
RUN_TIMEOUT_S = 600
QUESTION = "Is there a lesion on the left?"


def _load(name: str, path: Path):
    """A tests/ helper loaded by path, as test_slicer_e2e.py does (the monailabel wheel installs a
    top-level ``tests`` package that would shadow ours)."""
    if name not in sys.modules:  # dataclasses look their module up in sys.modules while it executes
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``(url, log path)`` of ``xai serve`` on a free 127.0.0.1 port with a tiny random-weight
    ``brain-lesion-3d`` (the app's default model) and a tiny ``brain-vqa`` in its weights folder."""
    su = _load("xai_server_utils", ROOT / "tests" / "server_utils.py")
    tiny = _load("xai_vqa_tiny", ROOT / "tests" / "vqa_tiny.py")
    base = tmp_path_factory.mktemp("xai_vqa_server")
    su.make_tiny_model(base / "weights", seed=1)
    tiny.tiny_vqa_model(base / "weights")
    (base / "studies").mkdir()
    (base / "user_weights").mkdir()
    env = {"XAI_DEVICE": "cpu", "XAI_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "XAI_TOKEN": "",
           "XAI_WEIGHTS_DIR": str(base / "weights"), "XAI_USER_WEIGHTS_DIR": str(base / "user_weights")}
    try:
        with su.running_server(base / "studies", base / "datastore", base / "server.log", env,
                               timeout=START_TIMEOUT_S) as s:
            yield s.url, s.log_path, tiny.ANSWERS
    except RuntimeError as e:  # the helper's "server exited / not ready", with the log tail
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def logic_and_scene(server):
    """The module's Logic (XAIExplain.py with the application objects it uses, as in
    tests/test_slicer_client.py) on a headless scene with Red/Yellow/Green views, connected."""
    xs = headless_scene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(xs.scene)
    for view, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        node = xs.scene.CreateNodeByClass("vtkMRMLSliceNode")
        node.SetLayoutName(view)
        node.SetSingletonTag(view)
        xs.scene.AddNode(node)
        node.UnRegister(None)
        node.SetOrientation(orientation)
    mp = pytest.MonkeyPatch()
    base = types.ModuleType("slicer.ScriptedLoadableModule")

    class Plain:
        def __init__(self, *args, **kwargs):
            pass

    base.ScriptedLoadableModule = base.ScriptedLoadableModuleWidget = base.ScriptedLoadableModuleLogic = Plain
    base.ScriptedLoadableModuleTest = Plain
    mp.setitem(sys.modules, "slicer.ScriptedLoadableModule", base)
    mp.setitem(sys.modules, "qt", types.ModuleType("qt"))
    mp.setattr(slicer, "mrmlScene", xs.scene, raising=False)
    mp.setattr(slicer, "modules", types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: xs.segmentations_logic),
        volumes=types.SimpleNamespace(logic=lambda: xs.volumes_logic)), raising=False)
    mp.setattr(slicer, "app", types.SimpleNamespace(applicationLogic=lambda: xs.application_logic,
                                                    applicationVersion="5.12.4"), raising=False)
    spec = importlib.util.spec_from_file_location("XAIExplain_vqa_e2e", MODULE_DIR / "XAIExplain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    logic = module.XAIExplainLogic()
    url = server[0]
    client = logic.makeClient(url, "")
    info, schema_problems = logic.serverInfo(client)
    logic.setConnection(client, info)
    # The server's own schema (GET /xai/schema) has every field of an answer the module reads.
    served = client.result_schema()
    assert served is not None and "vqa" in served["properties"], "the server serves no vqa reply schema"
    for path in lib_schema.READS["vqa"]:
        lib_schema.field_schema(path, "vqa", served)
    try:
        yield module, logic, xs, schema_problems
    finally:
        logic.cleanup()
        mp.undo()


def _lps_of_nonzero(xs, node) -> np.ndarray:
    """LPS mm of every nonzero voxel centre of a volume node, shape (n, 3)."""
    k, j, i = np.nonzero(xs.array(node))
    ras = (xs.ijk_to_ras(node) @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].T
    return ras * np.array([-1.0, -1.0, 1.0])


def _volume(xs):
    # Oblique and anisotropic (0.9 x 1.1 x 2.5 mm, rotated about all three axes), as the module's
    # round-trip tests use: a patient plane cuts it across the voxel grid.
    return xs.add_volume(synthetic_input((16, 20, 24), seed=3), oblique_ijk_to_ras(), "T1 vqa")


def test_question_about_the_red_slice_shows_answer_tokens_and_the_heatmap_on_that_slice(server, logic_and_scene):
    url, log_path, answers = server
    mod, logic, xs, schema_problems = logic_and_scene
    assert logic.hasVqa(), f"the server lists no vqa task: {sorted(logic.info.get('models', {}))}"
    assert schema_problems == []  # the module reads the explanation replies of this server
    task = next(t for t in XAIClient(url).tasks() if t.name == VQA_TASK)
    assert task.type == "vqa" and not task.is_explanation  # the explanation list stays free of it

    volume = _volume(xs)
    red = find_slice_node(xs.scene, "Red")
    red.SetOrientation("Coronal")
    centre_ras = xs.ijk_to_ras(volume) @ np.array([11.5, 9.5, 7.5, 1.0])
    red.SetSliceOffset(float(centre_ras[1]) + 3.0)  # 3 mm anterior of the centre: P = -(A_centre + 3)
    slice_node, matrix, pos = logic.questionSlice()
    assert slice_node is red and pos.plane == "coronal" and pos.axis == "P"
    assert pos.slice_mm == pytest.approx(-(float(centre_ras[1]) + 3.0), abs=1e-6)
    params_node = xs.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    logic.setDefaultParameters(params_node)
    params = logic.questionParams(QUESTION, pos, logic.vqaMethod(params_node))
    assert params == {"question": QUESTION, "plane": "coronal", "slice_mm": round(pos.slice_mm, 4), "method": "relig"}

    t0 = time.monotonic()
    state = logic.startRun(volume, VQA_TASK, params, artifacts=("saliency",)).join(RUN_TIMEOUT_S)
    seconds = time.monotonic() - t0
    assert state.status == "done", f"{state.error}\n" + log_path.read_text(errors="replace")[-3000:]
    assert not state.blocking_fallback and state.job_id and set(state.files) == {"saliency"}

    # The reply, read through the schema: the server answered about the slice that was asked.
    result = report.answer_check(state.result)
    assert result["question"] == QUESTION and result["answer"] in answers and result["method"] == "relig"
    assert result["slice"]["plane"] == "coronal" and result["slice"]["axis"] == "P"
    assert result["slice"]["position_mm"] == pytest.approx(params["slice_mm"], abs=1e-3)
    assert [t["answer"] for t in result["top"]][0] == result["answer"] and len(result["top"]) == 5
    assert result["tokens"], "relig gave no token scores"

    # The answer's text shows the server's answer, its confidence and every token with its score.
    text = report.answer_summary_text(result)
    assert text.splitlines()[0] == f"Answer: {result['answer']} (confidence {result['confidence']:.2f})"
    assert "Slice: coronal at P = " in text and f"{result['slice']['position_mm']:.1f} mm" in text
    toks = report.answer_tokens(result)
    assert [t for t, _, _ in toks] == [t["token"] for t in result["tokens"]]
    assert any(strong for _, _, strong in toks)
    page = report.answer_summary_html(result)
    assert f"<b>Answer: {result['answer']}</b>" in page and "Question tokens" in page

    # The heatmap: on the input's grid, in the Red view, nonzero only on the slice asked about.
    scroll = red.GetSliceOffset()
    red.SetSliceOffset(scroll + 10.0)  # the user scrolled while the server worked
    heat = logic.showAnswerHeatmap(state, volume, 0.5, 0.2, report.answer_title(result)).heatmap
    logic.xscene.set_slice_to_ras(red, matrix)  # what the widget does once the heatmap is shown
    assert red.GetSliceOffset() == pytest.approx(scroll)
    assert xs.same_grid(heat, volume)
    comps = {c.GetLayoutName(): c for c in xs.composite_nodes()}
    assert comps["Red"].GetForegroundVolumeID() == heat.GetID()
    assert comps["Red"].GetBackgroundVolumeID() == volume.GetID()
    assert comps["Yellow"].GetForegroundVolumeID() != heat.GetID()
    values = xs.array(heat)
    assert 0.0 <= values.min() and values.max() <= 1.0
    assert not result["saliency"]["flat"], "the tiny model's map is flat: nothing to place on the slice"
    lps = _lps_of_nonzero(xs, heat)
    assert len(lps) == result["saliency"]["nonzero_voxels"] > 0
    half = result["slice"]["thickness_mm"] / 2.0
    off = np.abs(lps[:, 1] - pos.slice_mm)
    assert off.max() <= half + 1e-3, f"heatmap voxels up to {off.max():.2f} mm off the slice (slab {2 * half} mm)"
    print(f"\nvqa relig on the tiny model: {seconds:.1f} s round trip, answer {result['answer']!r} "
          f"({result['confidence']:.3f}), {len(lps)} heatmap voxels, server timings {result.get('timings_s')}")


def test_answer_only_and_a_slice_outside_the_volume(server, logic_and_scene):
    url, log_path, answers = server
    mod, logic, xs, _ = logic_and_scene
    volume = _volume(xs)
    red = find_slice_node(xs.scene, "Red")
    red.SetOrientation("Sagittal")
    centre_ras = xs.ijk_to_ras(volume) @ np.array([11.5, 9.5, 7.5, 1.0])
    red.SetSliceOffset(-float(centre_ras[0]))  # sagittal offset is L: the volume's centre
    _, _, pos = logic.questionSlice()
    assert pos.plane == "sagittal" and pos.slice_mm == pytest.approx(-float(centre_ras[0]), abs=1e-6)

    state = logic.startRun(volume, VQA_TASK, logic.questionParams("normal or abnormal?", pos, "none"),
                           artifacts=("saliency",)).join(RUN_TIMEOUT_S)
    assert state.status == "done", f"{state.error}\n" + log_path.read_text(errors="replace")[-3000:]
    result = report.answer_check(state.result)
    assert result["method"] == "none" and result["saliency"] is None and result["answer"] in answers
    assert logic.showAnswerHeatmap(state, volume, 0.5, 0.2, "none") is None  # nothing to show
    text = report.answer_summary_text(result)
    assert text.startswith(f"Answer: {result['answer']} (confidence ") and "Heatmap: none" in text
    assert result["slice"]["plane"] == "sagittal" and result["slice"]["position_mm"] == pytest.approx(
        round(pos.slice_mm, 4), abs=1e-3)

    red.SetSliceOffset(-float(centre_ras[0]) + 500.0)  # half a metre to the patient's left
    _, _, far = logic.questionSlice()
    refused = logic.startRun(volume, VQA_TASK, logic.questionParams("lesion?", far, "none")).join(RUN_TIMEOUT_S)
    # The server is the judge of the volume's extent; its words reach the user (the status line).
    assert refused.status == "failed" and "outside the volume" in refused.error, refused.error
    assert f"{far.slice_mm:g}" in refused.error and refused.result is None
    print(f"\nslice outside the volume: {refused.error}")

"""The server's ``vqa`` task, end to end: the real server (``xai serve``) on a free loopback port with a
tiny random-weight classifier and, once the test writes it, a tiny brain-vqa model (``tests/vqa_tiny.py``).

The task is offered only while a vqa model's weights exist (they land while the server runs here), it
answers with the VQAAnswer JSON and the heatmap on the input's grid, lying on the requested slice,
refuses bad parameters with a 422 naming the problem, and runs off the event loop (``/info/`` answers
while it works).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from requests_toolbelt.multipart.decoder import MultipartDecoder

from xai_core.io import Image, read_image, write_image
from xai_core.schema import VQAAnswer


def _load_helper(name: str):
    # By file path: the monailabel wheel installs a top-level ``tests`` package that could shadow ours.
    spec = importlib.util.spec_from_file_location(f"xai_server_vqa_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


su = _load_helper("server_utils")
vt = _load_helper("vqa_tiny")

pytestmark = [pytest.mark.slow]

QUESTION = "Is there a lesion?"
FAST = {"n_samples": 2, "n_steps": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa_server")
    env = su.tiny_server_env(root)  # the classifier only: no vqa weights yet
    src = root / "src"
    src.mkdir()
    write_image(vt.oblique_volume(seed=4), src / "case.nii.gz")
    # A generous start-up bound: on a loaded 2-core machine importing MONAI Label alone can take minutes.
    with su.running_server(src, root / "datastore", root / "server.log", env, timeout=900) as srv:
        srv.shipped = Path(env["XAI_WEIGHTS_DIR"])
        yield srv


@pytest.fixture(scope="module")
def vqa_weights(server) -> Path:
    """The tiny vqa model, written into the running server's shipped weights folder."""
    if not (server.shipped / "brain-vqa.json").is_file():
        vt.tiny_vqa_model(server.shipped)
    return server.shipped


def case_image(server) -> Image:
    return read_image(server.datastore / "case.nii.gz")


def parts_of(response) -> dict:
    return {p.headers[b"Content-Disposition"].decode().split('name="')[1].split('"')[0]: p
            for p in MultipartDecoder.from_response(response).parts}


def test_vqa_is_offered_only_once_a_vqa_model_is_there(server):
    info = server.get("/info/").json()
    assert "vqa" not in info["models"] and "brain-vqa" not in info["xai"]["models"]
    r = server.post("/infer/vqa", params={"image": "case", "output": "json"}, json={"question": QUESTION})
    assert r.status_code == 503 and "brain-vqa" in r.json()["detail"]
    vt.tiny_vqa_model(server.shipped)  # the weights land while the server runs
    info = server.get("/info/").json()
    assert info["models"]["vqa"]["type"] == "vqa"
    assert info["models"]["vqa"]["config"]["method"] == "relig"
    served = info["xai"]["models"]["brain-vqa"]
    assert served["kind"] == "vqa" and served["version"] == "0.0.1-test" and served["tasks"] == ["vqa"]
    assert served["default"] is False and info["xai"]["model"]["name"] == "brain-lesion-3d"


def test_vqa_answers_with_the_heatmap_on_the_requested_slice(server, vqa_weights, tmp_path):
    r = server.post("/infer/vqa", params={"image": "case", "output": "all"},
                    json={"question": QUESTION, "plane": "coronal", "slice_mm": 3.0, "method": "relig",
                          "method_params": FAST})
    assert r.status_code == 200, r.text
    parts = parts_of(r)
    assert set(parts) == {"params", "image"}
    result = json.loads(parts["params"].content)
    VQAAnswer.model_validate(result)
    assert result["task"] == "vqa" and result["image_id"] == "case" and len(result["result_id"]) == 32
    assert result["question"] == QUESTION and result["method"] == "relig" and result["model"]["name"] == "brain-vqa"
    assert result["slice"]["plane"] == "coronal" and result["slice"]["position_mm"] == 3.0
    assert len(result["top"]) == 5 and result["top"][0]["answer"] == result["answer"]
    probs = [t["probability"] for t in result["top"]]
    assert probs == sorted(probs, reverse=True) and result["confidence"] == probs[0]
    assert [t["token"] for t in result["tokens"]][0] == "[CLS]" and result["tokens"][-1]["token"] == "[SEP]"
    assert {"saliency", "tokens", "overlay", "answer", "result"} <= set(result["artifacts"])

    ref = case_image(server)
    path = tmp_path / "heat.nii.gz"
    path.write_bytes(parts["image"].content)
    heat = Image.from_sitk(sitk.ReadImage(str(path)))  # mostly zeros: not read_image
    assert heat.size == ref.size and heat.array.dtype == np.float32
    for got, want in ((heat.spacing, ref.spacing), (heat.origin, ref.origin), (heat.direction, ref.direction)):
        np.testing.assert_allclose(got, want, atol=1e-4)
    # Non-zero only on the coronal slab at P = 3 mm (one voxel of the volume along P).
    thickness = float(np.abs(ref.direction_matrix[1]) @ np.asarray(ref.spacing, float))
    kji = np.argwhere(heat.array > 0)
    assert len(kji) > 100
    p = heat.index_to_physical(kji[:, ::-1].astype(float))[:, 1]
    assert p.min() >= 3.0 - thickness / 2 - 1e-3 and p.max() < 3.0 + thickness / 2 + 1e-3

    # The overlay is not drawn with the answer, only on its first download (then kept).
    folder = server.datastore / ".xai" / "results" / result["result_id"]
    assert "overlay" not in result["timings_s"] and not (folder / "overlay.png").exists()
    assert (folder / "answer.json").is_file()  # the right folder
    overlay = server.get(result["artifacts"]["overlay"])
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    assert overlay.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "overlay.png").read_bytes() == overlay.content
    assert server.get(result["artifacts"]["overlay"]).content == overlay.content
    tokens = server.get(result["artifacts"]["tokens"]).json()
    assert tokens["tokens"] == result["tokens"]
    saved = server.get(result["artifacts"]["result"]).json()
    assert saved["answer"] == result["answer"] and saved["result_id"] == result["result_id"]


def test_bad_parameters_are_422_naming_the_problem_and_the_server_keeps_serving(server, vqa_weights):
    bad = [
        ({"question": QUESTION, "plane": "oblique"}, "plane must be one of axial, coronal, sagittal"),
        ({"question": "  ", "plane": "axial"}, "question is empty"),
        ({"plane": "axial"}, "question is empty"),
        ({"question": QUESTION, "method": "gradcam"}, "method must be one of relig, ig, none"),
        ({"question": QUESTION, "slice_mm": "abc"}, "slice_mm must be a number"),
        ({"question": QUESTION, "method_params": {"n_samples": 500}}, "n_samples must be a number in [1, 64]"),
        ({"question": QUESTION, "plane": "axial", "slice_mm": 1e4}, "outside the volume"),
    ]
    for body, words in bad:
        r = server.post("/infer/vqa", params={"image": "case", "output": "json"}, json=body)
        assert r.status_code == 422 and words in r.json()["detail"], (body, r.text)
    # The job route refuses at once too, not as a failed job.
    r = server.post("/xai/explain/vqa", params={"image": "case"}, json={"question": QUESTION, "plane": "up"})
    assert r.status_code == 422 and "plane" in r.json()["detail"]
    assert server.get("/info/").status_code == 200
    # Form-field parameters (what MONAI Label clients send) and a JSON-only answer without a heatmap.
    r = server.post("/infer/vqa", params={"image": "case", "output": "json"},
                    data={"params": json.dumps({"question": "which plane is this", "plane": "sagittal",
                                                "method": "none"})})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json()["saliency"] is None and r.json()["slice"]["axis"] == "L" and "saliency" not in r.json()["artifacts"]
    overlay = server.get(r.json()["artifacts"]["overlay"])  # the answer without a heatmap still has its picture
    assert overlay.status_code == 200 and overlay.content[:4] == b"\x89PNG"
    r = server.post("/infer/vqa", params={"image": "case", "output": "image"},
                    json={"question": QUESTION, "method": "none"})
    assert r.status_code == 200 and r.json()["answer"] and r.json()["method"] == "none"  # no file: the JSON


def test_a_drawn_artifact_is_listed_drawn_once_on_download_and_absent_without_its_source(tmp_path):
    import threading

    from monai_app.lib.results import Drawn, ResultStore

    drawn = []

    def draw(folder: Path) -> Path:
        drawn.append(folder.name)
        time.sleep(0.2)  # long enough for the second download to arrive while this one draws
        (folder / "overlay.png").write_bytes(b"\x89PNG picture")
        return folder / "overlay.png"

    store = ResultStore(tmp_path, drawn={"overlay.png": Drawn("overlay_source.npz", draw)})
    rid, folder = store.create()
    (folder / "overlay_source.npz").write_bytes(b"source")
    other, _ = store.create()  # a result without the source (an explanation): no overlay
    assert store.urls(rid)["overlay"] == f"/xai/results/{rid}/overlay.png" and "overlay" not in store.urls(other)
    assert "overlay_source" not in store.urls(rid)  # the source is no downloadable artifact
    assert store.path(rid, "overlay.png") is None and drawn == []  # nothing drawn until downloaded

    got = []
    threads = [threading.Thread(target=lambda: got.append(store.draw(rid, "overlay.png"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [folder / "overlay.png"] * 2 and drawn == [rid]  # two downloads, one draw
    assert store.path(rid, "overlay.png") == folder / "overlay.png"
    assert store.draw(other, "overlay.png") is None and store.draw(rid, "tokens.json") is None
    assert store.draw("../" + rid, "overlay.png") is None and drawn == [rid]


def test_a_vqa_job_runs_off_the_event_loop(server, vqa_weights):
    # Long on purpose (64 x 128 = 8,192 forward+backward passes of the tiny model, ~10 s on 2 idle cores):
    # /info/ must answer meanwhile, in a fraction of the job's time.
    job = server.post("/xai/explain/vqa", params={"image": "case"},
                      json={"question": QUESTION, "plane": "axial", "method_params": {"n_samples": 64,
                                                                                      "n_steps": 128}})
    assert job.status_code == 202, job.text
    url = job.json()["url"]
    deadline = time.monotonic() + 120
    while server.get(url).json()["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.05)
    before = server.get(url).json()
    t = time.monotonic()
    info = server.get("/info/")
    info_s = time.monotonic() - t
    assert before["status"] == "running", before
    assert info.status_code == 200 and "vqa" in info.json()["models"]
    deadline = time.monotonic() + 600
    state = server.get(url).json()
    while state["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
        state = server.get(url).json()
    assert state["status"] == "done", state
    VQAAnswer.model_validate(state["result"])
    assert state["result"]["params"]["n_samples"] == 64 and state["result"]["slice"]["plane"] == "axial"
    assert state["result"]["task"] == "vqa" and state["result"]["image_id"] == "case"
    job_s = state["finished_at"] - state["started_at"]
    # Had /info/ waited for the model worker, it would have taken the rest of the job's time.
    assert info_s < 0.25 * job_s, (info_s, job_s)


def test_a_damaged_overlay_source_is_a_404_naming_it_and_the_server_keeps_serving(server, vqa_weights):
    r = server.post("/infer/vqa", params={"image": "case", "output": "json"},
                    json={"question": QUESTION, "method": "none"})
    assert r.status_code == 200
    result = r.json()
    folder = server.datastore / ".xai" / "results" / result["result_id"]
    (folder / "overlay_source.npz").write_bytes(b"PK\x03\x04 truncated")
    got = server.get(result["artifacts"]["overlay"])
    assert got.status_code == 404 and "overlay_source.npz is damaged" in got.json()["detail"], got.text
    assert not (folder / "overlay.png").exists()
    assert server.get(result["artifacts"]["answer"]).status_code == 200  # the rest of the result is intact
    assert server.get("/info/").status_code == 200

"""The MONAI Label explanation server, end to end: the real server (``xai serve`` -> ``monailabel
start_server`` with ``monai_app``) runs as a subprocess on a free loopback port, once for the module.

It serves a tiny random-weight model written into a temporary "shipped" weights folder (the tests
do not depend on the real weights) and four small synthetic studies in every source format the
launcher converts (NIfTI, NRRD, DICOM series). A bearer token is configured, so every request here
also exercises the auth guard; ``test_token_is_required`` checks the refusals.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from requests_toolbelt.multipart.decoder import MultipartDecoder

from xai_core.explain import available_methods
from xai_core.io import Image, read_image, write_image
from xai_core.models import sha256

_spec = importlib.util.spec_from_file_location("xai_server_utils", Path(__file__).with_name("server_utils.py"))
su = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = su  # dataclasses resolve their module by name
_spec.loader.exec_module(su)

pytestmark = [pytest.mark.slow,
              # MONAILabelClient parses replies with the cgi module (deprecated; gone in Python 3.13).
              pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")]

TOKEN = "test-token-0123456789"
UPLOAD_LIMIT_MB = 2
# docs/http_api.md: a method's task name is its xai_core name with '+' spelled 'p' (gradcam++ -> gradcampp).
METHODS = {m.replace("+", "p"): m for m in available_methods()}
TASKS = [*METHODS, "saliency_mask", "classify", "segment"]
FILE_DTYPE = {**{w: np.float32 for w in METHODS}, "saliency_mask": np.uint8, "segment": np.uint8, "classify": None}


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Any]:
    """Source studies (id -> image as read back) in ``<tmp>/src`` (key ``_src``); small, in every format the
    launcher converts."""
    src = tmp_path_factory.mktemp("src")
    specs = {
        "axial": ((36, 44, 40), (2.0, 2.2, 2.5), (-40.0, -48.0, -45.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), "axial.nii.gz"),
        "oblique": ((30, 40, 36), (2.5, 2.0, 3.0), (-35.0, -40.0, -42.0), su.rotation((1, 2, 3), 25), "oblique.nrrd"),
        "dicom_series": ((24, 36, 32), (2.4, 2.4, 3.2), (-38.0, -44.0, -40.0), su.rotation((0, 1, 1), -15),
                         "dicom_series"),
        "big": ((112, 128, 112), (1.5, 1.5, 1.5), (-84.0, -96.0, -84.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), "big.nii.gz"),
    }
    out = {}
    for n, (sid, (shape, spacing, origin, direction, name)) in enumerate(specs.items()):
        image, _ = su.synthetic_study(shape, spacing, origin, direction, seed=n)
        write_image(image, src / name)
        out[sid] = read_image(src / name)
    out["_src"] = src
    return out


@pytest.fixture(scope="module")
def server(studies, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    shipped, user = root / "shipped_weights", root / "user_weights"
    su.make_tiny_model(shipped)
    user.mkdir()
    env = {"XAI_DEVICE": "cpu", "XAI_WEIGHTS_DIR": str(shipped),
           "XAI_USER_WEIGHTS_DIR": str(user), "XAI_TOKEN": TOKEN}
    with su.running_server(studies["_src"], root / "datastore", root / "server.log", env, token=TOKEN,
                           conf={"max_upload_mb": str(UPLOAD_LIMIT_MB)}) as srv:
        srv.shipped, srv.user_weights = shipped, user
        yield srv


# ---------------------------------------------------------------------------------------------- helpers

def as_image(data: bytes, tmp: Path, name: str = "out.nii.gz") -> Image:
    """A returned volume (may be constant, so not read_image, which refuses constant images)."""
    path = tmp / name
    path.write_bytes(data)
    return Image.from_sitk(sitk.ReadImage(str(path)))


def assert_geometry(got: Image, ref: Image, tol: float = 1e-4) -> None:
    assert got.size == ref.size
    np.testing.assert_allclose(got.spacing, ref.spacing, atol=tol)
    np.testing.assert_allclose(got.origin, ref.origin, atol=tol)
    np.testing.assert_allclose(got.direction, ref.direction, atol=tol)


def check_result(task: str, result: dict, image_id: str) -> None:
    assert result["task"] == task and result["image_id"] == image_id
    assert len(result["result_id"]) == 32 and result["artifacts"]["result"].endswith("/result.json")
    probs = result["prediction"]["probabilities"]
    assert set(probs) == {"none", "glioma", "meningioma", "metastasis"}
    assert abs(sum(probs.values()) - 1) < 1e-3
    if task in METHODS:
        assert result["method"] == METHODS[task]
    if task == "saliency_mask":
        assert result["method"] == "gradcam++"  # the task's default method
    if task in METHODS or task == "saliency_mask":
        assert {"saliency", "levels", "mask"} <= set(result["artifacts"])
        assert {"voxels", "fraction_of_brain", "levels_percent"} <= set(result["mask"])
        assert result["timings_s"]["attribute"] >= 0


def check_file(task: str, img: Image, ref: Image) -> None:
    assert_geometry(img, ref)
    assert img.array.dtype == FILE_DTYPE[task]
    if FILE_DTYPE[task] == np.float32:
        assert 0.0 <= float(img.array.min()) and float(img.array.max()) <= 1.0 + 1e-6
    else:
        assert set(np.unique(img.array)) <= {0, 1}


def datastore_image(server, image_id: str) -> Image:
    return read_image(server.datastore / f"{image_id}.nii.gz")


def label_bytes(image: Image, seed: int, tmp: Path) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random(image.array.shape) > 0.97).astype(np.uint8)
    path = write_image(image.with_array(arr), tmp / f"label_{seed}.nii.gz")
    return path.read_bytes()


def wait_job(server, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = server.get(f"/xai/jobs/{job_id}").json()
        if state["status"] in ("done", "failed", "cancelled") or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------- tests

def test_serve_refuses_to_bind_every_interface(tmp_path, capsys):
    from xai_core.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--studies", str(tmp_path)]) == 2
    assert "refusing to bind" in capsys.readouterr().err


def test_info_lists_every_task_and_the_converted_studies(server):
    info = server.get("/info/").json()
    models = info["models"]
    assert set(models) == set(TASKS)
    for wire in METHODS:
        assert models[wire]["type"] == "explanation"
    assert models["saliency_mask"]["type"] == "segmentation" and models["segment"]["type"] == "segmentation"
    assert models["classify"]["type"] == "classification"
    assert "seg_head_finetune" in info["trainers"]
    assert info["xai"]["auth"] is True and info["xai"]["model"]["version"] == "0.0.1-test"
    listed = server.get("/datastore/", params={"output": "all"}).json()["objects"]
    assert set(listed) == {"axial", "oblique", "dicom_series", "big"}  # NRRD and DICOM converted to NIfTI


@pytest.mark.parametrize("task", TASKS)
def test_every_task_through_monailabel_client(server, studies, task, tmp_path):
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    client.update_auth({"token_type": "Bearer", "access_token": TOKEN})
    out_file, result = client.infer(task, "oblique", {"target": "predicted"})
    if task == "classify":
        # JSON-only reply: MONAILabelClient hands back the raw body.
        assert out_file is None
        result = json.loads(result)
    else:
        img = Image.from_sitk(sitk.ReadImage(out_file))
        check_file(task, img, studies["oblique"])  # the NRRD source's geometry, through the NIfTI datastore copy
    check_result(task, result, "oblique")
    if task in METHODS or task == "saliency_mask":
        for name in ("levels", "mask"):
            r = server.get(result["artifacts"][name])
            assert r.status_code == 200
            art = as_image(r.content, tmp_path, f"{name}.nii.gz")
            assert_geometry(art, studies["oblique"])
            assert art.array.dtype == np.uint8


@pytest.mark.parametrize("task", TASKS)
def test_every_task_over_plain_http(server, studies, task, tmp_path):
    # JSON body for the parameters (the Slicer module's style), multipart reply with the one file.
    r = server.post(f"/infer/{task}", params={"image": "dicom_series", "output": "all"},
                    json={"target": "predicted"})
    assert r.status_code == 200, r.text
    if task == "classify":
        assert r.headers["content-type"].startswith("application/json")
        check_result(task, r.json(), "dicom_series")
        return
    parts = {p.headers[b"Content-Disposition"].decode().split('name="')[1].split('"')[0]: p
             for p in MultipartDecoder.from_response(r).parts}
    assert set(parts) == {"params", "image"}
    result = json.loads(parts["params"].content)
    check_result(task, result, "dicom_series")
    check_file(task, as_image(parts["image"].content, tmp_path), studies["dicom_series"])
    saved = server.get(result["artifacts"]["result"]).json()
    assert saved["result_id"] == result["result_id"] and saved["prediction"] == result["prediction"]


def test_output_json_and_image_and_target_choice(server, studies, tmp_path):
    # Form field 'params' (what MONAI Label clients send) instead of a JSON body.
    r = server.post("/infer/gradcampp", params={"image": "axial", "output": "json"},
                    data={"params": '{"target": "all"}'})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    result = r.json()
    assert len(result["targets"]) == 4 and result["targets"][0] == result["prediction"]["label"]
    assert {f"saliency_{c}" for c in result["targets"]} <= set(result["artifacts"])
    r = server.post("/infer/gradcam", params={"image": "axial", "output": "image"}, json={"target": "glioma"})
    assert r.status_code == 200
    check_file("gradcam", as_image(r.content, tmp_path), studies["axial"])


def test_explanation_job_runs_and_cancels(server):
    r = server.post("/xai/explain/gradcam", params={"image": "axial"}, json={"target": "predicted"})
    assert r.status_code == 202 and r.json()["status"] in ("queued", "running")
    first = r.json()["job_id"]
    second = server.post("/xai/explain/scorecam", params={"image": "big"}, json={}).json()["job_id"]
    third = server.post("/xai/explain/scorecam", params={"image": "big"}, json={}).json()["job_id"]
    cancelled = server.delete(f"/xai/jobs/{third}")
    assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"] is True
    state = wait_job(server, first)
    assert state["status"] == "done" and state["progress"] == 1.0
    check_result("gradcam", state["result"], "axial")
    assert server.get(state["result"]["artifacts"]["saliency"]).status_code == 200
    assert wait_job(server, second)["status"] == "done"
    assert wait_job(server, third)["status"] == "cancelled"
    gone = server.delete(f"/xai/jobs/{first}")
    assert gone.status_code == 409 and "already finished" in gone.json()["detail"]
    assert server.get("/xai/jobs/0123").status_code == 404


def test_label_is_saved_with_provenance_read_back_identically_and_versioned(server, tmp_path):
    result = server.post("/infer/gradcampp", params={"image": "axial", "output": "json"}, json={}).json()
    ref = datastore_image(server, "axial")
    first, second = label_bytes(ref, 1, tmp_path), label_bytes(ref, 2, tmp_path)
    # The client names the result it corrected; what it claims about method, model or user is dropped.
    prov = {"result_id": result["result_id"], "method": "scorecam", "model_version": "9.9", "user": "tester",
            "source": "manual", "note": "rim included"}
    r = server.put("/datastore/label", params={"image": "axial", "tag": "corrected"},
                   files={"label": ("corrected.nii.gz", first)}, data={"params": json.dumps(prov)})
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    got = server.get("/datastore/label", params={"label": "axial", "tag": "corrected"})
    assert got.status_code == 200 and got.content == first
    info = server.get("/datastore/label/info", params={"label": "axial", "tag": "corrected"}).json()
    assert info["method"] == "gradcam++" and info["model_version"] == result["model"]["version"]
    assert info["source"] == "corrected_saliency" and info["user"] is None and info["note"] == "rim included"
    assert info["task"] == "gradcampp" and info["result_known"] is True and info["sha256"] and info["saved_at"]

    r = server.put("/datastore/label", params={"image": "axial", "tag": "corrected"},
                   files={"label": ("corrected.nii.gz", second)}, data={"params": json.dumps({**prov, "user": "b"})})
    assert r.status_code == 200 and r.json()["version"] == 2
    assert server.get("/datastore/label", params={"label": "axial", "tag": "corrected"}).content == second
    versions = server.get("/xai/labels/axial/corrected/versions").json()
    assert versions["current"]["version"] == 2 and [v["version"] for v in versions["versions"]] == [1]
    assert versions["versions"][0]["info"]["result_id"] == result["result_id"]
    assert server.get(versions["versions"][0]["url"]).content == first

    # Removing the label archives it too: every saved version stays recoverable.
    assert server.delete("/datastore/label", params={"id": "axial", "tag": "corrected"}).status_code == 200
    assert server.get("/datastore/label", params={"label": "axial", "tag": "corrected"}).status_code == 404
    versions = server.get("/xai/labels/axial/corrected/versions").json()
    assert versions["current"] is None and [v["version"] for v in versions["versions"]] == [1, 2]
    assert server.get(versions["versions"][1]["url"]).content == second


def info_latencies(server, n: int = 20, pause_s: float = 0.05) -> list[float]:
    """Seconds each of ``n`` ``GET /info/`` calls took, on one keep-alive session."""
    session = requests.Session()
    latencies = []
    for _ in range(n):
        t = time.perf_counter()
        r = session.get(server.url + "/info/", headers=server.headers, timeout=30)
        latencies.append(time.perf_counter() - t)
        assert r.status_code == 200
        time.sleep(pause_s)
    return latencies


def test_info_stays_fast_while_explanations_run(server, record_property):
    idle_p95 = float(np.percentile(info_latencies(server), 95))
    # More jobs than the measurement needs (on a fast machine too); the rest are cancelled afterwards.
    jobs = [server.post("/xai/explain/scorecam", params={"image": "big"}, json={}).json()["job_id"]
            for _ in range(8)]
    deadline = time.monotonic() + 60
    while server.get(f"/xai/jobs/{jobs[0]}").json()["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.02)
    t_first = time.time()
    latencies = info_latencies(server)
    t_last = time.time()
    for j in jobs:
        server.delete(f"/xai/jobs/{j}")  # 409 for those already done
    states = [wait_job(server, j) for j in jobs]
    assert all(s["status"] in ("done", "cancelled") for s in states)  # a running job stops at a stage boundary
    ran = [s for s in states if s["started_at"] is not None]
    # The calls overlapped the explanations (jobs run back to back on the one model worker).
    assert min(s["started_at"] for s in ran) <= t_first and max(s["finished_at"] for s in ran) >= t_last
    p95 = float(np.percentile(latencies, 95))
    record_property("info_p95_ms", round(p95 * 1000, 1))
    record_property("info_idle_p95_ms", round(idle_p95 * 1000, 1))
    print(f"\n/info/ idle p95 {idle_p95 * 1000:.1f} ms; during explanations p95 {p95 * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms, {sum(s['status'] == 'done' for s in states)} jobs done")
    # /info/ reads only cards and pointers (~7 ms on 2 cores); the worker thread may slow it, not block it.
    assert p95 < 0.1


def test_concurrent_clients_make_no_errors_and_lose_no_labels(server, tmp_path):
    refs = {i: datastore_image(server, "axial" if i % 2 else "oblique") for i in range(2)}
    errors: list[str] = []
    saved: dict[int, list[bytes]] = {}

    def client(i: int) -> None:
        s = requests.Session()
        s.headers.update(server.headers)
        image_id = "axial" if i % 2 else "oblique"
        mine: list[bytes] = []
        try:
            for j in range(10):
                step = j % 5
                if step == 0:
                    r = s.get(server.url + "/info/", timeout=60)
                elif step == 1:
                    body = label_bytes(refs[i % 2], 100 * i + j, tmp_path / f"c{i}")
                    r = s.put(server.url + "/datastore/label", params={"image": image_id, "tag": f"c{i}"},
                              files={"label": ("l.nii.gz", body)},
                              data={"params": json.dumps({"source": "corrected_saliency", "user": f"c{i}"})},
                              timeout=60)
                    if r.status_code == 200:
                        mine.append(body)
                elif step == 2:
                    r = s.get(server.url + "/datastore/", params={"output": "all"}, timeout=60)
                elif step == 3:
                    r = s.get(server.url + "/datastore/label", params={"label": image_id, "tag": f"c{i}"}, timeout=60)
                    if r.status_code == 200 and r.content != mine[-1]:
                        errors.append(f"client {i}: read back a label it did not save last")
                else:
                    r = s.post(server.url + "/infer/classify", params={"image": image_id, "output": "json"},
                               json={}, timeout=120)
                if r.status_code != 200:
                    errors.append(f"client {i} step {j}: {r.status_code} {r.text[:200]}")
        except requests.RequestException as e:
            errors.append(f"client {i}: {e}")
        saved[i] = mine

    for i in range(8):
        (tmp_path / f"c{i}").mkdir()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    for i in range(8):
        image_id = "axial" if i % 2 else "oblique"
        versions = server.get(f"/xai/labels/{image_id}/c{i}/versions").json()
        assert versions["current"]["version"] == len(saved[i]) == 2
        assert server.get("/datastore/label", params={"label": image_id, "tag": f"c{i}"}).content == saved[i][-1]
        assert server.get(versions["versions"][0]["url"]).content == saved[i][0]


def _bad_requests(server, studies, tmp_path):
    """(name, response, expected status, words the detail must contain)."""
    flat = write_image(Image(np.random.default_rng(0).random((32, 32)).astype(np.float32), (1.0, 1.0), (0.0, 0.0),
                             (1.0, 0.0, 0.0, 1.0)), tmp_path / "flat.nii.gz").read_bytes()
    good = (studies["_src"] / "axial.nii.gz").read_bytes()
    truncated = write_image(studies["axial"], tmp_path / "full.nii", compress=False).read_bytes()[:20000]
    big = b"\0" * (UPLOAD_LIMIT_MB * 2**20 + 1024)
    wrong_size = label_bytes(studies["oblique"], 7, tmp_path)

    def chunks():
        for _ in range(UPLOAD_LIMIT_MB + 2):
            yield b"\0" * 2**20

    yield ("unknown image id", server.post("/infer/gradcam", params={"image": "no_such_study"}), 404,
           "unknown image id")
    yield ("unknown image id, job", server.post("/xai/explain/gradcam", params={"image": "no_such_study"}), 404,
           "unknown image id")
    yield ("unknown image id, label", server.put("/datastore/label", params={"image": "no_such_study"},
                                                 files={"label": ("l.nii.gz", good)}), 404, "unknown image id")
    yield ("unknown task", server.post("/infer/no_such_method", params={"image": "axial"}), 404, "unknown task")
    yield ("corrupt upload", server.put("/datastore/image", params={"image": "corrupt"},
                                        files={"file": ("x.nii.gz", b"not an image at all" * 50)}), 422,
           "uploaded file")
    yield ("truncated upload", server.put("/datastore/image", params={"image": "cut"},
                                          files={"file": ("cut.nii", truncated)}), 422, "truncated")
    yield ("2-D upload", server.put("/datastore/image", params={"image": "flat"},
                                    files={"file": ("flat.nii.gz", flat)}), 422, "2-D")
    yield ("2-D upload to infer", server.post("/infer/gradcam", files={"file": ("flat.nii.gz", flat)}), 422, "2-D")
    yield ("path-like id", server.post("/infer/gradcam", params={"image": "../../etc/passwd"}), 400, "file path")
    yield ("path-like id, download", server.get("/datastore/image", params={"image": "/etc/passwd"}), 400,
           "file path")
    yield ("path-like tag", server.put("/datastore/label", params={"image": "axial", "tag": "../../x"},
                                       files={"label": ("l.nii.gz", good)}), 400, "file path")
    yield ("oversized upload", server.put("/datastore/image", params={"image": "huge"},
                                          files={"file": ("huge.nii.gz", big)}), 413, "upload limit")
    yield ("oversized chunked upload", server.put("/datastore/image", params={"image": "huge2"}, data=chunks(),
                                                  headers={"Content-Type": "application/octet-stream"}), 413,
           "upload limit")
    yield ("existing id", server.put("/datastore/image", params={"image": "axial"},
                                     files={"file": ("axial.nii.gz", good)}), 409, "already exists")
    yield ("bad target", server.post("/infer/gradcam", params={"image": "axial"}, json={"target": "cat"}), 422,
           "unknown target")
    yield ("params not JSON", server.post("/infer/gradcam", params={"image": "axial"},
                                          data={"params": "{target: 1"}), 422, "not valid JSON")
    yield ("label on another grid", server.put("/datastore/label", params={"image": "axial", "tag": "x"},
                                               files={"label": ("l.nii.gz", wrong_size)}), 422, "does not match")


def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server, studies, tmp_path):
    before = server.get("/datastore/", params={"output": "all"}).json()["objects"]
    axial_sha = sha256(server.datastore / "axial.nii.gz")
    for name, r, status, words in _bad_requests(server, studies, tmp_path):
        assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
        body = r.json()
        assert words in body["detail"], f"{name}: {body}"
        assert f"error_id={body['error_id']}" in server.log_text(), name
        assert server.get("/info/").status_code == 200, f"server stopped answering after: {name}"
    after = server.get("/datastore/", params={"output": "all"}).json()["objects"]
    assert set(after) == set(before) and sha256(server.datastore / "axial.nii.gz") == axial_sha


def test_internal_fault_is_a_500_with_a_logged_error_id_and_the_server_recovers(server):
    weights = server.shipped / "brain-lesion-3d.pt"
    original = weights.read_bytes()
    try:
        weights.write_bytes(b"this is not a torch checkpoint")
        r = server.post("/infer/classify", params={"image": "axial", "output": "json"}, json={})
        assert r.status_code == 500 and r.json()["detail"] == "internal error"
        log = server.log_text()
        assert f"error_id={r.json()['error_id']}" in log and "Traceback" in log
        job = wait_job(server, server.post("/xai/explain/gradcam", params={"image": "axial"}, json={}).json()["job_id"])
        assert job["status"] == "failed" and job["error"]["status_code"] == 500
        assert f"error_id={job['error']['error_id']}" in server.log_text()
    finally:
        weights.write_bytes(original)
    r = server.post("/infer/classify", params={"image": "axial", "output": "json"}, json={})
    assert r.status_code == 200, r.text


def test_token_is_required(server):
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    for method, path in (("GET", "/info/"), ("GET", "/datastore/?output=all"), ("POST", "/infer/gradcam?image=axial"),
                         ("POST", "/xai/explain/gradcam?image=axial"), ("GET", "/xai/jobs"), ("GET", "/docs"),
                         ("PUT", "/datastore/label?image=axial&tag=x"), ("GET", "/datastore/image?image=axial")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = requests.request(method, server.url + path, headers=headers, timeout=30)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert "bearer token" in r.json()["detail"] and r.headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(MONAILabelClientException):
        MONAILabelClient(server.url).infer("classify", "axial", {})
    assert server.get("/info/").status_code == 200


# The fine-tune (validation, guard, versions named by lineage, live switch, shipped weights never
# written) is tested end to end in tests/test_finetune_server.py.


def test_dicom_study_gives_seg_and_parametric_map_and_its_label_exports_as_seg(server, studies, tmp_path):
    """A study that came as a DICOM series: every explanation also carries DICOM SEG (mask, levels) and a
    Parametric Map referencing the series' instances, and a stored label downloads as DICOM SEG."""
    import pydicom

    src = studies["_src"] / "dicom_series"
    source_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in sorted(src.iterdir())}
    result = server.post("/infer/gradcampp", params={"image": "dicom_series", "output": "json"}, json={}).json()
    assert {"mask_seg", "levels_seg", "saliency_pm"} <= set(result["artifacts"]), result["artifacts"]
    for name, modality in (("mask_seg", "SEG"), ("levels_seg", "SEG"), ("saliency_pm", "MR")):
        r = server.get(result["artifacts"][name])
        assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
        ds = pydicom.dcmread(io.BytesIO(r.content))
        assert ds.Modality == modality or name == "saliency_pm"
        refs = {src.ReferencedSOPInstanceUID for f in ds.PerFrameFunctionalGroupsSequence
                for d in f.get("DerivationImageSequence", []) for src in d.get("SourceImageSequence", [])}
        refs |= {r.ReferencedSOPInstanceUID for s in ds.get("ReferencedSeriesSequence", [])
                 for r in s.get("ReferencedInstanceSequence", [])}
        assert refs and refs <= source_uids, name
    # A NIfTI study has no series to reference.
    plain = server.post("/infer/gradcam", params={"image": "axial", "output": "json"}, json={}).json()
    assert "mask_seg" not in plain["artifacts"]

    label = label_bytes(datastore_image(server, "dicom_series"), 7, tmp_path)
    r = server.put("/datastore/label", params={"image": "dicom_series", "tag": "seg"},
                   files={"label": ("l.nii.gz", label)},
                   data={"params": json.dumps({"result_id": result["result_id"]})})
    assert r.status_code == 200, r.text
    seg = server.get("/xai/labels/dicom_series/seg/seg")
    assert seg.status_code == 200, seg.text
    ds = pydicom.dcmread(io.BytesIO(seg.content))
    assert ds.Modality == "SEG" and ds.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert server.get("/xai/labels/axial/corrected/seg").status_code == 404

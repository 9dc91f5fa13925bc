"""Issue 17, the served surface: every reproduction of the route, datastore and client-error findings,
against the real server (``xai serve`` as a subprocess on a free loopback port).

Each case must get a clear 4xx (JSON ``detail`` + ``error_id``), the server must answer afterwards,
and nothing outside the datastore may be read, written or revealed: a canary folder next to the
datastore must stay empty, and no reply may contain a server path.

Server ``default``: a token and the default allow-list. Server ``opened``: the same token with
``--conf stock_routes session,wsi,batch`` (stock routes turned on go through the same guards).
The upload-reading cases (detached headers, DICOM SEG, gzip bombs, ...) live in the image-reading tests.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from xai_core.io import Image, write_image
from xai_core.settings import REPO_ROOT

_spec = importlib.util.spec_from_file_location("xai_server_utils", Path(__file__).with_name("server_utils.py"))
su = importlib.util.module_from_spec(_spec)
sys.modules.setdefault(_spec.name, su)
_spec.loader.exec_module(su)

pytestmark = pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")

TOKEN = "sec-token-0123456789abcdef"
SHAPE, SPACING, ORIGIN = (20, 24, 22), (2.0, 2.0, 2.5), (-20.0, -24.0, -27.0)

# Undocumented MONAI Label routes: all off by default. (method, path, kwargs)
STOCK_OFF = [
    ("PUT", "/session/?uncompress=true", {}),
    ("GET", "/session/abc", {}),
    ("DELETE", "/session/abc", {}),
    ("POST", "/infer/wsi_v2/gradcam?image=axial", {}),
    ("POST", "/infer/wsi/gradcam?image=axial", {}),
    ("POST", "/batch/infer/gradcam", {"json": {}}),
    ("GET", "/batch/infer", {}),
    ("DELETE", "/batch/infer", {}),
    ("GET", "/model/gradcam", {}),
    ("GET", "/model/info/gradcam", {}),
    ("PUT", "/model/gradcam", {}),
    ("DELETE", "/model/gradcam", {}),
    ("GET", "/logs/", {}),
    ("GET", "/logs/gpu", {}),
    ("GET", "/scoring/", {}),
    ("POST", "/scoring/dice", {}),
    ("GET", "/ohif/index.html", {}),
    ("GET", "/proxy/dicom/qido/studies", {}),
    ("PUT", "/datastore/label/info?label=axial&tag=final", {}),
    ("PUT", "/datastore/updatelabelinfo?label=axial&tag=final", {}),
    ("PUT", "/datastore/image/info?image=axial", {}),
    ("GET", "/datastore/image/info?image=axial", {}),
    ("GET", "/datastore/dataset", {}),
    ("POST", "/reload", {}),
    ("GET", "/", {}),
    ("GET", "/favicon.ico", {}),
    ("GET", "/static/favicon.ico", {}),
    ("POST", "/train/", {"json": {}}),
    ("DELETE", "/train/", {}),
]


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Source studies, a canary folder beside the datastores, the tiny model's environment."""
    root = tmp_path_factory.mktemp("sec")
    src = root / "src"
    src.mkdir()
    for n, sid in enumerate(("axial", "second")):
        image, _ = su.synthetic_study(SHAPE, SPACING, ORIGIN, seed=n)
        write_image(image, src / f"{sid}.nii.gz")
    canary = root / "canary"
    canary.mkdir()
    env = {**su.tiny_server_env(root), "XAI_TOKEN": TOKEN}
    return {"root": root, "src": src, "canary": canary, "env": env}


@pytest.fixture(scope="module")
def server(world):
    with su.running_server(world["src"], world["root"] / "ds_default", world["root"] / "default.log", world["env"],
                           token=TOKEN, conf={"max_upload_mb": "4"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def opened(world, server):
    # Started after `server`'s tests asked for it; both stay up to the end of the module (2 x 1.2 GB).
    with su.running_server(world["src"], world["root"] / "ds_opened", world["root"] / "opened.log", world["env"],
                           token=TOKEN, conf={"max_upload_mb": "4", "stock_routes": "session,wsi,batch"}) as srv:
        yield srv


# ---------------------------------------------------------------------------------------------- helpers

def label_bytes(seed: int, tmp: Path) -> bytes:
    arr = (np.random.default_rng(seed).random(SHAPE) > 0.9).astype(np.uint8)
    return write_image(Image(arr, SPACING, ORIGIN, (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                       tmp / f"label_{seed}.nii.gz").read_bytes()


def server_paths(srv) -> list[str]:
    """Strings that must never appear in a reply: where the server keeps things."""
    # Not "/etc/": a refusal may quote the client's own value. "/tmp/tmp" is where Python's temp files go.
    paths = {str(srv.datastore), str(srv.datastore.resolve()), str(REPO_ROOT), sys.prefix, "/tmp/tmp"}
    return sorted(p for p in paths if p)


def assert_clean_4xx(srv, r: requests.Response, status: int | tuple[int, ...], words: str = "") -> dict:
    """A JSON error with the expected status, an error id in the log, no server path, and the server answers."""
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:300]}"
    body = r.json()
    assert set(body) >= {"detail", "error_id"}, body
    if words:
        assert words in str(body["detail"]), body
    for p in server_paths(srv):
        assert p not in r.text, f"reply reveals server path {p!r}: {r.text[:300]}"
    assert srv.get("/info/", timeout=30).status_code == 200
    return body


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def evil_tar(world) -> bytes:
    """A tar with an absolute member and ``../`` members aimed at the canary folder."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in (str(world["canary"] / "absolute.txt"), "../../../../../../" + str(world["canary"] / "dotdot.txt"),
                     "../canary/rel.txt", "ok.nii.gz"):
            data = b"pwned"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def wsi_form(params: dict) -> dict:
    return {"wsi": json.dumps({"level": 0, "params": params})}


# ---------------------------------------------------------------------------------------------- default server

def test_undocumented_stock_routes_are_off_with_a_json_404(server, world):
    before_canary = files_under(world["canary"])
    for method, path, kw in STOCK_OFF:
        r = requests.request(method, server.url + path, headers=server.headers, timeout=60, **kw)
        body = assert_clean_4xx(server, r, 404, "not served")
        assert "error_id" in body
    # The tar route is off, so the archive is never unpacked; the canary stays empty.
    r = server.put("/session/", params={"uncompress": "true"}, files={"files": ("x.tar", evil_tar(world))})
    assert_clean_4xx(server, r, 404, "stock_routes session")
    assert files_under(world["canary"]) == before_canary == set()
    # /openapi.json lists only what is served.
    paths = server.get("/openapi.json").json()["paths"]
    # /activelearning/{strategy} is served (issue 18: the stock plugin's "Next sample"), by the wrapper.
    for prefix in ("/session", "/infer/wsi", "/batch", "/model", "/logs", "/scoring", "/ohif",
                   "/proxy", "/reload", "/datastore/dataset", "/datastore/label/info", "/datastore/updatelabelinfo"):
        listed = [p for p in paths if p.startswith(prefix) and ("put" in paths[p] or prefix != "/datastore/label/info")]
        assert not listed, (prefix, listed)
    assert {"/infer/{model}", "/datastore/label", "/xai/jobs/{job_id}", "/info/"} <= set(paths)


def test_wsi_route_cannot_write_labels_outside_or_read_server_files(server, world):
    # Issue 17 item 3: label_tag traversal, save_label, an image path in the body.
    outside = server.datastore.parent
    before = files_under(outside)
    for params in ({"save_label": True, "label_tag": "../../x"}, {"image": "/etc/passwd"},
                   {"image": str(REPO_ROOT / "README.md")}):
        r = server.post("/infer/wsi_v2/gradcam", params={"image": "axial"}, data=wsi_form(params))
        assert_clean_4xx(server, r, 404, "not served")
    r = server.post("/infer/wsi_v2/gradcam", params={"image": "/etc/passwd"}, data=wsi_form({}))
    assert_clean_4xx(server, r, 400, "file path")
    new = {p for p in files_under(outside) - before if not p.endswith(".log")}
    assert not [p for p in new if not p.startswith(server.datastore.name)], new
    labels = server.get("/datastore/", params={"output": "all"}).json()["objects"]["axial"]["labels"]
    assert labels == {}  # no inference result saved as a label


def test_bodyless_label_info_put_does_not_rewrite_provenance(server, tmp_path):
    r = server.put("/datastore/label", params={"image": "second", "tag": "prov"},
                   files={"label": ("l.nii.gz", label_bytes(1, tmp_path))},
                   data={"params": json.dumps({"note": "dr-a", "user": "forged"})})
    assert r.status_code == 200, r.text
    saved_at = server.get("/datastore/label/info", params={"label": "second", "tag": "prov"}).json()["saved_at"]
    for path in ("/datastore/label/info", "/datastore/updatelabelinfo"):
        r = server.put(path, params={"label": "second", "tag": "prov"})
        assert_clean_4xx(server, r, 404, "cannot be turned on")
    info = server.get("/datastore/label/info", params={"label": "second", "tag": "prov"}).json()
    assert info["note"] == "dr-a" and info["user"] is None and info["saved_at"] == saved_at
    assert info["version"] == 1 and len(info["sha256"]) == 64


def test_training_without_labels_or_with_bad_values_is_a_4xx(server):
    r = server.post("/train/seg_head_finetune", json={"tag": "no_such_tag", "iterations": 2})
    assert_clean_4xx(server, r, 422, "no stored labels with tag 'no_such_tag'")
    r = server.post("/train/seg_head_finetune", json={"tag": "prov", "iterations": "many"})
    assert_clean_4xx(server, r, 422, "bad training parameters")
    r = server.post("/train/seg_head_finetune", json={"tag": "prov", "lr": -1})
    assert_clean_4xx(server, r, 422, "bad training parameters")
    # Nothing was started: the status says so (issue 18: an empty status, not MONAI Label's 404).
    r = server.get("/train/")
    assert r.status_code == 200 and r.json()["status"] == "NONE", r.text


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/datastore/image", 422), ("GET", "/datastore/image?image=", 404),
    ("GET", "/datastore/label", 400), ("GET", "/datastore/label?label=&tag=final", 400),
    ("GET", "/datastore/label?label=axial&tag=nothing", 404),
    ("GET", "/datastore/label/info", 422),
    ("DELETE", "/datastore/image", 422), ("DELETE", "/datastore/image?id=", (400, 404)),
    ("DELETE", "/datastore/label?id=axial&tag=nothing", 404), ("DELETE", "/datastore/label", 422),
    ("POST", "/infer/gradcam", 400), ("POST", "/xai/explain/gradcam", 400),
    ("PUT", "/datastore/label?image=&tag=x", 400),
    ("GET", "/xai/labels/axial/nothing/versions", 404),
    ("GET", "/xai/labels/axial/nothing/versions/v0001.nii.gz", 404),
])
def test_routes_called_without_an_image_get_a_4xx(server, method, path, status):
    r = requests.request(method, server.url + path, headers=server.headers, timeout=60)
    assert_clean_4xx(server, r, status)


def test_failed_infer_uploads_are_deleted(server, tmp_path):
    uploads = server.datastore / ".xai" / "uploads"
    flat = write_image(Image(np.random.default_rng(0).random((16, 16)).astype(np.float32), (1.0, 1.0), (0.0, 0.0),
                             (1.0, 0.0, 0.0, 1.0)), tmp_path / "flat.nii.gz").read_bytes()
    cases = [("corrupt.nii.gz", b"not an image" * 100), ("flat.nii.gz", flat), ("x.nrrd", b"NRRD0004\nbroken")]
    for name, data in cases:
        r = server.post("/infer/gradcam", params={"output": "json"}, files={"file": (name, data)})
        assert_clean_4xx(server, r, 422)
    good, _ = su.synthetic_study(SHAPE, SPACING, ORIGIN, seed=5)
    r = server.post("/infer/gradcam", params={"output": "json"},
                    files={"file": ("ok.nii.gz", write_image(good, tmp_path / "ok.nii.gz").read_bytes())})
    assert r.status_code == 200, r.text
    time.sleep(0.5)  # the worker's done-callback removes the file right after the model is done
    assert not list(uploads.glob("*")) if uploads.is_dir() else True


def test_save_reply_versions_are_right_under_concurrency(server, tmp_path):
    # Issue 17 item 7: 72 of 120 replies named the wrong version.
    bodies = {i: label_bytes(100 + i, tmp_path) for i in range(30)}
    replies: dict[int, dict] = {}
    errors: list[str] = []

    def client(k: int) -> None:
        s = requests.Session()
        s.headers.update(server.headers)
        for i in range(k, 30, 6):
            r = s.put(server.url + "/datastore/label", params={"image": "axial", "tag": "race"},
                      files={"label": ("l.nii.gz", bodies[i])}, timeout=120)
            if r.status_code != 200:
                errors.append(r.text)
            else:
                replies[i] = r.json()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(replies) == 30
    versions = sorted(r["version"] for r in replies.values())
    assert versions == list(range(1, 31))
    listing = server.get("/xai/labels/axial/race/versions").json()
    by_version = {v["version"]: v for v in listing["versions"]}
    for i, reply in replies.items():
        v = reply["version"]
        if v == 30:
            assert listing["current"]["version"] == 30
            assert server.get("/datastore/label", params={"label": "axial", "tag": "race"}).content == bodies[i]
        else:
            assert server.get(by_version[v]["url"]).content == bodies[i], f"version {v} holds other bytes"


def test_a_corrupted_label_is_a_500_naming_it_never_its_bytes(server, tmp_path):
    for n in range(2):
        r = server.put("/datastore/label", params={"image": "second", "tag": "rot"},
                       files={"label": ("l.nii.gz", label_bytes(200 + n, tmp_path))})
        assert r.status_code == 200, r.text
    current = server.datastore / "labels" / "rot" / "second.nii.gz"
    archived = server.datastore / ".xai" / "label_versions" / "rot" / "second" / "v0001.nii.gz"
    for path in (current, archived):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # what a torn write leaves
    r = server.get("/datastore/label", params={"label": "second", "tag": "rot"})
    assert r.status_code == 500, r.text
    detail = r.json()["detail"]
    assert "'rot'" in detail and "'second'" in detail and "integrity" in detail and str(server.datastore) not in detail
    r = server.get("/xai/labels/second/rot/versions/v0001.nii.gz")
    assert r.status_code == 500 and "integrity" in r.json()["detail"]
    assert server.get("/info/").status_code == 200


def test_every_route_needs_the_token(server):
    paths = server.get("/openapi.json").json()["paths"]
    fill = {"{model}": "gradcam", "{task}": "gradcam", "{job_id}": "0123", "{result_id}": "abc", "{name}": "x.json",
            "{image}": "axial", "{tag}": "final", "{file}": "v0001.nii.gz", "{trainer}": "seg_head_finetune"}
    checked = 0
    for path, ops in paths.items():
        url = path
        for k, v in fill.items():
            url = url.replace(k, v)
        for method in ops:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                r = requests.request(method.upper(), server.url + url, headers=headers, timeout=30)
                assert r.status_code == 401, (method, url, headers, r.status_code)
                assert TOKEN not in r.text
            r = requests.request(method.upper(), server.url + url, headers=server.headers, timeout=120)
            assert r.status_code != 401, (method, url)
            checked += 1
    for method, path, _ in STOCK_OFF:  # off routes answer 401 first: nothing about them is revealed
        r = requests.request(method, server.url + path, timeout=30)
        assert r.status_code == 401, (method, path)
        checked += 1
    assert checked > 40
    assert TOKEN not in server.log_text()


def test_stock_start_without_the_wrapper_refuses_to_serve_with_a_token(world, tmp_path):
    port = su.free_port()
    env = {**os.environ, **world["env"], "PYTHONPATH": str(REPO_ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(REPO_ROOT / "monai_app"),
           "--studies", str(tmp_path / "ds"), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "auth layer is not installed" in out and "--uvicorn_app monai_app.asgi:app" in out, out[-3000:]
    assert TOKEN not in out


# ---------------------------------------------------------------------------------------------- stock routes on

def test_turned_on_stock_routes_still_need_the_token(opened):
    for method, path in (("PUT", "/session/"), ("POST", "/infer/wsi_v2/gradcam?image=axial"), ("GET", "/batch/infer")):
        r = requests.request(method, opened.url + path, timeout=30)
        assert r.status_code == 401
    # Groups not named stay off.
    assert_clean_4xx(opened, opened.get("/logs/"), 404, "stock_routes logs")


def test_turned_on_session_route_refuses_tar_unpacking_and_hides_paths(opened, world, tmp_path):
    before = files_under(world["canary"])
    r = opened.put("/session/", params={"uncompress": "true"}, files={"files": ("x.tar", evil_tar(world))})
    assert_clean_4xx(opened, r, 400, "uncompress")
    assert files_under(world["canary"]) == before == set()
    good, _ = su.synthetic_study(SHAPE, SPACING, ORIGIN, seed=3)
    r = opened.put("/session/", files={"files": ("s.nii.gz", write_image(good, tmp_path / "s.nii.gz").read_bytes())})
    assert r.status_code == 200, r.text
    for p in server_paths(opened):
        assert p not in r.text, f"session reply reveals {p!r}: {r.text[:300]}"
    assert "<server path>" in r.text


def test_turned_on_wsi_route_goes_through_the_guards(opened):
    outside = opened.datastore.parent
    before = files_under(outside)
    cases = [
        ({"image": "axial"}, wsi_form({"save_label": True, "label_tag": "../../x"}), 400, "cannot be set"),
        ({"image": "axial"}, wsi_form({"image": "/etc/passwd"}), 400, "cannot be set"),
        ({"image": "axial"}, wsi_form({"where": "../../../etc"}), 400, "file paths"),
        ({"image": "/etc/passwd"}, wsi_form({}), 400, "file path"),
        ({"image": "README.md"}, wsi_form({}), 404, "unknown image id"),  # MONAI Label would open ./README.md
        ({}, wsi_form({}), 400, "no image given"),
        ({"image": "axial"}, {"wsi": "[" * 100_000}, 422, "nested"),
    ]
    for query, form, status, words in cases:
        r = opened.post("/infer/wsi_v2/gradcam", params=query, data=form)
        assert_clean_4xx(opened, r, status, words)
    new = {p for p in files_under(outside) - before if not p.endswith(".log")}
    assert not [p for p in new if not p.startswith(opened.datastore.name)], new
    assert opened.get("/datastore/", params={"output": "all"}).json()["objects"]["axial"]["labels"] == {}


def test_turned_on_stock_route_runs_off_the_event_loop(opened):
    # A batch inference request runs on a worker thread: /info/ keeps answering meanwhile.
    done = threading.Event()
    result: dict = {}

    def call() -> None:
        try:
            result["r"] = opened.post("/batch/infer/gradcam", json={}, timeout=120)
        finally:
            done.set()

    t = threading.Thread(target=call)
    t.start()
    latencies = []
    while not done.is_set() and len(latencies) < 50:
        t0 = time.perf_counter()
        assert opened.get("/info/", timeout=30).status_code == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.02)
    t.join(timeout=150)
    assert "r" in result and result["r"].status_code < 600
    assert max(latencies) < 2.0, latencies

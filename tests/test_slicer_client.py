"""XAIExplain HTTP client and background runs against a small fake explanation server.

The fake server follows docs/http_api.md: multipart replies are built with requests_toolbelt's
MultipartEncoder (what MONAI Label uses) and uploads are decoded with its MultipartDecoder, so the
client's own encoder and boundary parser are checked against an independent implementation. Its
results are computed from the uploaded file on the file's own LPS grid, as the real server does.
"""

from __future__ import annotations

import copy
import io
import json
import socket
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pytest
import SimpleITK as sitk
from requests_toolbelt import MultipartEncoder
from requests_toolbelt.multipart.decoder import MultipartDecoder

MODULE_DIR = Path(__file__).resolve().parents[1] / "slicer_extension" / "XAIExplain"
sys.path.insert(0, str(MODULE_DIR))

from XAIExplainLib.client import (  # noqa: E402
    AuthenticationError,
    JobCancelledError,
    JobFailedError,
    ProtocolError,
    ServerFaultError,
    ServerRefusedError,
    ServerTimeoutError,
    ServerUnreachableError,
    XAIClient,
    parse_multipart,
)
from XAIExplainLib.jobs import BackgroundCall, ExplanationRun  # noqa: E402
from XAIExplainLib.schema import ReplyError  # noqa: E402
from XAIExplainLib.selftest import make_server_outputs  # noqa: E402

# ------------------------------------------------------------------------------------ fake server

class FakeState:
    """What the fake server holds, and switches for the behaviours a test wants."""

    def __init__(self, token: str | None = None, job_api: bool = True, inline_report: bool = True):
        self.token = token
        self.job_api = job_api
        self.inline_report = inline_report  # False: findings and report are artifacts only
        self.schema: dict | None = None  # served at GET /xai/schema when set
        self.info_delay = 0.0
        self.images: dict[str, Path] = {}
        self.labels: dict[tuple[str, str], list[tuple[bytes, dict]]] = {}
        self.jobs: dict[str, dict] = {}
        self.results: dict[str, dict[str, Path]] = {}
        self.requests: list[tuple[str, str]] = []
        self.infer_params: list[dict] = []
        self.dir = Path(tempfile.mkdtemp(prefix="fake_xai_"))
        self.lock = threading.Lock()

    def explain(self, image_id: str, task: str, params: dict) -> dict:
        """Results for ``image_id`` (files on its grid) and the result JSON with artifact URLs."""
        rid = uuid.uuid4().hex[:12]
        with_report = params.get("report") is True
        result, files = make_server_outputs(self.images[image_id], self.dir / rid, with_findings=with_report)
        self.results[rid] = {**files, "result": self.dir / rid / "result.json"}
        if with_report:  # like the server: findings.json and report.md are artifacts too
            (self.dir / rid / "findings.json").write_text(json.dumps(result["findings"]))
            (self.dir / rid / "report.md").write_text(result["report"])
            self.results[rid].update(findings=self.dir / rid / "findings.json", report=self.dir / rid / "report.md")
            if not self.inline_report:
                result.update(findings=None, report=None)
        result.update(result_id=rid, task=task, image_id=image_id, params=params,
                      model={"name": "fake-net", "version": "9.9", "weights_sha256": None})
        # A stock MONAI Label server has no result downloads.
        result["artifacts"] = ({k: f"/xai/results/{rid}/{Path(v).name}" for k, v in self.results[rid].items()}
                               if self.job_api else {})
        (self.dir / rid / "result.json").write_text(json.dumps(result))
        return result


class Handler(BaseHTTPRequestHandler):
    server_version = "FakeXAI/1.0"
    state: FakeState  # set per server class

    def log_message(self, *args):  # keep pytest output clean
        pass

    # helpers
    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj):
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _file(self, path: Path):
        self._send(200, path.read_bytes(), "application/octet-stream",
                   {"Content-Disposition": f'attachment; filename="{path.name}"'})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _form(self, body: bytes) -> dict:
        """Form fields and files of a multipart or urlencoded request body: {name: (filename, bytes)}."""
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("multipart/"):
            out = {}
            for part in MultipartDecoder(body, ctype).parts:
                disp = part.headers.get(b"Content-Disposition", b"").decode()
                name = disp.split('name="')[1].split('"')[0]
                filename = disp.split('filename="')[1].split('"')[0] if 'filename="' in disp else None
                out[name] = (filename, part.content)
            return out
        return {k: (None, v[0].encode()) for k, v in parse_qs(body.decode()).items()}

    def _route(self, method: str):
        st = self.state
        url = urlsplit(self.path)
        path, q = url.path, {k: v[0] for k, v in parse_qs(url.query).items()}
        with st.lock:
            st.requests.append((method, path))
        if st.token and self.headers.get("Authorization") != f"Bearer {st.token}":
            return self._json(401, {"detail": "missing or wrong token", "error_id": "e401"})
        body = self._body() if method in ("POST", "PUT") else b""

        if method == "GET" and path == "/info/":
            time.sleep(st.info_delay)
            models = {"gradcampp": {"type": "explanation", "description": "Grad-CAM++"},
                      "slowcam": {"type": "explanation"}, "brokencam": {"type": "explanation"},
                      "classify": {"type": "classification", "labels": ["glioma", "healthy", "metastasis"]},
                      "saliency_mask": {"type": "segmentation", "labels": {"salient": 1}},
                      "segment": {"type": "segmentation"}}
            return self._json(200, {"name": "fake-xai", "labels": ["lesion"], "models": models})
        if method == "PUT" and path == "/datastore/image":
            form = self._form(body)
            image_id = q.get("image") or Path(form["file"][0]).name.split(".")[0]
            if "/" in image_id or ".." in image_id:
                return self._json(400, {"detail": f"image id {image_id!r} looks like a path", "error_id": "e400"})
            if image_id in st.images:  # like the real server: an image id is never replaced
                return self._json(409, {"detail": f"image {image_id!r} already exists", "error_id": "e409"})
            target = st.dir / f"image_{image_id}.nii.gz"
            target.write_bytes(form["file"][1])
            st.images[image_id] = target
            return self._json(200, {"image": image_id})
        if method == "POST" and path.startswith("/infer/"):
            task = unquote(path.split("/")[2])
            if task == "crash":
                return self._json(500, {"detail": "internal error", "error_id": "abc123"})
            image_id = q.get("image", "")
            if image_id not in st.images:
                return self._json(404, {"detail": f"unknown image {image_id!r}", "error_id": "e404"})
            params = json.loads(self._form(body).get("params", (None, b"{}"))[1] or b"{}")
            st.infer_params.append(params)
            result = st.explain(image_id, task, params)
            saliency = st.results[result["result_id"]]["saliency"]
            output = q.get("output", "all")
            if output == "json":
                return self._json(200, result)
            if output == "image":
                return self._file(saliency)
            enc = MultipartEncoder(fields={"params": (None, json.dumps(result), "application/json"),
                                           "image": (saliency.name, saliency.read_bytes(), "application/octet-stream")})
            return self._send(200, enc.to_string(), enc.content_type)
        if path.startswith("/xai/") and not st.job_api:
            return self._json(404, {"detail": "Not Found"})  # a stock MONAI Label server
        if method == "GET" and path == "/xai/schema":
            return self._json(200, st.schema) if st.schema is not None else self._json(404, {"detail": "Not Found"})
        if method == "POST" and path.startswith("/xai/explain/"):
            task = unquote(path.split("/")[3])
            image_id = q.get("image", "")
            if task not in ("gradcampp", "slowcam", "brokencam", "saliency_mask"):
                return self._json(404, {"detail": f"unknown task {task!r}", "error_id": "e404t"})
            if image_id not in st.images:
                return self._json(404, {"detail": f"unknown image {image_id!r}", "error_id": "e404"})
            job_id = uuid.uuid4().hex
            st.jobs[job_id] = {"task": task, "image": image_id, "params": json.loads(body or b"{}"), "polls": 0,
                               "status": "queued"}
            return self._json(202, {"job_id": job_id, "status": "queued"})
        if path.startswith("/xai/jobs/"):
            job = st.jobs.get(path.split("/")[3])
            if job is None:
                return self._json(404, {"detail": "unknown job", "error_id": "e404j"})
            if method == "DELETE":
                if job["status"] in ("queued", "running"):
                    job["status"] = "cancelled"
                return self._json(200, {"status": job["status"]})
            job["polls"] += 1
            reply = {"status": job["status"], "progress": 0.0, "stage": job["status"], "result": None, "error": None}
            if job["status"] in ("queued", "running"):
                if job["task"] == "slowcam" or job["polls"] < 3:
                    job["status"] = "running"
                    reply.update(status="running", progress=min(0.9, 0.3 * job["polls"]), stage="attribute")
                elif job["task"] == "brokencam":
                    job["status"] = "failed"
                    reply.update(status="failed", error={"detail": "the model ran out of memory", "error_id": "j42"})
                else:
                    job["status"] = "done"
                    job["result"] = st.explain(job["image"], job["task"], job["params"])
                    reply.update(status="done", progress=1.0, stage="done", result=job["result"])
            elif job["status"] == "done":
                reply.update(progress=1.0, result=job["result"])
            return self._json(200, reply)
        if method == "GET" and path.startswith("/xai/results/"):
            _, _, _, rid, name = path.split("/")
            for p in st.results.get(rid, {}).values():
                if p.name == name:
                    return self._file(p)
            return self._json(404, {"detail": f"no artifact {name!r} for result {rid!r}"})
        if method == "PUT" and path == "/datastore/label":
            form = self._form(body)
            key = (q["image"], q.get("tag", "final"))
            st.labels.setdefault(key, []).append((form["label"][1], json.loads(form["params"][1])))
            return self._json(200, {"image": q["image"], "label": q["image"], "versions": len(st.labels[key])})
        if method == "GET" and path in ("/datastore/label", "/datastore/label/info"):
            versions = st.labels.get((q.get("label"), q.get("tag")))
            if not versions:
                return self._json(404, {"detail": f"no label {q.get('label')!r} with tag {q.get('tag')!r}"})
            data, params = versions[-1]
            if path.endswith("/info"):
                return self._json(200, {"params": params, "versions": len(versions)})
            return self._send(200, data, "application/octet-stream",
                              {"Content-Disposition": f'attachment; filename="{q["label"]}.nii.gz"'})
        return self._json(404, {"detail": "Not Found"})

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._route("GET")

    def do_POST(self):  # noqa: N802
        self._route("POST")

    def do_PUT(self):  # noqa: N802
        self._route("PUT")

    def do_DELETE(self):  # noqa: N802
        self._route("DELETE")


class QuietHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that timed out on purpose has closed the socket: not an error of the test.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeServer:
    def __init__(self, **kwargs):
        self.state = FakeState(**kwargs)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = QuietHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


@pytest.fixture
def input_file(tmp_path) -> Path:
    """A small oblique int16 NIfTI, the kind of file the module uploads."""
    rng = np.random.default_rng(1)
    img = sitk.GetImageFromArray(rng.integers(0, 900, (12, 14, 16)).astype(np.int16))
    img.SetSpacing((0.9, 1.3, 2.2))
    img.SetOrigin((10.0, -5.5, 3.25))
    c, s = np.cos(0.4), np.sin(0.4)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    path = tmp_path / "input.nii.gz"
    sitk.WriteImage(img, str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ multipart

def test_parse_multipart_is_byte_exact_against_requests_toolbelt():
    # Binary content with CRLFs, dashes and a near-boundary must come back unchanged.
    payload = bytes(range(256)) * 3 + b"\r\n--\r\n\r\n--notboundary\r\n" + b"\x1f\x8b\x08\r\n"
    enc = MultipartEncoder(fields={"params": (None, json.dumps({"a": "ü"}), "application/json"),
                                   "image": ("saliency.nii.gz", payload, "application/octet-stream")})
    parts = parse_multipart(enc.to_string(), enc.content_type)
    assert [p.name for p in parts] == ["params", "image"]
    assert parts[0].json() == {"a": "ü"}
    assert parts[1].filename == "saliency.nii.gz"
    assert parts[1].content_type == "application/octet-stream"
    assert parts[1].data == payload


def test_parse_multipart_quoted_boundary_preamble_and_bare_lf_headers():
    body = (b"preamble\r\n--b:1\nContent-Disposition: form-data; name=\"x\"\n\nvalue\r\n"
            b"--b:1\r\n\r\nno headers\r\n--b:1--\r\nepilogue")
    parts = parse_multipart(body, 'multipart/form-data; boundary="b:1"')
    assert [(p.name, p.data) for p in parts] == [("x", b"value"), (None, b"no headers")]


@pytest.mark.parametrize("body,ctype,words", [
    (b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nvalue", "multipart/form-data; boundary=b",
     "no closing boundary"),
    (b"no parts here", "multipart/form-data; boundary=b", "boundary not found"),
    (b"{}", "multipart/form-data", "without a boundary"),
    (b"{}", "application/json", "expected a multipart reply"),
])
def test_parse_multipart_rejects_broken_replies(body, ctype, words):
    with pytest.raises(ProtocolError, match=words):
        parse_multipart(body, ctype)


# ------------------------------------------------------------------------------------ client

def test_info_lists_explanation_tasks_first_and_class_names(server):
    c = XAIClient(server.url)
    names = [t.name for t in c.explanation_tasks()]
    assert names == ["gradcampp", "slowcam", "brokencam", "saliency_mask"]
    assert c.class_names() == ["glioma", "healthy", "metastasis"]
    assert not c.has_task("vqa") and c.has_task("classify")
    assert next(t for t in c.tasks() if t.name == "saliency_mask").labels == ("salient",)


def test_infer_all_json_and_image_replies(server, input_file):
    c = XAIClient(server.url)
    image_id = c.upload_image(input_file, "case1")
    assert image_id == "case1"
    both = c.infer("gradcampp", image_id, {"target": "glioma"}, output="all")
    # The params travelled as MONAI Label's form field, not lost.
    assert server.state.infer_params[-1] == {"target": "glioma"}
    saliency = server.state.results[both.result["result_id"]]["saliency"].read_bytes()
    assert both.file == saliency and both.filename == "saliency.nii.gz"
    assert both.result["prediction"]["label"] == "glioma"
    only_json = c.infer("gradcampp", image_id, output="json")
    assert only_json.file is None and "artifacts" in only_json.result
    only_file = c.infer("gradcampp", image_id, output="image")
    assert only_file.result == {} and only_file.file[:2] == b"\x1f\x8b"  # gzip
    saved = only_file.save_file(server.state.dir / "out")
    assert saved.name == "saliency.nii.gz" and saved.read_bytes() == only_file.file


def test_server_down_is_named_clearly():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachableError, match=rf"server at {url} is not reachable \(.*refused"):
        XAIClient(url, timeout=2).info()


def test_timeout_is_reported_with_the_limit(server):
    server.state.info_delay = 1.5
    with pytest.raises(ServerTimeoutError, match=r"did not answer GET /info/ within 0.3 s"):
        XAIClient(server.url, timeout=(2, 0.3)).info()


def test_refusals_carry_the_server_detail(server, input_file):
    c = XAIClient(server.url)
    with pytest.raises(ServerRefusedError, match=r"404 Not Found\): unknown image 'nope'") as e:
        c.infer("gradcampp", "nope")
    assert e.value.status == 404 and e.value.error_id == "e404"
    with pytest.raises(ServerRefusedError, match="looks like a path"):
        c.upload_image(input_file, "..%2Fetc")
    with pytest.raises(ServerFaultError, match=r"500.*internal error \(error id abc123; see the server log\)"):
        c.infer("crash", "x")
    with pytest.raises(ValueError, match="server URL must look like"):
        XAIClient("127.0.0.1:8000")


def test_token_is_sent_as_bearer_and_missing_token_is_explained():
    with FakeServer(token="s3cret") as s:
        assert XAIClient(s.url, token="s3cret").info()["name"] == "fake-xai"
        with pytest.raises(AuthenticationError, match="401.*no token was sent.*missing or wrong token"):
            XAIClient(s.url).info()
        with pytest.raises(AuthenticationError, match="the token was not accepted"):
            XAIClient(s.url, token="wrong").info()


def test_artifact_urls_on_other_hosts_are_not_followed(server, tmp_path):
    c = XAIClient(server.url, token="t")
    with pytest.raises(ProtocolError, match="another host"):
        c.download("http://evil.example/steal", tmp_path)


def test_job_api_progress_failure_and_cancel(server, input_file):
    c = XAIClient(server.url)
    image_id = c.upload_image(input_file, "case2")
    seen = []
    result = c.wait_for_job(c.start_explanation("gradcampp", image_id, {"target": "predicted"}),
                            poll_interval=0.01, on_progress=lambda s: seen.append(s["progress"]))
    assert result["params"] == {"target": "predicted"}  # the JSON body arrived
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) >= 3
    with pytest.raises(JobFailedError, match=r"failed: the model ran out of memory \(error id j42\)"):
        c.wait_for_job(c.start_explanation("brokencam", image_id), poll_interval=0.01)
    job = c.start_explanation("slowcam", image_id)
    polls = []
    with pytest.raises(JobCancelledError):
        c.wait_for_job(job, poll_interval=0.01, should_cancel=lambda: len(polls) >= 2, on_progress=polls.append)
    assert server.state.jobs[job]["status"] == "cancelled"
    assert ("DELETE", f"/xai/jobs/{job}") in server.state.requests
    with pytest.raises(ServerTimeoutError, match="did not finish within 0.2 s"):
        c.wait_for_job(c.start_explanation("slowcam", image_id), poll_interval=0.02, timeout=0.2)
    with pytest.raises(ServerRefusedError, match="unknown task 'nope'"):
        c.start_explanation("nope", image_id)


def test_label_upload_with_provenance_and_read_back(server, input_file, tmp_path):
    c = XAIClient(server.url)
    image_id = c.upload_image(input_file, "case3")
    first = c.upload_label(image_id, input_file, "corrected_saliency", {"source": "corrected_saliency", "user": "ab"})
    second = c.upload_label(image_id, input_file, "corrected_saliency", {"source": "corrected_saliency", "user": "cd"})
    assert first["label"] == image_id and second["versions"] == 2  # the earlier version is kept
    back = c.download_label(first["label"], "corrected_saliency", tmp_path / "dl")
    assert back.read_bytes() == input_file.read_bytes() and back.name == f"{image_id}.nii.gz"
    assert c.label_info(image_id, "corrected_saliency")["params"]["user"] == "cd"
    with pytest.raises(ServerRefusedError, match="no label 'case3' with tag 'other'"):
        c.download_label(image_id, "other", tmp_path)


# ------------------------------------------------------------------------------------ background runs

def test_explanation_run_uploads_polls_and_downloads(server, input_file, tmp_path):
    run = ExplanationRun(XAIClient(server.url), "gradcampp", {"target": "predicted"}, tmp_path / "run",
                         image_id="case4", image_path=input_file, poll_interval=0.01).start()
    state = run.join(30)
    assert state.status == "done", state.error
    assert state.image_id == "case4" and state.job_id and state.progress == 1.0 and not state.blocking_fallback
    assert sorted(state.files) == ["levels", "mask", "result", "saliency"]
    rid = state.result["result_id"]
    for name, path in state.files.items():
        assert path.read_bytes() == server.state.results[rid][name].read_bytes()


@pytest.mark.parametrize("inline", [True, False], ids=["in the reply", "as artifacts"])
def test_explanation_run_with_report_gets_findings_and_report(inline, input_file, tmp_path):
    with FakeServer(inline_report=inline) as s:
        state = ExplanationRun(XAIClient(s.url), "gradcampp", {"target": "predicted", "report": True}, tmp_path,
                               image_id="case8", image_path=input_file, poll_interval=0.01).run()
        assert state.status == "done", state.error
        rid = state.result["result_id"]
        served = s.state.results[rid]
        assert json.loads(served["findings"].read_text()) == state.result["findings"]
        assert state.result["report"] == served["report"].read_text() and "# Draft report" in state.result["report"]
        # Downloaded only when the reply did not carry them (no second copy of what it holds).
        downloads = {p for m, p in s.state.requests if m == "GET" and p.startswith(f"/xai/results/{rid}/")}
        assert (f"/xai/results/{rid}/findings.json" in downloads) is (not inline)
        assert (f"/xai/results/{rid}/report.md" in downloads) is (not inline)
        assert "_files" not in state.result


def test_explanation_run_reuses_a_content_id_the_server_already_has(server, input_file, tmp_path):
    c = XAIClient(server.url)
    c.upload_image(input_file, "same_content")
    with pytest.raises(ServerRefusedError, match="409 Conflict.*already exists") as e:
        c.upload_image(input_file, "same_content")
    assert e.value.status == 409
    refused = ExplanationRun(c, "gradcampp", {}, tmp_path / "a", image_id="same_content", image_path=input_file).run()
    assert refused.status == "failed" and "already exists" in refused.error
    state = ExplanationRun(c, "gradcampp", {}, tmp_path / "b", image_id="same_content", image_path=input_file,
                           poll_interval=0.01, reuse_existing=True).run()
    assert state.status == "done", state.error
    assert state.image_id == "same_content"


def test_explanation_run_cancel_stops_the_server_job(server, input_file, tmp_path):
    run = ExplanationRun(XAIClient(server.url), "slowcam", {}, tmp_path / "run", image_id="case5",
                         image_path=input_file, poll_interval=0.05).start()
    deadline = time.monotonic() + 20
    while run.snapshot().status != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    run.cancel()
    state = run.join(20)
    assert state.status == "cancelled"
    assert server.state.jobs[state.job_id]["status"] == "cancelled"


def test_explanation_run_reports_failures_without_raising(server, tmp_path, input_file):
    state = ExplanationRun(XAIClient(server.url), "brokencam", {}, tmp_path, image_id="case6",
                           image_path=input_file, poll_interval=0.01).run()
    assert state.status == "failed" and "ran out of memory" in state.error
    url = f"http://127.0.0.1:{free_port()}"
    state = ExplanationRun(XAIClient(url, timeout=2), "gradcampp", {}, tmp_path, image_id="x",
                           image_path=input_file).run()
    assert state.status == "failed" and f"server at {url} is not reachable" in state.error


def test_explanation_run_falls_back_to_infer_on_a_stock_server(input_file, tmp_path):
    with FakeServer(job_api=False) as s:
        state = ExplanationRun(XAIClient(s.url), "gradcampp", {"target": "all"}, tmp_path, image_id="case7",
                               image_path=input_file).run()
        assert state.status == "done", state.error
        assert state.blocking_fallback and s.state.infer_params == [{"target": "all"}]
        # No artifact URLs there: the one file of the multipart reply is the heatmap.
        assert set(state.files) == {"saliency"}
        served = s.state.results[state.result["result_id"]]["saliency"]
        assert state.files["saliency"].read_bytes() == served.read_bytes()


def test_background_call_keeps_errors_as_text(server):
    ok = BackgroundCall(XAIClient(server.url).info, "connect").start()
    assert ok.join(10) and ok.value["name"] == "fake-xai" and ok.error is None
    url = f"http://127.0.0.1:{free_port()}"
    bad = BackgroundCall(XAIClient(url, timeout=2).info, "connect").start()
    assert bad.join(10) and bad.value is None and f"server at {url} is not reachable" in bad.error


# ------------------------------------------------------------------------------------ the module's Logic

def _load_module_with_slicer_shims(monkeypatch, xs):
    """Import XAIExplain.py with the few application objects its Logic and Test use (scene, module
    logics, app), and stand-ins for the Qt-only base classes: the Widget is not exercised here."""
    import importlib.util
    import types
    import unittest

    import slicer

    base = types.ModuleType("slicer.ScriptedLoadableModule")

    class Plain:
        def __init__(self, *args, **kwargs):
            pass

    class Test(unittest.TestCase):
        def delayDisplay(self, message, msec=None):  # noqa: N802 (Slicer's name)
            pass

    base.ScriptedLoadableModule = base.ScriptedLoadableModuleWidget = base.ScriptedLoadableModuleLogic = Plain
    base.ScriptedLoadableModuleTest = Test
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", base)
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setattr(slicer, "mrmlScene", xs.scene, raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: xs.segmentations_logic),
        volumes=types.SimpleNamespace(logic=lambda: xs.volumes_logic)), raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(applicationLogic=lambda: xs.application_logic,
                                                             applicationVersion="5.12.4"), raising=False)
    spec = importlib.util.spec_from_file_location("XAIExplain_under_test", MODULE_DIR / "XAIExplain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_module_logic_explains_uploads_once_and_saves_a_label(server, monkeypatch):
    from XAIExplainLib.headless import headless_scene
    from XAIExplainLib.selftest import oblique_ijk_to_ras, synthetic_input

    xs = headless_scene()
    mod = _load_module_with_slicer_shims(monkeypatch, xs)
    logic = mod.XAIExplainLogic()
    try:
        client = logic.makeClient(server.url, "")
        logic.setConnection(client, client.info())
        assert [t.name for t in logic.explanationTasks()][0] == "gradcampp" and not logic.hasVqa()
        node = xs.add_volume(synthetic_input(), oblique_ijk_to_ras(), "T1")
        # The report is on by default (parameter node) and travels as report: true.
        params_node = xs.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
        logic.setDefaultParameters(params_node)
        assert params_node.GetParameter(mod.REPORT_PARAMETER) == "true" and logic.reportRequested(params_node)
        params = logic.explanationParams("", logic.reportRequested(params_node))
        assert params == {"target": "predicted", "report": True}
        state = logic.startRun(node, "gradcampp", params).join(30)
        assert state.status == "done", state.error
        assert state.image_id == xs.content_id(node) and state.image_id in server.state.images
        assert next(iter(server.state.jobs.values()))["params"] == params
        nodes = logic.showResult(state, node, 0.5, 0.2)
        assert xs.same_grid(nodes.heatmap, node) and len(nodes.level_segment_ids) == 4
        seg = nodes.segmentation.GetSegmentation()
        assert seg.GetSegment(nodes.level_segment_ids[3]).GetName() == "Saliency top 1 % – Left insular cortex"
        assert seg.GetSegment(nodes.mask_segment_id).GetName() == "Salient region – Left insular cortex"
        # Turned off: stored in the parameter node, sent as report: false, names by percent only.
        params_node.SetParameter(mod.REPORT_PARAMETER, "false")
        logic.setDefaultParameters(params_node)  # keeps the user's choice
        assert not logic.reportRequested(params_node)
        plain = logic.startRun(node, "gradcampp", logic.explanationParams("all", False)).join(30)
        assert plain.status == "done" and plain.result["findings"] is None
        plain_nodes = logic.showResult(plain, node, 0.5, 0.2)
        assert plain_nodes.segmentation.GetSegmentation().GetSegment(
            plain_nodes.level_segment_ids[3]).GetName() == "Saliency top 1 %"
        # Unchanged volume: no second upload; the second run still works (the server has the image).
        assert logic.prepareUpload(node) == (state.image_id, None)
        again = logic.startRun(node, "gradcampp", {}).join(30)
        assert again.status == "done" and server.state.requests.count(("PUT", "/datastore/image")) == 1
        # A reply the module cannot read fails before any node is made, naming what is missing.
        broken = copy.deepcopy(again)
        del broken.result["mask"]["levels_percent"]
        n_nodes = xs.scene.GetNumberOfNodes()
        with pytest.raises(ReplyError, match="mask.levels_percent is missing"):
            logic.showResult(broken, node, 0.5, 0.2)
        assert xs.scene.GetNumberOfNodes() == n_nodes
        # A restarted module (empty upload record) uploads again and the server's 409 is taken as "have it".
        logic.forgetUpload(node)
        assert logic.startRun(node, "gradcampp", {}).join(30).status == "done"
        label_path = logic.exportLabel(nodes.segmentation, [nodes.mask_segment_id], node)
        answer = client.upload_label(state.image_id, label_path, "corrected_saliency",
                                     {"source": "corrected_saliency"})
        stored = server.state.labels[(state.image_id, "corrected_saliency")][-1][0]
        assert stored == label_path.read_bytes() and answer["label"] == state.image_id
        assert logic.clientDescription() == "XAIExplain 0.1.0 (3D Slicer 5.12.4)"
    finally:
        logic.cleanup()
    assert not logic.workdir.exists()


def test_connect_reads_the_servers_result_schema(server, monkeypatch):
    from XAIExplainLib.headless import headless_scene
    from XAIExplainLib.schema import load_schema

    mod = _load_module_with_slicer_shims(monkeypatch, headless_scene())
    logic = mod.XAIExplainLogic()
    try:
        client = XAIClient(server.url)
        info, problems = logic.serverInfo(client)
        assert info["name"] == "fake-xai" and problems is None  # the server does not serve its schema
        server.state.schema = copy.deepcopy(load_schema())
        assert client.result_schema() == load_schema()
        assert logic.serverInfo(client)[1] == []
        server.state.schema["version"] = "3.0"
        assert logic.serverInfo(client)[1] == ["the server's result schema is 3.0, the module reads 2.0"]
    finally:
        logic.cleanup()


def test_module_self_test_runs_on_slicer_core(monkeypatch):
    """XAIExplainTest, what Slicer runs with Reload and Test / ctest, here on a headless scene."""
    import unittest

    from XAIExplainLib.headless import headless_scene

    mod = _load_module_with_slicer_shims(monkeypatch, headless_scene())
    outcome = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(mod.XAIExplainTest("runTest"))
    assert outcome.wasSuccessful(), outcome.failures + outcome.errors

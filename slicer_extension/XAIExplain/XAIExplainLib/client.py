"""HTTP client of the explanation server (contract: ``docs/http_api.md``), built on ``requests`` only.

No Qt and no Slicer here: the module's widget calls it from a worker thread and the tests call it from
plain Python. Every failure is raised as an :class:`XAIClientError` subclass whose message says what
went wrong in words a user can act on (server down, token wrong, what the server objected to).

Multipart replies are parsed by :func:`parse_multipart` (own boundary parser): the ``cgi`` module that
older clients use is gone from Python 3.13, and Slicer 5.12 already ships 3.12 where it is deprecated.
"""

from __future__ import annotations

import email.message
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from .schema import get

__all__ = [
    "AuthenticationError",
    "InferResult",
    "JobCancelledError",
    "JobFailedError",
    "Part",
    "ProtocolError",
    "ServerFaultError",
    "ServerRefusedError",
    "ServerTimeoutError",
    "ServerUnreachableError",
    "TaskInfo",
    "TaskNotAvailableError",
    "VQA_METHODS",
    "VQA_PLANES",
    "VQA_TASK",
    "XAIClient",
    "XAIClientError",
    "parse_multipart",
    "vqa_params",
]

#: (connect, read) seconds. The read timeout bounds one reply, not a whole job: long explanations go
#: through the job API, whose every call answers at once.
DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 120.0)

#: Task types whose output the module shows as a saliency map (besides ``explanation``).
SALIENCY_TASK_NAMES = ("saliency_mask",)
VQA_TASK = "vqa"
#: The ``vqa`` task's planes (patient planes, LPS) and explanation methods; ``relig`` is its default.
VQA_PLANES = ("axial", "coronal", "sagittal")
VQA_METHODS = ("relig", "ig", "none")
_CHUNK = 1 << 16


# ----------------------------------------------------------------------------------------- errors

class XAIClientError(Exception):
    """Anything that kept a request from giving a usable answer."""


class ServerUnreachableError(XAIClientError):
    """No connection: the server is down, the URL is wrong, or a firewall is in the way."""


class ServerTimeoutError(XAIClientError):
    """The server accepted the connection but did not answer in time."""


class ServerRefusedError(XAIClientError):
    """The server answered 4xx. ``detail`` is the server's own explanation."""

    def __init__(self, message: str, status: int, detail: str, error_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.error_id = error_id


class AuthenticationError(ServerRefusedError):
    """401/403: the server wants a (different) token."""


class ServerFaultError(XAIClientError):
    """The server answered 5xx: a fault on its side; ``error_id`` points into its log."""

    def __init__(self, message: str, status: int, detail: str, error_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.error_id = error_id


class ProtocolError(XAIClientError):
    """The reply did not have the shape the contract promises."""


class TaskNotAvailableError(XAIClientError):
    """The server does not offer the requested task."""


class JobFailedError(XAIClientError):
    """A background job ended with status ``failed``."""


class JobCancelledError(XAIClientError):
    """A background job was cancelled (by us or on the server)."""


# ------------------------------------------------------------------------------------ data types

@dataclass(frozen=True)
class TaskInfo:
    """One task of ``/info/`` → ``models``."""

    name: str
    type: str
    description: str = ""
    labels: tuple[str, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_explanation(self) -> bool:
        return self.type == "explanation" or self.name in SALIENCY_TASK_NAMES


@dataclass(frozen=True)
class Part:
    """One part of a multipart reply."""

    name: str | None
    filename: str | None
    content_type: str | None
    data: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.data.decode("utf-8"))


@dataclass
class InferResult:
    """What ``/infer`` answered: the JSON (``{}`` for ``output=image``) and the file, when one came."""

    result: dict[str, Any]
    file: bytes | None = None
    filename: str | None = None

    def save_file(self, folder: str | os.PathLike, default_name: str = "result.nii.gz") -> Path | None:
        """Write the file into ``folder`` under the server's file name (basename only); None without a file."""
        if self.file is None:
            return None
        path = Path(folder) / _safe_filename(self.filename, default_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.file)
        return path


# ----------------------------------------------------------------------------- multipart parsing

def _header_params(value: str) -> email.message.Message:
    """A Message holding one ``Content-Type``-style header, so that ``get_param``/``get_filename`` parse
    quoting and RFC 2231 encodings for us."""
    m = email.message.Message()
    m["Content-Disposition"] = value
    return m


def _boundary(content_type: str) -> bytes:
    m = email.message.Message()
    m["Content-Type"] = content_type
    if m.get_content_maintype() != "multipart":
        raise ProtocolError(f"expected a multipart reply, got Content-Type {content_type!r}")
    boundary = m.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise ProtocolError(f"multipart reply without a boundary (Content-Type {content_type!r})")
    return boundary.encode("latin-1")


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """Split a ``multipart/*`` body (RFC 2046) into its parts, byte-exact for binary content.

    A delimiter is CRLF + ``--`` + boundary at the start of a line; the CRLF before it belongs to the
    delimiter, not to the preceding part (so a gzip file keeps its last bytes). Bare-LF line ends are
    accepted in part headers, as some servers write them.
    """
    delim = b"--" + _boundary(content_type)
    data = b"\r\n" + body  # the first delimiter may start the body without a CRLF before it
    pieces = data.split(b"\r\n" + delim)
    if len(pieces) < 2:
        raise ProtocolError("multipart reply holds no part (boundary not found)")
    parts: list[Part] = []
    closed = False
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            closed = True
            break
        # Rest of the delimiter line: optional transport padding, then the line end.
        eol = piece.find(b"\n")
        if eol < 0:
            raise ProtocolError("truncated multipart reply (a delimiter line does not end)")
        piece = piece[eol + 1:]
        sep = re.search(rb"\r?\n\r?\n", piece)
        if piece.startswith((b"\r\n", b"\n")):  # no headers at all
            head, content = b"", piece[2 if piece.startswith(b"\r\n") else 1:]
        elif sep is None:
            raise ProtocolError("malformed multipart part (no blank line after its headers)")
        else:
            head, content = piece[:sep.start()], piece[sep.end():]
        headers: dict[str, str] = {}
        for line in re.split(rb"\r?\n", head):
            if not line.strip():
                continue
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        disp = _header_params(headers.get("content-disposition", "form-data"))
        name = disp.get_param("name", header="content-disposition")
        parts.append(Part(name=name if isinstance(name, str) else None,
                          filename=disp.get_filename(), content_type=headers.get("content-type"),
                          data=content, headers=headers))
    if not closed:
        raise ProtocolError("truncated multipart reply (no closing boundary)")
    return parts


def _safe_filename(name: str | None, default: str) -> str:
    """Basename only: a server-chosen name must never write outside the target folder."""
    base = os.path.basename((name or "").replace("\\", "/")).strip()
    return base if base and base not in (".", "..") else default


def _filename_from_response(r: requests.Response) -> str | None:
    cd = r.headers.get("Content-Disposition")
    return _header_params(cd).get_filename() if cd else None


def _format_detail(detail: Any) -> str:
    """FastAPI's ``detail`` is a string, or for validation errors a list of ``{loc, msg}``."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        items = []
        for d in detail:
            if isinstance(d, Mapping):
                loc = ".".join(str(x) for x in d.get("loc", []) if x != "body")
                items.append(f"{loc}: {d.get('msg', d)}" if loc else str(d.get("msg", d)))
            else:
                items.append(str(d))
        return "; ".join(items)
    return json.dumps(detail)


# ---------------------------------------------------------------------------------------- client

class XAIClient:
    """Client of one explanation server.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8000`` (a path prefix behind a proxy is kept).
        token: sent as ``Authorization: Bearer <token>`` on every request when given.
        timeout: seconds, or ``(connect, read)``; per request.
        session: a ``requests.Session`` to reuse (tests, proxies); one is made otherwise.
    """

    def __init__(self, url: str, token: str | None = None,
                 timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
                 session: requests.Session | None = None):
        url = (url or "").strip()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"server URL must look like http://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.token = token or None
        self.timeout = timeout
        self.session = session or requests.Session()
        self._info: dict[str, Any] | None = None

    def clone(self) -> XAIClient:
        """A client with the same URL, token and timeouts and its own session: requests.Session is not
        documented as thread-safe, so a worker thread gets its own."""
        return XAIClient(self.url, self.token, self.timeout)

    # ------------------------------------------------------------------ transport
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _url(self, path: str) -> str:
        """Absolute URL of a server path. Absolute URLs must point at this server (the token goes with them)."""
        if path.startswith(("http://", "https://")):
            base, target = urlsplit(self.url), urlsplit(path)
            if (base.scheme, base.netloc) != (target.scheme, target.netloc):
                raise ProtocolError(f"server handed out a URL on another host ({path}); not following it")
            return path
        return self.url + "/" + path.lstrip("/")

    def _timeout_s(self, timeout: float | tuple[float, float] | None) -> float:
        t = self.timeout if timeout is None else timeout
        return float(t[1] if isinstance(t, tuple) else t)

    def request(self, method: str, path: str, *, expected: Iterable[int] = (200,),
                timeout: float | tuple[float, float] | None = None, **kwargs: Any) -> requests.Response:
        """One request with the client's auth and timeouts; every failure becomes an XAIClientError."""
        url = self._url(path)
        shown = urlsplit(url).path
        headers = {**self._headers(), **kwargs.pop("headers", {})}
        try:
            r = self.session.request(method, url, headers=headers,
                                     timeout=self.timeout if timeout is None else timeout, **kwargs)
        except requests.Timeout as e:  # before ConnectionError: ConnectTimeout is both
            raise ServerTimeoutError(f"server at {self.url} did not answer {method} {shown} within "
                                     f"{self._timeout_s(timeout):g} s") from e
        except requests.ConnectionError as e:
            raise ServerUnreachableError(f"server at {self.url} is not reachable ({_reason(e)})") from e
        except requests.RequestException as e:
            raise XAIClientError(f"request {method} {shown} to {self.url} failed: {e}") from e
        if r.status_code >= 400:
            self._raise_for(r, method, shown)
        if r.status_code not in tuple(expected):
            raise ProtocolError(f"server at {self.url} answered {method} {shown} with unexpected status "
                                f"{r.status_code}")
        return r

    def _raise_for(self, r: requests.Response, method: str, path: str) -> None:
        detail, error_id = "", None
        try:
            body = r.json()
        except ValueError:
            body = None
        if isinstance(body, Mapping):
            detail = _format_detail(body.get("detail", "")) if "detail" in body else json.dumps(body)[:500]
            error_id = body.get("error_id")
        elif r.text:
            detail = r.text.strip()[:500]
        what = f"{r.status_code} {r.reason}".strip()
        if r.status_code in (401, 403):
            hint = "no token was sent" if not self.token else "the token was not accepted"
            raise AuthenticationError(f"server at {self.url} refused {method} {path} ({what}; {hint})"
                                      + (f": {detail}" if detail else ""), r.status_code, detail, error_id)
        if r.status_code < 500:
            raise ServerRefusedError(f"server at {self.url} refused {method} {path} ({what})"
                                     + (f": {detail}" if detail else ""), r.status_code, detail, error_id)
        ref = f" (error id {error_id}; see the server log)" if error_id else ""
        raise ServerFaultError(f"server at {self.url} failed on {method} {path} ({what})"
                               + (f": {detail}" if detail else "") + ref, r.status_code, detail, error_id)

    @staticmethod
    def _json(r: requests.Response, what: str) -> Any:
        try:
            return r.json()
        except ValueError as e:
            raise ProtocolError(f"{what}: expected JSON, got {r.headers.get('Content-Type')!r}") from e

    # ------------------------------------------------------------------ info and tasks
    def info(self, refresh: bool = True) -> dict[str, Any]:
        """``GET /info/``: app name, labels and tasks (``models``). Cached for :meth:`tasks`."""
        if refresh or self._info is None:
            info = self._json(self.request("GET", "/info/"), "GET /info/")
            if not isinstance(info, Mapping):
                raise ProtocolError("GET /info/ did not answer a JSON object")
            self._info = dict(info)
        return self._info

    def result_schema(self) -> dict[str, Any] | None:
        """``GET /xai/schema``: the JSON Schema of the server's replies; None from a server that does not
        serve it (404: an older server, or a stock MONAI Label)."""
        try:
            r = self.request("GET", "/xai/schema")
        except ServerRefusedError as e:
            if e.status == 404 and not isinstance(e, AuthenticationError):
                return None
            raise
        body = self._json(r, "GET /xai/schema")
        if not isinstance(body, Mapping):
            raise ProtocolError("GET /xai/schema did not answer a JSON object")
        return dict(body)

    def tasks(self, info: Mapping[str, Any] | None = None) -> list[TaskInfo]:
        """Every task the server offers, in the server's order."""
        info = info if info is not None else self.info(refresh=self._info is None)
        out = []
        for name, m in (info.get("models") or {}).items():
            m = m if isinstance(m, Mapping) else {}
            labels = m.get("labels") or []
            if isinstance(labels, Mapping):  # MONAI Label gives {name: index} for segmentation tasks
                labels = sorted(labels, key=lambda k: labels[k])
            out.append(TaskInfo(name=name, type=str(m.get("type", "")), description=str(m.get("description", "")),
                                labels=tuple(str(x) for x in labels), config=dict(m.get("config") or {})))
        return out

    def explanation_tasks(self, info: Mapping[str, Any] | None = None) -> list[TaskInfo]:
        """Tasks that return a saliency map: type ``explanation`` first, then ``saliency_mask`` and kin."""
        tasks = self.tasks(info)
        return [t for t in tasks if t.type == "explanation"] + [t for t in tasks if t.is_explanation
                                                                 and t.type != "explanation"]

    def has_task(self, name: str, info: Mapping[str, Any] | None = None) -> bool:
        return any(t.name == name for t in self.tasks(info))

    def class_names(self, info: Mapping[str, Any] | None = None) -> list[str]:
        """Class names a target can be chosen from (the ``classify`` task's labels, else the app's)."""
        info = info if info is not None else self.info(refresh=self._info is None)
        for t in self.tasks(info):
            if t.type == "classification" and t.labels:
                return list(t.labels)
        labels = info.get("labels") or []
        return [str(x) for x in (sorted(labels, key=lambda k: labels[k]) if isinstance(labels, Mapping) else labels)]

    # ------------------------------------------------------------------ datastore
    def upload_image(self, path: str | os.PathLike, image_id: str | None = None,
                     params: Mapping[str, Any] | None = None) -> str:
        """``PUT /datastore/image``: upload a volume file; returns the id the server stored it under."""
        path = Path(path)
        query = {"image": image_id} if image_id else {}
        with open(path, "rb") as fh:
            r = self.request("PUT", "/datastore/image", params=query,
                             files={"file": (path.name, fh, "application/octet-stream")},
                             data={"params": json.dumps(dict(params or {}))})
        body = self._json(r, "PUT /datastore/image")
        stored = body.get("image") if isinstance(body, Mapping) else None
        if not stored:
            raise ProtocolError(f"PUT /datastore/image answered without an image id: {body!r}")
        return str(stored)

    def upload_label(self, image_id: str, path: str | os.PathLike, tag: str,
                     params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``PUT /datastore/label``: store a label for ``image_id`` under ``tag`` with provenance ``params``.

        Returns the server's answer (``{"image": ..., "label": <label id>, ...}``)."""
        path = Path(path)
        with open(path, "rb") as fh:
            r = self.request("PUT", "/datastore/label", params={"image": image_id, "tag": tag},
                             files={"label": (path.name, fh, "application/octet-stream")},
                             data={"params": json.dumps(dict(params or {}))})
        body = self._json(r, "PUT /datastore/label")
        return dict(body) if isinstance(body, Mapping) else {"answer": body}

    def download_label(self, label_id: str, tag: str, folder: str | os.PathLike) -> Path:
        """``GET /datastore/label``: the stored label file, written into ``folder``."""
        return self._download("/datastore/label", Path(folder), f"{label_id}_{tag}.nii.gz",
                              params={"label": label_id, "tag": tag})

    def label_info(self, label_id: str, tag: str) -> dict[str, Any]:
        """``GET /datastore/label/info``: what the server keeps about a label (provenance included)."""
        r = self.request("GET", "/datastore/label/info", params={"label": label_id, "tag": tag})
        return self._json(r, "GET /datastore/label/info")

    # ------------------------------------------------------------------ blocking inference
    def infer(self, task: str, image_id: str, params: Mapping[str, Any] | None = None,
              output: str = "all", timeout: float | tuple[float, float] | None = None) -> InferResult:
        """``POST /infer/{task}``: run a task and wait for it. Handles JSON-only, file-only and
        multipart (``params`` + ``image``) replies.

        The parameters travel as the form field ``params``, which is what MONAI Label's endpoint reads.
        """
        r = self.request("POST", f"/infer/{quote(task, safe='')}", params={"image": image_id, "output": output},
                         data={"params": json.dumps(dict(params or {}))}, timeout=timeout)
        return decode_infer_reply(r)

    # ------------------------------------------------------------------ non-blocking jobs
    def start_explanation(self, task: str, image_id: str, params: Mapping[str, Any] | None = None) -> str:
        """``POST /xai/explain/{task}``: queue an explanation; returns the job id."""
        r = self.request("POST", f"/xai/explain/{quote(task, safe='')}", params={"image": image_id},
                         json=dict(params or {}), expected=(200, 201, 202))
        body = self._json(r, "POST /xai/explain")
        job_id = body.get("job_id") if isinstance(body, Mapping) else None
        if not job_id:
            raise ProtocolError(f"POST /xai/explain answered without a job id: {body!r}")
        return str(job_id)

    def job(self, job_id: str) -> dict[str, Any]:
        """``GET /xai/jobs/{id}``: status, progress, stage, result or error."""
        body = self._json(self.request("GET", f"/xai/jobs/{quote(job_id, safe='')}"), "GET /xai/jobs")
        if not isinstance(body, Mapping) or "status" not in body:
            raise ProtocolError(f"GET /xai/jobs answered without a status: {body!r}")
        return dict(body)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """``DELETE /xai/jobs/{id}``. A job that already ended (404/409) is not an error."""
        try:
            r = self.request("DELETE", f"/xai/jobs/{quote(job_id, safe='')}", expected=(200, 202, 204))
        except ServerRefusedError as e:
            if e.status in (404, 409) and not isinstance(e, AuthenticationError):
                return {"status": "gone", "detail": e.detail}
            raise
        return r.json() if r.content else {}

    def wait_for_job(self, job_id: str, poll_interval: float = 0.5, timeout: float | None = None,
                     should_cancel: Callable[[], bool] | None = None,
                     on_progress: Callable[[dict[str, Any]], None] | None = None,
                     sleep: Callable[[float], Any] = time.sleep) -> dict[str, Any]:
        """Poll a job until it ends; returns its ``result``.

        Raises JobFailedError (with the server's error), JobCancelledError (when ``should_cancel()``
        turned true, after cancelling the job on the server) or ServerTimeoutError after ``timeout`` s
        (the job is cancelled too, so that it does not keep the server busy).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if should_cancel and should_cancel():
                self.cancel_job(job_id)
                raise JobCancelledError(f"job {job_id} cancelled")
            state = self.job(job_id)
            if on_progress:
                on_progress(state)
            status = state.get("status")
            if status == "done":
                result = state.get("result")
                if not isinstance(result, Mapping):
                    raise ProtocolError(f"job {job_id} is done but carries no result")
                return dict(result)
            if status == "failed":
                raise JobFailedError(f"job {job_id} failed: {describe_job_error(state.get('error'))}")
            if status == "cancelled":
                raise JobCancelledError(f"job {job_id} was cancelled on the server")
            if deadline is not None and time.monotonic() > deadline:
                self.cancel_job(job_id)
                raise ServerTimeoutError(f"job {job_id} on {self.url} did not finish within {timeout:g} s "
                                         "(cancelled)")
            sleep(poll_interval)

    # ------------------------------------------------------------------ downloads
    def _download(self, path: str, folder: Path, default_name: str, params: Mapping[str, Any] | None = None,
                  name: str | None = None) -> Path:
        """Stream a file into ``folder``; the name is ``name``, else the server's, else ``default_name``."""
        r = self.request("GET", path, params=params, stream=True)
        target = folder / _safe_filename(name or _filename_from_response(r)
                                         or os.path.basename(urlsplit(path).path), default_name)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        try:
            with open(tmp, "wb") as fh:
                for chunk in r.iter_content(_CHUNK):
                    fh.write(chunk)
            os.replace(tmp, target)
        except requests.RequestException as e:  # the body can time out or break after the headers came
            raise ServerTimeoutError(f"download of {urlsplit(path).path} from {self.url} broke off: "
                                     f"{_reason(e)}") from e
        finally:
            r.close()
            if tmp.exists():
                tmp.unlink()
        return target

    def download(self, path_or_url: str, folder: str | os.PathLike, name: str | None = None) -> Path:
        """Download a server path (e.g. an artifact URL from a result) into ``folder``."""
        return self._download(path_or_url, Path(folder), name or "download.bin", name=name)

    def download_artifacts(self, result: Mapping[str, Any], folder: str | os.PathLike,
                           names: Iterable[str] | None = None) -> dict[str, Path]:
        """Download the artifacts a result lists (all, or ``names``); returns ``{name: path}``.

        Files are named after the artifact (``saliency.nii.gz`` ...), so that two results never mix
        as long as each gets its own folder.
        """
        artifacts = get(result, "artifacts", {})
        if not isinstance(artifacts, Mapping):
            raise ProtocolError("result 'artifacts' is not an object")
        wanted = set(names) if names is not None else set(artifacts)
        missing = wanted - set(artifacts)
        if names is not None and missing:
            raise ProtocolError(f"result lists no artifact(s) {sorted(missing)}; it has {sorted(artifacts)}")
        out = {}
        for key, url in artifacts.items():
            if key not in wanted:
                continue
            suffix = file_suffix(urlsplit(str(url)).path) or ".bin"
            out[key] = self.download(str(url), folder, name=f"{key}{suffix}")
        return out


def file_suffix(path: str) -> str:
    """The file type suffix of a path or name, double ones included (``.nii.gz``, ``.seg.nrrd``)."""
    base = os.path.basename(path)
    for s in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".json", ".png", ".md", ".html", ".txt"):
        if base.lower().endswith(s):
            return s
    return os.path.splitext(base)[1]


def _reason(e: Exception) -> str:
    """The innermost cause of a requests error, e.g. 'Connection refused', not a 300-character repr."""
    text = str(e)
    for pattern in (r"\[Errno -?\d+\] ([^')\]]+)", r"(Connection refused)", r"(Read timed out)",
                    r"(Name or service not known)", r"(Connection reset by peer)"):
        m = re.search(pattern, text)
        if m:
            return m.group(1).strip()
    return type(e).__name__


def vqa_params(question: str, plane: str, slice_mm: float, method: str = "relig") -> dict[str, Any]:
    """Parameters of the ``vqa`` task (``docs/http_api.md``): a question about one slice.

    ``plane`` is a patient plane and ``slice_mm`` the slice's LPS coordinate along its axis (axial: S,
    coronal: P, sagittal: L), as :func:`.scene.slice_position` reads them from a slice view. Checked
    here so that a request that cannot be right never leaves Slicer (the server checks again, and is
    the judge of a slice outside the volume); ValueError names the problem.
    """
    q = str(question or "").strip()
    if not q:
        raise ValueError("type a question first")
    if plane not in VQA_PLANES:
        raise ValueError(f"plane must be one of {', '.join(VQA_PLANES)}, got {plane!r}")
    if method not in VQA_METHODS:
        raise ValueError(f"method must be one of {', '.join(VQA_METHODS)}, got {method!r}")
    try:
        mm = float(slice_mm)
    except (TypeError, ValueError):
        raise ValueError(f"slice_mm must be a number (mm), got {slice_mm!r}") from None
    if mm != mm or mm in (float("inf"), float("-inf")):
        raise ValueError(f"slice_mm must be a finite number (mm), got {slice_mm!r}")
    # 0.1 µm is far below any voxel; rounding keeps float noise from the view matrix (12.499999999)
    # out of the request, the job record and the provenance.
    return {"question": q, "plane": plane, "slice_mm": round(mm, 4) + 0.0, "method": method}


def describe_job_error(error: Any) -> str:
    """Readable text of a job's ``error`` field (``{"detail": ..., "error_id": ...}`` or a string)."""
    if not error:
        return "no detail given"
    if isinstance(error, Mapping):
        detail = _format_detail(error.get("detail") or error.get("message") or error)
        return detail + (f" (error id {error['error_id']})" if error.get("error_id") else "")
    return str(error)


def decode_infer_reply(r: requests.Response) -> InferResult:
    """JSON (``output=json``), a file (``output=image``) or multipart ``params`` + ``image`` (``output=all``)."""
    ctype = r.headers.get("Content-Type", "")
    if ctype.startswith("multipart/"):
        parts = parse_multipart(r.content, ctype)
        result: dict[str, Any] = {}
        file_part = None
        for p in parts:
            if p.name == "params":
                try:
                    result = p.json()
                except ValueError as e:
                    raise ProtocolError("multipart reply: the 'params' part is not JSON") from e
            elif p.name == "image" or (p.filename and file_part is None):
                file_part = p
        return InferResult(result=result, file=file_part.data if file_part else None,
                           filename=file_part.filename if file_part else None)
    if ctype.startswith("application/json"):
        body = r.json()
        return InferResult(result=body if isinstance(body, dict) else {"result": body})
    return InferResult(result={}, file=r.content, filename=_filename_from_response(r))

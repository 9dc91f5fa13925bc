"""Run one explanation off the GUI thread: upload → queue a job → poll → download the artifacts.

The widget starts an :class:`ExplanationRun` and reads :meth:`ExplanationRun.snapshot` from a QTimer,
so Qt never waits on the network; the scene is only touched back on the GUI thread, once the run is
done (VTK/MRML objects are not thread-safe). Nothing here imports Qt or Slicer.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .client import (
    JobCancelledError,
    ProtocolError,
    ServerRefusedError,
    XAIClient,
    XAIClientError,
    file_suffix,
)
from .schema import get

__all__ = ["BackgroundCall", "ExplanationRun", "RunState", "upload_image"]

log = logging.getLogger(__name__)

TERMINAL = ("done", "failed", "cancelled")
#: Artifacts the module loads into the scene (others, e.g. the overlay PNG, are left on the server).
SCENE_ARTIFACTS = ("saliency", "levels", "mask", "result")
#: Reply fields that are also artifacts (with ``report: true``): downloaded only when the reply
#: lists them without carrying them.
TEXT_ARTIFACTS = ("findings", "report")


@dataclass
class RunState:
    """What a run has got to. ``status``: starting, uploading, queued, running, downloading, done,
    failed or cancelled."""

    status: str = "starting"
    stage: str = ""
    progress: float = 0.0
    image_id: str | None = None
    job_id: str | None = None
    result: dict[str, Any] | None = None
    files: dict[str, Path] = field(default_factory=dict)
    error: str | None = None
    blocking_fallback: bool = False  # the server has no job API; /infer was used

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


class ExplanationRun:
    """One explanation of one image by one task, run on a daemon thread.

    Args:
        client: the server's client; the run works on its own clone (own HTTP session).
        task: task name (``gradcampp``, ``saliency_mask``, ``vqa`` ...).
        params: task parameters (``{"target": "predicted"}``, ``{"question": ...}``).
        out_dir: folder the artifacts are written into (one folder per run).
        image_id: datastore id of the image (the id to upload under when ``image_path`` is given).
        image_path: a volume file to upload first; None when the server already has the image.
        poll_interval: seconds between job polls.
        timeout: seconds for the whole run; the job is cancelled on the server when it runs out.
        reuse_existing: when the server already has ``image_id`` (409 on upload), use it. Only for ids
            derived from the content (``XAIScene.content_id``): the server never replaces an image.
    """

    def __init__(self, client: XAIClient, task: str, params: Mapping[str, Any] | None, out_dir: str | os.PathLike,
                 image_id: str, image_path: str | os.PathLike | None = None, poll_interval: float = 0.5,
                 timeout: float | None = 900.0, artifacts: tuple[str, ...] = SCENE_ARTIFACTS,
                 reuse_existing: bool = False):
        self.client = client.clone()
        self.task = task
        self.params = dict(params or {})
        self.out_dir = Path(out_dir)
        self.image_path = Path(image_path) if image_path else None
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.artifacts = artifacts
        self.reuse_existing = reuse_existing
        self._state = RunState(image_id=image_id)
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> ExplanationRun:
        self._thread = threading.Thread(target=self.run, name=f"xai-explain-{self.task}", daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the run to stop; a queued or running job is cancelled on the server by the worker."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def snapshot(self) -> RunState:
        """A copy of the current state, safe to read from the GUI thread."""
        with self._lock:
            return copy.deepcopy(self._state)

    def join(self, timeout: float | None = None) -> RunState:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.snapshot()

    def _update(self, **changes: Any) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self._state, k, v)

    # ------------------------------------------------------------------ the work (worker thread)
    def run(self) -> RunState:
        """Do the whole run in the calling thread; errors end up in the state, never raised."""
        t0 = time.monotonic()
        try:
            image_id = self._state.image_id or ""
            if self.image_path is not None:
                self._update(status="uploading", stage="uploading the volume", progress=0.01)
                image_id = upload_image(self.client, self.image_path, image_id, self.reuse_existing)
                self._update(image_id=image_id, progress=0.05)
            self._check_cancel()
            result = self._explain(image_id, t0)
            self._check_cancel()
            self._update(status="downloading", stage="downloading results", progress=0.9, result=result)
            files = self._download(result)
            self._update(status="done", stage="done", progress=1.0, files=files, result=result)
        except JobCancelledError:
            self._update(status="cancelled", stage="cancelled", error=None)
        except XAIClientError as e:
            self._update(status="failed", stage="failed", error=str(e))
        except Exception as e:  # a bug must still end the run, or the GUI would wait forever
            log.exception("explanation run failed")
            self._update(status="failed", stage="failed", error=f"{type(e).__name__}: {e}")
        return self.snapshot()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise JobCancelledError("cancelled")

    def _explain(self, image_id: str, t0: float) -> dict[str, Any]:
        try:
            job_id = self.client.start_explanation(self.task, image_id, self.params)
        except ServerRefusedError as e:
            # A stock MONAI Label server has no /xai routes: FastAPI's bare 404 "Not Found" (or 405).
            if e.status == 405 or (e.status == 404 and e.detail in ("Not Found", "")):
                return self._explain_blocking(image_id)
            raise
        self._update(status="queued", stage="queued", job_id=job_id, progress=0.06)

        def progress(state: dict[str, Any]) -> None:
            frac = state.get("progress")
            frac = float(frac) if isinstance(frac, int | float) else 0.0
            self._update(status="running" if state.get("status") == "running" else self._state.status,
                         stage=str(state.get("stage") or state.get("status") or ""),
                         progress=0.06 + 0.84 * min(max(frac, 0.0), 1.0))

        remaining = None if self.timeout is None else max(1.0, self.timeout - (time.monotonic() - t0))
        # Cancel wakes the wait at once instead of after a full poll interval.
        return self.client.wait_for_job(job_id, self.poll_interval, remaining,
                                        should_cancel=self._cancel.is_set, on_progress=progress,
                                        sleep=self._cancel.wait)

    def _explain_blocking(self, image_id: str) -> dict[str, Any]:
        """``/infer`` when the server has no job API: the worker waits; a cancel only discards the answer."""
        self._update(status="running", stage="running (server without job API)", blocking_fallback=True,
                     progress=0.1)
        timeout = (5.0, self.timeout) if self.timeout else None
        res = self.client.infer(self.task, image_id, self.params, output="all", timeout=timeout)
        self._check_cancel()
        result = dict(res.result)
        if res.file is not None:
            # No artifact URLs from a stock server: the one file is the map (or the mask, for a
            # segmentation-type task such as saliency_mask).
            key = "mask" if self.task == "saliency_mask" else "saliency"
            self.out_dir.mkdir(parents=True, exist_ok=True)
            target = self.out_dir / f"{key}{file_suffix(res.filename or '') or '.nii.gz'}"
            target.write_bytes(res.file)
            result.setdefault("_files", {})[key] = str(target)
        return result

    def _download(self, result: dict[str, Any]) -> dict[str, Path]:
        """The scene's files; ``findings`` and ``report`` too when the reply lists them as artifacts
        but does not carry them (their JSON and Markdown are then put into ``result``)."""
        files = {k: Path(v) for k, v in (result.pop("_files", None) or {}).items()}
        artifacts = get(result, "artifacts", {})
        inline = [n for n in TEXT_ARTIFACTS if n in artifacts and get(result, n) is None]
        names = [n for n in self.artifacts if n in artifacts] + inline
        if names:
            files.update(self.client.download_artifacts(result, self.out_dir, names))
        if "findings" in inline:
            try:
                result["findings"] = json.loads(files["findings"].read_text(encoding="utf-8"))
            except ValueError as e:
                raise ProtocolError(f"the findings artifact is not JSON: {e}") from e
        if "report" in inline:
            result["report"] = files["report"].read_text(encoding="utf-8")
        return files


def upload_image(client: XAIClient, path: str | os.PathLike, image_id: str, reuse_existing: bool) -> str:
    """Upload ``path`` as ``image_id``; with ``reuse_existing``, a server that already holds that id
    (409) is fine: content-derived ids name the same voxels."""
    try:
        return client.upload_image(path, image_id)
    except ServerRefusedError as e:
        if reuse_existing and e.status == 409:
            return image_id
        raise


class BackgroundCall:
    """One callable on a daemon thread (connect, label upload): the GUI polls :attr:`done` from its timer
    and then reads :attr:`value` or :attr:`error`, so a slow or hung server never freezes Slicer."""

    def __init__(self, fn: Callable[[], Any], what: str = "request"):
        self.fn = fn
        self.what = what
        self.value: Any = None
        self.error: str | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> BackgroundCall:
        self._thread = threading.Thread(target=self._run, name=f"xai-{self.what}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.value = self.fn()
        except XAIClientError as e:
            self.error = str(e)
        except Exception as e:  # shown to the user rather than lost in a thread
            log.exception("%s failed", self.what)
            self.error = f"{self.what} failed: {type(e).__name__}: {e}"
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def join(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

"""Non-blocking explanation jobs (``POST /xai/explain/{task}``, ``GET``/``DELETE /xai/jobs/{id}``).

A job is one MONAI Label inference run on the app's single model worker thread, so jobs and
``/infer`` calls share one queue and never use the model at the same time (CAM hooks on a shared
network must not interleave). The event loop only creates and reads :class:`Job` records.

Cancelling a queued job drops it; a running job stops at its next progress report (between
pipeline stages), since a torch call cannot be interrupted from another thread.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

from .errors import Conflict, JobCancelled, describe_error

log = logging.getLogger("xai.jobs")

# Request keys the infer tasks read besides the user's parameters.
PROGRESS_KEY = "xai_progress"
IMAGE_ID_KEY = "xai_image_id"
WANTS_FILE_KEY = "xai_wants_file"  # False: the reply is JSON only, skip the response copy of the file

InferFn = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class Job:
    id: str
    task: str
    image: str
    params: dict[str, Any]
    status: str = "queued"  # queued | running | done | failed | cancelled
    stage: str = "queued"
    progress: float = 0.0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    future: Future | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed", "cancelled")

    def to_json(self) -> dict[str, Any]:
        return {"job_id": self.id, "task": self.task, "image": self.image, "status": self.status,
                "stage": self.stage, "progress": round(self.progress, 3), "cancel_requested": self.cancel_requested,
                "result": self.result, "error": self.error, "created_at": self.created_at,
                "started_at": self.started_at, "finished_at": self.finished_at}


class JobManager:
    def __init__(self, executor: Executor, keep: int = 500):
        self.executor = executor
        self.keep = max(1, keep)
        self.infer: InferFn | None = None  # set by the app (``MONAILabelApp.infer``)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, task: str, image: str, params: dict[str, Any]) -> Job:
        job = Job(id=uuid.uuid4().hex, task=task, image=image, params=dict(params))
        with self._lock:
            self._jobs[job.id] = job
            self._forget_old()
        job.future = self.executor.submit(self._run, job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.finished:
                raise Conflict(f"job {job_id} already finished ({job.status}); nothing to cancel")
            job.cancel_requested = True
            if job.status == "queued" and job.future is not None and job.future.cancel():
                self._finish(job, "cancelled")
            return job

    # -- worker side ----------------------------------------------------------------------------

    def _run(self, job: Job) -> None:
        with self._lock:
            if job.cancel_requested:  # cancelled between submit and start
                self._finish(job, "cancelled")
                return
            job.status, job.stage, job.started_at = "running", "starting", time.time()

        def progress(stage: str, fraction: float) -> None:
            if job.cancel_requested:
                raise JobCancelled(job.id)
            job.stage, job.progress = stage, max(job.progress, float(fraction))

        request = {**job.params, "model": job.task, "image": job.image, PROGRESS_KEY: progress,
                   IMAGE_ID_KEY: job.image, WANTS_FILE_KEY: False}
        try:
            if self.infer is None:
                raise RuntimeError("job manager is not bound to an app")
            out = self.infer(request)
            with self._lock:
                job.result = out.get("params")
                self._finish(job, "done")
        except JobCancelled:
            with self._lock:
                self._finish(job, "cancelled")
        except Exception as exc:  # a job failure is reported in the job, never raised
            status, detail = describe_error(exc)
            error_id = uuid.uuid4().hex[:12]
            if status >= 500:
                log.error("error_id=%s job %s (%s on %s) failed", error_id, job.id, job.task, job.image,
                          exc_info=exc)
            else:
                log.warning("error_id=%s job %s (%s on %s) rejected: %s", error_id, job.id, job.task,
                            job.image, detail)
            with self._lock:
                job.error = {"status_code": status, "detail": detail, "error_id": error_id}
                self._finish(job, "failed")

    def _finish(self, job: Job, status: str) -> None:
        job.status, job.finished_at = status, time.time()
        job.stage = status
        if status == "done":
            job.progress = 1.0

    def _forget_old(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.finished]
        for jid in finished[:max(0, len(self._jobs) - self.keep)]:
            del self._jobs[jid]

"""Routes of the learning loop (issue 18): training status, published versions, live switch and
rollback, and the active-learning "next sample".

* ``GET /train/``: MONAI Label's status of the newest train task, plus the fine-tune's own progress,
  validation curve and outcome (``<datastore>/.xai/train/latest.json``, written by the run). Before
  any run it answers an empty status (``"status": "NONE"``) instead of MONAI Label's 404;
  ``check_if_running=true`` keeps MONAI Label's meaning (404 when nothing runs), which its Slicer
  plugin relies on.
* ``GET /xai/models/{model}/versions``: published versions, the active one and its lineage.
* ``POST /xai/models/{model}/activate`` (``{"version": ...}``) and ``POST /xai/models/{model}/rollback``:
  switch the served weights without a restart. A request already running finishes on the weights it
  started with; the next one loads the new weights (``lib.models.ModelCache``).
* ``POST /activelearning/{strategy}``: MONAI Label's route (its stock Slicer plugin's "Next sample"),
  run on the model worker instead of the event loop, since the uncertainty strategy runs the model.

Auth: the token middleware guards every route, these included (``monai_app/asgi.py``).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from monailabel.endpoints.activelearning import sample as stock_sample
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.async_tasks.task import AsyncTask
from starlette.concurrency import run_in_threadpool

from .errors import ApiError
from .uploads import read_params

router = APIRouter()

# What a run's own state means for MONAI Label's status word when no train process is known (the
# server restarted, or the run was inline with run_sync=true).
_STATE_STATUS = {"published": "DONE", "not_better": "DONE", "failed": "ERROR", "running": "INTERRUPTED"}
EMPTY_STATUS: dict[str, Any] = {"status": "NONE", "id": None, "start_ts": None, "end_ts": None, "details": [],
                                "progress": 0.0, "stage": None, "outcome": None, "curve": [], "validation": None,
                                "version": None, "message": None, "run": None}


def _app():
    return app_instance()


def _run_doc() -> dict[str, Any] | None:
    """The newest fine-tune run's own status doc (the trainer knows where it lives)."""
    trainer = _app()._trainers.get("seg_head_finetune")
    last_run = getattr(trainer, "last_run", None)
    return last_run() if callable(last_run) else None


def _ts(value: str | None) -> float | None:
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S").timestamp() if value else None
    except ValueError:
        return None


def merged_status(task: dict[str, Any] | None, run: dict[str, Any] | None) -> dict[str, Any]:
    """MONAI Label's task record (or none) with the fine-tune's own progress doc, when it belongs to
    that task: a doc older than the task's start is an earlier run's (the new one is still starting)."""
    out = dict(EMPTY_STATUS)
    if task is not None:
        out.update({k: task.get(k) for k in ("id", "status", "start_ts", "end_ts")})
        out["details"] = list(task.get("details") or [])
        start = _ts(task.get("start_ts"))
        # start_ts has whole seconds; the run stamps its start after the process is up.
        if run is not None and start is not None and float(run.get("started_at") or 0) < start - 1:
            run = None
        if run is not None and task.get("status") == "SUBMITTED":
            out["status"] = "RUNNING"
    elif run is not None:
        out["status"] = _STATE_STATUS.get(str(run.get("state")), "DONE")
    if run is not None:
        state = run.get("state")
        out.update(progress=run.get("progress", 0.0), stage=run.get("stage"), curve=run.get("curve") or [],
                   validation=run.get("validation"), version=run.get("version"), message=run.get("message"),
                   outcome=state if state in ("published", "not_better", "failed") else None, run=run)
    return out


@router.get("/train/", summary="Status of the newest train task: progress, validation curve, outcome")
async def train_status(all: bool = False, check_if_running: bool = False):
    res, detail = AsyncTask.status("train", all, check_if_running)
    if check_if_running and res is None:
        raise ApiError(404, detail or "no train task is running")
    run = await run_in_threadpool(_run_doc)
    if all:
        tasks = res or []
        return [merged_status(t, run if i == len(tasks) - 1 else None) for i, t in enumerate(tasks)]
    return merged_status(res, run)


# -- versions -----------------------------------------------------------------------------------------

def _cache(model: str):
    try:
        return _app().xai.cache(model)
    except KeyError as e:
        raise ApiError(404, str(e.args[0])) from None


def versions_summary(model: str) -> dict[str, Any]:
    cache = _cache(model)
    return {"model": model, **cache.versions().summary(cache.own_card())}


@router.get("/xai/models/{model}/versions", summary="Published versions, the active one, lineage")
async def list_versions(model: str):
    return await run_in_threadpool(versions_summary, model)


def _activate(model: str, version: str | None) -> dict[str, Any]:
    cache = _cache(model)
    store = cache.versions()
    own = cache.own_card()
    target = None if version in (None, "", "base", own.get("version")) else version
    before = store.summary(own)["active_version"]
    try:
        if target is not None:
            # Load (and hash-check) it before switching: a version that cannot serve is refused
            # while the current one keeps serving.
            store.load(target, device="cpu")
        store.activate(target)
    except ValueError as e:  # lib.versions.VersionError: not published, bad name, failed hash check
        raise ApiError(404, str(e)) from None
    return {**versions_summary(model), "previous_version": before}


@router.post("/xai/models/{model}/activate", summary="Serve a published version (no restart)")
async def activate(model: str, request: Request, version: str | None = None):
    params, _ = await read_params(request, _app().xai.settings)
    chosen = params.get("version", version)
    if chosen is not None and not isinstance(chosen, str):
        raise ApiError(422, f"version must be a string such as '1.3.0+ft2' (or 'base'), not {json.dumps(chosen)}")
    if chosen is None:
        raise ApiError(422, "no version given: send {\"version\": \"<version>\"} ('base' for the model's own weights)")
    return await run_in_threadpool(_activate, model, chosen)


def _rollback(model: str) -> dict[str, Any]:
    cache = _cache(model)
    before = cache.versions().summary(cache.own_card())["active_version"]
    try:
        cache.versions().rollback()
    except ValueError as e:  # lib.versions.VersionError: nothing to roll back to
        raise ApiError(409, str(e)) from None
    return {**versions_summary(model), "previous_version": before}


@router.post("/xai/models/{model}/rollback", summary="Serve the version active before the last switch")
async def rollback(model: str):
    return await run_in_threadpool(_rollback, model)


# -- active learning ----------------------------------------------------------------------------------

@router.post("/activelearning/{strategy}", summary="Next study to label (MONAI Label API), off the event loop")
async def next_sample(strategy: str, request: Request):
    app = _app()
    if strategy not in app._strategies:
        raise ApiError(404, f"unknown strategy {strategy!r}; available: {sorted(app._strategies)}")
    params, _ = await read_params(request, app.xai.settings)
    t0 = time.perf_counter()
    result = await asyncio.wrap_future(app.xai.submit(stock_sample, strategy, params, None))
    if result:
        result.setdefault("latency_s", round(time.perf_counter() - t0, 3))
    return result

"""Routes the wrapper adds to, or puts in front of, MONAI Label's FastAPI app.

In front (same paths as MONAI Label, so its clients work unchanged):

* ``POST /infer/{task}``: MONAI Label's handler is ``async`` yet runs the model inline, which stops
  the whole server for the length of an inference. Here the inference runs on the app's model
  worker thread and the event loop only awaits it; the reply format is MONAI Label's own.
* ``PUT /datastore/image`` (and the deprecated ``PUT /datastore/``), ``PUT /datastore/label``: the
  upload is checked with ``xai_core.io`` first; images never replace an existing id; labels keep
  their earlier versions and get provenance.
* ``GET /datastore/label``: the current label, its bytes verified against the sha256 stored with it
  (a mismatch is a 500 naming the label, never other bytes).
* ``POST /train/{trainer}``: the same call, off the event loop (``run_sync=true`` trains inline), after
  the trainer's ``check_request`` (no labels with the tag, bad values: 4xx at once).

Added: ``/xai/explain/{task}``, ``/xai/jobs[/{id}]``, ``/xai/results/{id}/{file}`` and
``/xai/labels/{image}/{tag}/versions[/{file}]`` (see docs/http_api.md).

The app is reached only through ``app_instance()`` (``.xai`` is its runtime), never by import.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from monailabel.endpoints.infer import send_response
from monailabel.endpoints.train import run_model
from monailabel.interfaces.utils.app import app_instance
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from .errors import ApiError
from .guards import id_problem
from .uploads import check_image, check_label, read_params, save_upload, sha256_of, storable_image

router = APIRouter()

# Keys a client may not set through params: the route decides them.
RESERVED_PARAMS = {"model", "image", "save_label", "label_tag", "xai_progress", "xai_image_id", "xai_wants_file",
                   "file", "label"}
OUTPUTS = {None, "", "all", "json", "image"}


# -- helpers ------------------------------------------------------------------------------------------

def _app():
    return app_instance()


def _task(app, name: str):
    # MONAI Label keeps its tasks in _infers; its info() lists only the valid ones, the same as here.
    task = app._infers.get(name)
    if task is None:
        raise ApiError(404, f"unknown task {name!r}; available: {sorted(app._infers)}")
    if not task.is_valid():
        model = getattr(task, "model_name", app.xai.options.model)
        raise ApiError(503, f"task {name!r} cannot run: model {model!r} has no weights yet")
    return task


def _image_uri(app, image_id: str) -> str:
    if not image_id:
        raise ApiError(400, "no image given: pass ?image=<datastore id>")
    uri = app.datastore().get_image_uri(image_id)
    if not uri or not os.path.exists(uri):
        raise ApiError(404, f"unknown image id {image_id!r}: not in the datastore "
                            "(GET /datastore/?output=all lists the ids)")
    return uri


def _clean_params(task, params: dict[str, Any]) -> dict[str, Any]:
    clean = {k: v for k, v in params.items() if k not in RESERVED_PARAMS}
    check = getattr(task, "check_params", None)
    if check is not None:
        check(clean)
    return clean


def _check_path_id(value: str, what: str) -> None:
    problem = id_problem(value, what)
    if problem:
        raise ApiError(400, problem)


def _upload_dir(app) -> Path:
    return app.xai.options.state_dir / "uploads"


def _form_file(form, field: str) -> UploadFile:
    upload = form.get(field) if form is not None else None
    if not isinstance(upload, UploadFile):
        raise ApiError(422, f"multipart form field {field!r} with the file is missing")
    return upload


async def _in_worker(app, fn, *args):
    """Run ``fn`` on the model worker; the event loop stays free meanwhile."""
    return await asyncio.wrap_future(app.xai.submit(fn, *args))


def _remove(path: Path | str) -> None:
    Path(path).unlink(missing_ok=True)


# -- inference ----------------------------------------------------------------------------------------

@router.post("/infer/{model}", summary="Run a task on a datastore image or an uploaded volume (MONAI Label API)")
async def infer(model: str, request: Request, background_tasks: BackgroundTasks, image: str = "",
                session_id: str = "", output: str | None = None):
    app = _app()
    task = _task(app, model)
    if output not in OUTPUTS:
        raise ApiError(400, f"output must be one of all, json, image; got {output!r}")
    params, form = await read_params(request, _app().xai.settings)
    req = _clean_params(task, params)
    upload = form.get("file") if form is not None else None
    path: Path | None = None
    if isinstance(upload, UploadFile):
        path = await run_in_threadpool(save_upload, upload, _upload_dir(app))
        try:
            await run_in_threadpool(check_image, path, upload.filename, app.xai.settings)
        except BaseException:
            _remove(path)  # a refused upload is deleted at once (a BackgroundTask runs only after a reply)
            raise
        req.update(image=str(path), xai_image_id=None)
    elif session_id:
        session = app.sessions().get_session(session_id) if app.sessions() else None
        if session is None:
            raise ApiError(404, f"unknown session id {session_id!r}")
        req.update(image=session.image, xai_image_id=None)
    else:
        _image_uri(app, image)
        req.update(image=image, xai_image_id=image)
    req.update(model=model, xai_wants_file=output != "json")
    future = app.xai.submit(app.infer, req)
    if path is not None:
        # Deleted when the model is done with it, whatever happens to the request (an error, a
        # client that hangs up while the worker still reads the file).
        future.add_done_callback(lambda _f, p=path: _remove(p))
    result = await asyncio.wrap_future(future)
    if output == "image" and not (result.get("file") or result.get("label")):
        # A JSON-only task (classify, vqa with method none): MONAI Label's send_response would fail on the
        # missing file; the reply is the JSON, whatever output says (docs/http_api.md).
        return result.get("params")
    return send_response(app.datastore(), result, output or None, background_tasks)


@router.post("/xai/explain/{task}", status_code=202, summary="Queue a task; poll /xai/jobs/{job_id}")
async def submit_job(task: str, request: Request, image: str = ""):
    app = _app()
    t = _task(app, task)
    _image_uri(app, image)
    params, _ = await read_params(request, _app().xai.settings)
    job = app.xai.jobs.submit(task, image, _clean_params(t, params))
    return JSONResponse(status_code=202, content={"job_id": job.id, "status": job.status, "task": task,
                                                  "image": image, "url": f"/xai/jobs/{job.id}"})


@router.get("/xai/jobs", summary="All remembered jobs (without results)")
async def list_jobs():
    return [{k: v for k, v in j.to_json().items() if k != "result"} for j in _app().xai.jobs.list()]


@router.get("/xai/jobs/{job_id}", summary="Status, progress and result of a job")
async def get_job(job_id: str):
    job = _app().xai.jobs.get(job_id)
    if job is None:
        raise ApiError(404, f"unknown job id {job_id!r}")
    return job.to_json()


@router.delete("/xai/jobs/{job_id}", summary="Cancel a queued or running job")
async def cancel_job(job_id: str):
    job = _app().xai.jobs.cancel(job_id)
    if job is None:
        raise ApiError(404, f"unknown job id {job_id!r}")
    return job.to_json()


@router.get("/xai/results/{result_id}/{name}", summary="Download one artifact of a result")
async def get_result_file(result_id: str, name: str):
    results = _app().xai.results
    # A drawn artifact (a vqa overlay) is drawn on its first download, off the event loop.
    try:
        path = results.path(result_id, name) or await run_in_threadpool(results.draw, result_id, name)
    except LookupError as e:  # lib.results.Undrawable: a damaged source, nothing the client did
        raise ApiError(404, str(e)) from e
    if path is None:
        raise ApiError(404, f"no artifact {name!r} for result {result_id!r} (results are pruned when old)")
    return FileResponse(path, media_type=_media_type(name), filename=f"{result_id[:8]}_{name}")


def _media_type(name: str) -> str:
    for suffix, media in ((".json", "application/json"), (".md", "text/markdown; charset=utf-8"),
                          (".dcm", "application/dicom"), (".png", "image/png")):
        if name.endswith(suffix):
            return media
    return "application/gzip"


@router.get("/xai/schema", summary="JSON Schema of every result the server returns (docs/result_schema.json)")
async def result_schema():
    from xai_core.schema import result_json_schema

    return result_json_schema()


# -- datastore ----------------------------------------------------------------------------------------

@router.put("/datastore/image", summary="Upload a new volume (checked; never replaces an existing id)")
@router.put("/datastore/", include_in_schema=False)
async def put_image(request: Request, image: str | None = None):
    app = _app()
    params, form = await read_params(request, _app().xai.settings)
    upload = _form_file(form, "file")
    image_id = image or Path(upload.filename or "").name.split(".")[0]
    _check_path_id(image_id, "image")
    if app.datastore().get_image_uri(image_id):
        raise ApiError(409, f"image {image_id!r} already exists; upload under another id (nothing is overwritten)")
    path = await run_in_threadpool(save_upload, upload, _upload_dir(app))
    try:
        stored = await run_in_threadpool(storable_image, path, upload.filename, app.xai.settings)
        info = {**params, "original_name": os.path.basename(upload.filename or ""),
                "sha256": await run_in_threadpool(sha256_of, stored),
                "uploaded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        new_id = await run_in_threadpool(app.datastore().add_image, image_id, str(stored), info)
    finally:
        _remove(path)
        _remove(path.with_name(path.name.split(".")[0] + ".nii.gz"))
    return {"image": new_id}


@router.put("/datastore/label", summary="Save a label with provenance; an earlier one becomes a version")
async def put_label(request: Request, image: str, tag: str = "final"):
    app = _app()
    ds = app.datastore()
    tag = tag or "final"
    image_uri = _image_uri(app, image)
    params, form = await read_params(request, _app().xai.settings)
    upload = _form_file(form, "label")
    # Provenance is stamped by the server from the result the client names; the client's values for
    # its keys are dropped. The token identifies no person, so there is no user name to record.
    info = app.xai.label_provenance(params, image, user=None, auth=bool(app.xai.options.token))
    path = await run_in_threadpool(save_upload, upload, _upload_dir(app))
    try:
        await run_in_threadpool(check_label, path, upload.filename, image_uri, app.xai.settings)
        # The datastore hashes the bytes it stores and numbers the version under its lock: the reply
        # names the version this request stored, even with other clients saving the same label.
        saved = await run_in_threadpool(ds.store_label, image, str(path), tag, info)
    finally:
        _remove(path)
    res = app.on_save_label(image, saved.label_id) or {}
    return {**res, "image": image, "label": saved.label_id, "tag": tag, "version": saved.version,
            "sha256": saved.sha256}


@router.get("/datastore/label", summary="Download the current label (verified against its sha256)")
async def get_label(label: str = "", tag: str = "final"):
    if not label:
        raise ApiError(400, "no label given: pass ?label=<image id>&tag=<tag>")
    _check_path_id(label, "label")
    tag = tag or "final"
    _check_path_id(tag, "tag")
    data, name, _ = await run_in_threadpool(_app().datastore().read_label, label, tag)
    return Response(content=data, media_type="application/gzip" if name.endswith(".gz") else "application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/xai/labels/{image}/{tag}/seg", summary="The current label as DICOM SEG (studies from a DICOM series)")
async def label_seg(image: str, tag: str, background_tasks: BackgroundTasks):
    _check_path_id(image, "image")
    _check_path_id(tag, "tag")
    app = _app()
    data, name, info = await run_in_threadpool(app.datastore().read_label, image, tag)
    path = await _in_worker(app, app.xai.label_as_seg, image, data, name, info)
    background_tasks.add_task(shutil.rmtree, path.parent, True)
    return FileResponse(path, media_type="application/dicom", filename=f"{image}_{tag}.seg.dcm",
                        background=background_tasks)


@router.get("/xai/labels/{image}/{tag}/versions", summary="Current and earlier versions of a label")
async def label_versions(image: str, tag: str):
    _check_path_id(image, "image")
    _check_path_id(tag, "tag")
    ds = _app().datastore()
    versions = await run_in_threadpool(ds.label_versions, image, tag)
    current_info = await run_in_threadpool(ds.get_label_info, image, tag)
    if not versions and not current_info:
        raise ApiError(404, f"no label with tag {tag!r} for image {image!r}")
    current = ({"version": current_info.get("version", 1), "info": current_info,
                "url": f"/datastore/label?label={image}&tag={tag}"} if current_info else None)
    return {"image": image, "tag": tag, "current": current,
            "versions": [{**v, "url": f"/xai/labels/{image}/{tag}/versions/{v['file']}"} for v in versions]}


@router.get("/xai/labels/{image}/{tag}/versions/{file}", summary="Download an earlier version of a label")
async def label_version_file(image: str, tag: str, file: str):
    for value, what in ((image, "image"), (tag, "tag"), (file, "file")):
        _check_path_id(value, what)
    data, _ = await run_in_threadpool(_app().datastore().read_label_version, image, tag, file)
    return Response(content=data, media_type="application/gzip",
                    headers={"Content-Disposition": f'attachment; filename="{image}_{tag}_{file}"'})


# -- training -----------------------------------------------------------------------------------------

@router.post("/train/{model}", summary="Start a train task (MONAI Label API), off the event loop")
async def train(model: str, request: Request, run_sync: bool = False, enqueue: bool = False):
    app = _app()
    if model not in app._trainers:
        raise ApiError(404, f"unknown trainer {model!r}; available: {sorted(app._trainers)}")
    params, _ = await read_params(request, _app().xai.settings)
    check = getattr(app._trainers[model], "check_request", None)
    if check is not None:
        # Refuse what would only fail later in the background process (no labels, bad values): 4xx now.
        await run_in_threadpool(check, params, app.datastore())
    return await run_in_threadpool(run_model, model, params or None, run_sync, enqueue)

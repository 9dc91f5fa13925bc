"""Request bodies: JSON parameters and uploaded volumes, checked before anything is stored.

Parameters come as MONAI Label clients send them (multipart form field ``params`` holding JSON)
or as a plain JSON body (``Content-Type: application/json``). They are read up to
``Settings.max_params_kb`` only (413 beyond) and may nest ``Settings.max_params_depth`` deep (422
beyond), so a parameter body can neither fill memory nor exhaust the parser's recursion.

Uploads are written to a private temporary file and read with
``xai_core.io.read_untrusted_image`` before the datastore sees them: it refuses corrupt, truncated,
2-D, 4-D, non-finite, tiny and oversized volumes, headers that name other files, non-image DICOM
objects, bad spacing, compression bombs and volumes too costly to decode, each with a sentence
naming the problem. Status codes: 413 for sizes (too many voxels, too much memory to decode, a
compression bomb), 429 when concurrent uploads hold the decode budget, 422 for everything else.
A check that fails deletes the uploaded file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import SimpleITK as sitk
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from xai_core.io import (
    BudgetBusyError,
    DecompressionBombError,
    Image,
    ImageError,
    TooLargeError,
    read_untrusted_image,
    sniff_format,
    write_image,
)
from xai_core.settings import Settings

from .errors import ApiError

# Suffixes kept from the client's file name (they decide the reader); anything else is read as NIfTI.
KNOWN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm")
# What the datastore stores as uploaded; other formats are converted to NIfTI (geometry kept).
STORED_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
# Content format (xai_core.io.sniff_format) -> names under which such content is stored as sent.
STORED_AS_SENT = {"nifti": (".nii.gz", ".nii"), "nrrd": (".nrrd",)}


# Forms the app takes hold a 'params' field and one file ('file' or 'label'); a few spare.
MAX_FORM_FIELDS = 16
MAX_FORM_FILES = 2


async def read_params(request: Request, settings: Settings | None = None) -> tuple[dict[str, Any], FormData | None]:
    """``(params, form)``: the JSON parameters and, for multipart requests, the form (with files).

    413 when the JSON text is larger than ``max_params_kb``, 422 when it is not a JSON object or
    nests deeper than ``max_params_depth``. Uploaded files are not limited here (the body limit is).
    """
    cfg = settings or Settings()
    limit = int(cfg.max_params_kb) * 1024
    ctype = request.headers.get("content-type", "")
    form: FormData | None = None
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS, max_part_size=limit)
        except HTTPException as e:
            # Starlette answers 400 for every form limit; a field over the size limit is a 413.
            if "maximum size" in str(e.detail):
                raise ApiError(413, f"form field is larger than the {cfg.max_params_kb} KiB limit on "
                                    "parameters") from None
            raise ApiError(e.status_code, f"malformed form: {e.detail}") from None
        raw = form.get("params")
        if raw is not None and not isinstance(raw, str):
            raise ApiError(422, "form field 'params' must be JSON text, not a file")
    else:
        body = await _read_capped(request, limit, cfg.max_params_kb)
        if ctype.startswith("application/x-www-form-urlencoded"):
            form = FormData(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
            raw = form.get("params")
        else:
            raw = body.decode("utf-8", errors="replace") if body.strip() else None
    if raw is None or not raw.strip():
        return {}, form
    if len(raw) > limit:
        raise ApiError(413, f"params are larger than the {cfg.max_params_kb} KiB limit")
    try:
        params = json.loads(raw)
    except RecursionError:
        raise ApiError(422, f"params nest arrays/objects too deeply (at most {cfg.max_params_depth} levels)") \
            from None
    except ValueError as e:
        raise ApiError(422, f"params are not valid JSON: {e}") from None
    if not isinstance(params, dict):
        raise ApiError(422, f"params must be a JSON object, got {type(params).__name__}")
    depth = json_depth(params)
    if depth > cfg.max_params_depth:
        raise ApiError(422, f"params nest arrays/objects {depth} levels deep; at most {cfg.max_params_depth} "
                            "are accepted")
    return params, form


async def _read_capped(request: Request, limit: int, limit_kb: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (never buffered further)."""
    too_large = (f"parameter body is larger than the {limit_kb} KiB limit on parameters (files go in a multipart "
                 "form, within the upload limit)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, too_large)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, too_large)
    return bytes(body)


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d + 1)
            stack.extend((item, d + 1) for item in v)
    return deepest


def suffix_of(name: str | None) -> str:
    low = (name or "").lower()
    for s in KNOWN_SUFFIXES:
        if low.endswith(s):
            return s
    return ".nii.gz"


def save_upload(upload: UploadFile, folder: Path) -> Path:
    """Copy an uploaded file to a new private file in ``folder`` (suffix from the client's name).

    The suffix only helps a person reading the folder: the reader tells the format from the content.
    A copy that fails leaves no partial file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"upload-{uuid.uuid4().hex}{suffix_of(upload.filename)}"
    upload.file.seek(0)
    try:
        with open(path, "wb") as out:
            shutil.copyfileobj(upload.file, out, 1 << 20)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def converted_path(path: Path) -> Path:
    """Where :func:`storable_image` writes an upload it converts to NIfTI."""
    return path.with_name(path.name.split(".")[0] + ".nii.gz")


def discard(path: Path) -> None:
    """Delete an upload and the NIfTI it may have been converted to."""
    path.unlink(missing_ok=True)
    converted_path(path).unlink(missing_ok=True)


@contextlib.contextmanager
def discarded_on_error(path: Path) -> Iterator[None]:
    """Delete the upload at ``path`` when the block raises (a refused upload is never kept)."""
    try:
        yield
    except BaseException:
        discard(path)
        raise


def sweep_uploads(folder: Path, max_age_s: float = 3600.0) -> list[Path]:
    """Delete uploads older than ``max_age_s`` from ``folder`` (left by a crash or a failed request);
    returns what was deleted. Meant for server start-up."""
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.glob("upload-*"):
        try:
            if p.is_file() and now - p.stat().st_mtime > max_age_s:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:
            pass  # a concurrent request removed it
    return removed


def _shown(upload_name: str | None) -> str:
    return f"uploaded file {os.path.basename(upload_name or 'upload')!r}"


def _refusal(shown: str, e: ImageError) -> ApiError:
    """The HTTP error for an upload that ``xai_core.io`` refused."""
    if isinstance(e, TooLargeError | DecompressionBombError):
        return ApiError(413, f"{shown} {e.problem}")
    if isinstance(e, BudgetBusyError):
        return ApiError(429, f"{shown} {e.problem}", headers={"Retry-After": "5"})
    return ApiError(422, f"{shown} {e.problem}")


def check_image(path: Path, upload_name: str | None, settings: Settings | None = None) -> Image:
    """Read an uploaded volume as untrusted input (413/429/422 as in the module docstring); a refused
    upload is deleted."""
    with discarded_on_error(path):
        try:
            return read_untrusted_image(path, settings=settings)
        except ImageError as e:
            raise _refusal(_shown(upload_name), e) from None


def storable_image(path: Path, upload_name: str | None, settings: Settings | None = None) -> Path:
    """The checked upload as a file the datastore lists (.nii.gz/.nii/.nrrd; others become NIfTI).

    Uploads are stored only in formats that cannot name another file (a checked MetaImage or DICOM
    is converted); a refused upload is deleted.
    """
    image = check_image(path, upload_name, settings)
    with discarded_on_error(path):
        # Kept as sent only where the content is the format its name says (a MetaImage named .nrrd is not).
        if path.name.endswith(STORED_AS_SENT.get(sniff_format(path), ())):
            return path
        converted = converted_path(path)
        write_image(image, converted)  # atomic: may replace the upload itself (NRRD content named .nii.gz)
        if converted != path:
            path.unlink(missing_ok=True)
    return converted


def check_label(path: Path, upload_name: str | None, image_path: str, settings: Settings | None = None) -> None:
    """A label must be a readable 3-D volume of non-negative integers on the image's grid; it is read
    as untrusted input (all-zero allowed: "no lesion"). A refused label is deleted."""
    shown = _shown(upload_name)
    with discarded_on_error(path):
        try:
            label = read_untrusted_image(path, dtype=None, allow_constant=True, settings=settings)
        except ImageError as e:
            raise _refusal(shown, e) from None
        image = _geometry_of(image_path)
        if label.size != image.size:
            raise ApiError(422, f"{shown}: label size {label.size} does not match the image's size {image.size}")
        if not image.same_geometry(label, tol=1e-3):
            raise ApiError(422, f"{shown}: label geometry (spacing {label.spacing}, origin {label.origin}) does not "
                                f"match the image's (spacing {image.spacing}, origin {image.origin}); "
                                "export the label on the image's grid")
        a = np.asarray(label.array)
        if np.issubdtype(a.dtype, np.floating) and (not np.isfinite(a).all() or not np.array_equal(a, np.round(a))):
            raise ApiError(422, f"{shown}: label values must be integers (class ids), found fractional or NaN values")
        if a.size and a.min() < 0:
            raise ApiError(422, f"{shown}: label values must be non-negative class ids, found {a.min()}")


def _geometry_of(path: str) -> Image:
    """An image's grid from its header only (the voxels are not needed to check a label's grid)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = tuple(int(s) for s in reader.GetSize())
    return Image(array=np.empty(size[::-1], dtype=np.uint8), spacing=tuple(reader.GetSpacing()),
                 origin=tuple(reader.GetOrigin()), direction=tuple(reader.GetDirection()))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

"""Request bodies: JSON parameters and uploaded volumes, checked before anything is stored.

Parameters come as MONAI Label clients send them (multipart form field ``params`` holding JSON)
or as a plain JSON body (``Content-Type: application/json``). Uploads are written to a private
temporary file and read with ``xai_core.io`` (which rejects corrupt, truncated, 2-D, 4-D,
non-finite and oversized volumes with a sentence naming the problem) before the datastore sees them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from xai_core.io import EmptyImageError, Image, ImageError, TooLargeError, read_image, write_image

from .errors import ApiError

# Suffixes kept from the client's file name (they decide the reader); anything else is read as NIfTI.
KNOWN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm")
# What the datastore stores as uploaded; other formats are converted to NIfTI (geometry kept).
STORED_SUFFIXES = (".nii.gz", ".nii", ".nrrd")


async def read_params(request: Request) -> tuple[dict[str, Any], FormData | None]:
    """``(params, form)``: the JSON parameters and, for multipart requests, the form (with files)."""
    ctype = request.headers.get("content-type", "")
    form: FormData | None = None
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        raw = form.get("params")
        if raw is not None and not isinstance(raw, str):
            raise ApiError(422, "form field 'params' must be JSON text, not a file")
    else:
        body = await request.body()
        raw = body.decode("utf-8", errors="replace") if body.strip() else None
    if raw is None or not raw.strip():
        return {}, form
    try:
        params = json.loads(raw)
    except ValueError as e:
        raise ApiError(422, f"params are not valid JSON: {e}") from None
    if not isinstance(params, dict):
        raise ApiError(422, f"params must be a JSON object, got {type(params).__name__}")
    return params, form


def suffix_of(name: str | None) -> str:
    low = (name or "").lower()
    for s in KNOWN_SUFFIXES:
        if low.endswith(s):
            return s
    return ".nii.gz"


def save_upload(upload: UploadFile, folder: Path) -> Path:
    """Copy an uploaded file to a new private file in ``folder`` (suffix from the client's name)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"upload-{uuid.uuid4().hex}{suffix_of(upload.filename)}"
    upload.file.seek(0)
    with open(path, "wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)
    return path


def _shown(upload_name: str | None) -> str:
    return f"uploaded file {os.path.basename(upload_name or 'upload')!r}"


def check_image(path: Path, upload_name: str | None) -> Image:
    """Read an uploaded volume (413 when too large, 422 for anything else wrong)."""
    try:
        return read_image(path)
    except TooLargeError as e:
        raise ApiError(413, f"{_shown(upload_name)} {e.problem}") from None
    except ImageError as e:
        raise ApiError(422, f"{_shown(upload_name)} {e.problem}") from None


def storable_image(path: Path, upload_name: str | None) -> Path:
    """The checked upload as a file the datastore lists (.nii.gz/.nii/.nrrd; others become NIfTI)."""
    image = check_image(path, upload_name)
    if path.name.endswith(STORED_SUFFIXES):
        return path
    converted = path.with_name(path.name.split(".")[0] + ".nii.gz")
    write_image(image, converted)
    path.unlink(missing_ok=True)
    return converted


def check_label(path: Path, upload_name: str | None, image_path: str) -> None:
    """A label must be a readable 3-D volume of non-negative integers on the image's grid."""
    shown = _shown(upload_name)
    try:
        label = read_image(path)
    except EmptyImageError:
        # All-zero is a valid label ("no lesion"); xai_core.io refuses constant *images* only.
        label = Image.from_sitk(sitk.ReadImage(str(path)))
    except TooLargeError as e:
        raise ApiError(413, f"{shown} {e.problem}") from None
    except ImageError as e:
        raise ApiError(422, f"{shown} {e.problem}") from None
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

"""Medical image I/O that keeps geometry: NIfTI, NRRD, MetaImage, DICOM series and DICOM files.

Conventions (the one place they are written down)
-------------------------------------------------
* Physical space is ITK's **LPS** (x grows to the patient's Left, y to Posterior, z to Superior),
  in millimetres. NIfTI's RAS affines are converted by SimpleITK on read and back on write.
* ``Image.array`` is a numpy array indexed ``[k, j, i]`` (slice, row, column), the order of
  ``SimpleITK.GetArrayFromImage`` and of Slicer's ``arrayFromVolume``.
* ``spacing``, ``origin`` and ``size`` are given in ``(i, j, k)`` order, as in ITK.
* ``direction`` is the 3 x 3 matrix whose *columns* are the physical directions of the i, j and k
  axes, stored row-major as 9 floats (ITK's ``GetDirection``).
* The physical point of voxel index ``(i, j, k)`` is ``origin + direction @ (spacing * (i, j, k))``.

Every reader validates what it returns; problems raise an :class:`ImageError` subclass whose
message names the file and the problem.

Untrusted files (anything a client uploads) are read with :func:`read_untrusted_image` (or
``read_image(..., untrusted=True)``), which adds the checks that keep a crafted file from reaching
other files, memory or CPU of the process: see the section "untrusted input" below.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import SimpleITK as sitk

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "Image",
    "ImageError",
    "UnreadableImageError",
    "DimensionError",
    "NonFiniteError",
    "EmptyImageError",
    "TooLargeError",
    "DetachedDataError",
    "NonImageDicomError",
    "GeometryError",
    "SpacingError",
    "TooSmallError",
    "DecompressionBombError",
    "DecodeBudgetError",
    "BudgetBusyError",
    "MemoryBudget",
    "decode_budget",
    "read_image",
    "read_untrusted_image",
    "sniff_format",
    "write_image",
    "validate",
]


class ImageError(ValueError):
    """An image could not be used. ``path`` names the file, ``problem`` says what is wrong."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = str(path) if path is not None else "<in-memory image>"
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable across worker processes despite the two-argument __init__
        return (type(self), (self.path, self.problem))


class UnreadableImageError(ImageError):
    """The file is missing, corrupt, truncated or not an image format we read."""


class DimensionError(ImageError):
    """The image is 2-D where 3-D is needed, 4-D, or has several components per voxel."""


class NonFiniteError(ImageError):
    """The image holds NaN or infinite voxels."""


class EmptyImageError(ImageError):
    """The image has no voxels, or every voxel has the same value."""


class TooLargeError(ImageError):
    """The image has more voxels than the configured limit."""


# Refusals of untrusted input (read_untrusted_image); each names one problem.

class DetachedDataError(ImageError):
    """The header takes its voxels from another file (MetaImage ``ElementDataFile`` other than
    ``LOCAL``, NRRD ``data file:``, an Analyze or NIfTI ``.hdr``/``.img`` pair): the reader would open
    a path that the file's author chose."""


class NonImageDicomError(ImageError):
    """A DICOM object that is not an image (segmentation, structured report, RT structure set, plan
    or dose, presentation state, key object selection, ...), or a DICOM file without its Part 10 header."""


class GeometryError(ImageError):
    """The header's geometry is unusable (non-finite origin or direction, singular direction)."""


class SpacingError(GeometryError):
    """A voxel spacing is non-finite, zero or negative (ITK would silently read it as 1 mm)."""


class TooSmallError(ImageError):
    """The volume has fewer voxels along an axis than the configured minimum."""


class DecompressionBombError(ImageError):
    """Compressed voxel data inflates to more than the header declares (trailing data, a "zip bomb")."""


class DecodeBudgetError(TooLargeError):
    """Decoding the declared voxels would need more memory than one upload may use."""


class BudgetBusyError(ImageError):
    """Other uploads hold the process-wide decode memory budget; the client should retry shortly."""


@dataclass(frozen=True)
class Image:
    """A 3-D (or 2-D) scalar volume together with its geometry.

    Attributes:
        array: voxel values, shape ``(K, J, I)`` for 3-D or ``(J, I)`` for 2-D (see module docstring).
        spacing: voxel size along i, j(, k) in mm.
        origin: physical LPS position of voxel (0, 0, 0) in mm.
        direction: row-major direction matrix, columns are the axis directions (9 or 4 floats).
        source: where the image came from (a path), for messages; never patient identifiers.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    source: str | None = field(default=None, compare=False)

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def size(self) -> tuple[int, ...]:
        """Size in ``(i, j, k)`` order."""
        return tuple(int(s) for s in self.array.shape[::-1])

    @property
    def direction_matrix(self) -> np.ndarray:
        d = self.ndim
        return np.asarray(self.direction, dtype=float).reshape(d, d)

    def affine(self) -> np.ndarray:
        """4 x 4 (or 3 x 3 in 2-D) matrix mapping homogeneous ``(i, j, k, 1)`` to LPS mm."""
        d = self.ndim
        a = np.eye(d + 1)
        a[:d, :d] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        a[:d, d] = self.origin
        return a

    def index_to_physical(self, ijk) -> np.ndarray:
        """LPS mm of continuous index/indices ``ijk`` (shape ``(..., d)`` in i, j, k order)."""
        ijk = np.asarray(ijk, dtype=float)
        a = self.affine()
        return ijk @ a[:-1, :-1].T + a[:-1, -1]

    def physical_to_index(self, xyz) -> np.ndarray:
        """Continuous ``(i, j, k)`` index of LPS mm point(s) ``xyz`` (shape ``(..., d)``)."""
        xyz = np.asarray(xyz, dtype=float)
        a = np.linalg.inv(self.affine())
        return xyz @ a[:-1, :-1].T + a[:-1, -1]

    def with_array(self, array: np.ndarray) -> Image:
        """A new image with ``array`` on this image's grid (shapes must match)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match image shape {self.array.shape}")
        return replace(self, array=array)

    def same_geometry(self, other: Image, tol: float = 1e-5) -> bool:
        """True when ``other`` has this image's size, spacing, origin and direction (to ``tol``)."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=tol, rtol=0)
            and np.allclose(self.origin, other.origin, atol=tol, rtol=0)
            and np.allclose(self.direction, other.direction, atol=tol, rtol=0)
        )

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with this geometry (bool becomes uint8 and float16 float32: ITK has neither)."""
        a = self.array
        if a.dtype == np.bool_ or a.dtype == np.float16:
            a = a.astype(np.uint8 if a.dtype == np.bool_ else np.float32)
        img = sitk.GetImageFromArray(np.ascontiguousarray(a))
        img.SetSpacing([float(s) for s in self.spacing])
        img.SetOrigin([float(o) for o in self.origin])
        img.SetDirection([float(d) for d in self.direction])
        return img

    def reference(self) -> sitk.Image:
        """An empty (uint8) SimpleITK image with this geometry, for resampling onto this grid."""
        ref = sitk.Image(list(self.size), sitk.sitkUInt8)
        ref.SetSpacing([float(s) for s in self.spacing])
        ref.SetOrigin([float(o) for o in self.origin])
        ref.SetDirection([float(d) for d in self.direction])
        return ref

    @classmethod
    def from_sitk(cls, img: sitk.Image, source: str | None = None) -> Image:
        return cls(
            array=sitk.GetArrayFromImage(img),
            spacing=tuple(img.GetSpacing()),
            origin=tuple(img.GetOrigin()),
            direction=tuple(img.GetDirection()),
            source=source,
        )


# --------------------------------------------------------------------------------------------- read

_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_GZIP_MAGIC = b"\x1f\x8b"


def _is_dicom_file(path: Path) -> bool:
    """True for a DICOM suffix or the "DICM" marker after the 128-byte preamble."""
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _series_files(folder: Path) -> list[str]:
    """Files of the largest DICOM series in ``folder``, in slice order.

    GDCM leaves out files it cannot parse without a word, so a series with a truncated slice would
    read as a shorter (or, with ITK's averaged spacing, a stretched) volume: any DICOM file in the
    folder that belongs to no series is reported instead.
    """
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise UnreadableImageError(folder, "folder holds no readable DICOM series")
    series = {s: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s)) for s in ids}
    listed = {os.path.realpath(f) for files in series.values() for f in files}
    unread = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.upper() != "DICOMDIR"
                    and os.path.realpath(p) not in listed and _is_dicom_file(p))
    if unread:
        shown = ", ".join(unread[:5]) + (", ..." if len(unread) > 5 else "")
        raise UnreadableImageError(folder, f"holds {len(unread)} DICOM file(s) that cannot be read "
                                           f"(truncated or corrupt): {shown}")
    return max(series.values(), key=len)  # the largest series wins


def _check_slice_positions(folder: Path, reader: sitk.ImageSeriesReader, img: sitk.Image) -> None:
    """Raise unless the series' slices are evenly spaced along the slice normal.

    ITK reads a series with a missing slice with a warning and the average spacing, which puts every
    slice after the gap in the wrong place.
    """
    n = img.GetDepth()
    if n < 2 or not all(reader.HasMetaDataKey(k, "0020|0032") for k in range(n)):
        return
    try:
        pos = np.array([[float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")] for k in range(n)])
    except ValueError:
        return
    normal = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    gaps = np.diff(pos @ normal)
    if gaps.min() <= 0 or gaps.max() - gaps.min() > max(1e-3, 0.01 * abs(gaps.mean())):
        raise UnreadableImageError(folder, f"its {n} slices are not evenly spaced (gaps from "
                                           f"{gaps.min():.4g} to {gaps.max():.4g} mm): a slice is missing, "
                                           "or the series holds more than one volume")


def _check_header(path: Path, size: tuple[int, ...], ncomp: int, require_3d: bool, max_voxels: int) -> None:
    dims = len(size)
    # A DICOM or NIfTI volume with a trailing unit dimension (e.g. 4-D with 1 time point) is still 3-D.
    eff = list(size)
    while len(eff) > 3 and eff[-1] == 1:
        eff.pop()
    if ncomp != 1:
        raise DimensionError(path, f"has {ncomp} components per voxel (colour or vector image); "
                                   "a scalar volume is needed")
    if len(eff) > 3:
        n_vol = int(np.prod(eff[3:], dtype=np.int64))
        raise DimensionError(path, f"is {dims}-D with size {tuple(size)} ({n_vol} volumes); "
                                   "a single 3-D volume is needed")
    if require_3d and (len(eff) < 3 or eff[2] == 1):
        raise DimensionError(path, f"is 2-D (size {tuple(size)}); a 3-D volume is needed")
    n = int(np.prod(size, dtype=np.int64))
    if n == 0:
        raise EmptyImageError(path, f"has no voxels (size {tuple(size)})")
    if n > max_voxels:
        raise TooLargeError(path, f"has {n} voxels (size {tuple(size)}), more than the limit of {max_voxels}")


# ------------------------------------------------------------------- is all the voxel data there?
# SimpleITK 2.5's NIfTI reader (niftilib) hides three problems: it zero-fills voxel data that ends
# early (a file cut in half reads as a plausible half-black volume), it replaces NaN and infinite
# floats by 0, and it reads a header that declares a zero size as size 1. So the header is parsed
# here too: a zero size is reported as such, and before ITK reads the voxels the bytes the header
# declares are compared with the bytes the file holds (for gzip by decompressing the stream, which
# also checks its CRC), NIfTI floats being counted for NaN/Inf in the same pass. NRRD and MetaImage
# get the length check so that every truncated file is reported in the same words.

_NRRD_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip"}
_META_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
                    "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8,
                    "MET_FLOAT": 4, "MET_DOUBLE": 8}


@dataclass(frozen=True)
class _Layout:
    """What a file's header says about its voxel data.

    ``encoding`` is "raw" (``nbytes`` bytes from ``offset``), "gzip" (a gzip stream from ``offset``
    that inflates to ``nbytes``) or "gzip-file" (the whole file is gzip; ``offset + nbytes`` bytes once
    inflated). ``nbytes`` is None where the size cannot be checked. ``float_dtype`` (NIfTI float
    data only) is the numpy dtype of the stored values, whose NaN/Inf the reader would hide.
    """

    sizes: tuple[int, ...]
    offset: int
    encoding: str
    nbytes: int | None
    float_dtype: str | None = None


def _nrrd_type_bytes(name: str) -> int | None:
    """Bytes per value of an NRRD ``type:`` (it has many spellings: "short", "int16_t", "unsigned char")."""
    t = name.strip().lower().replace("_t", "")
    words = set(t.split())
    if t in ("float", "double"):
        return 4 if t == "float" else 8
    if "char" in words or t in ("int8", "uint8", "uchar"):
        return 1
    if "short" in words or t in ("int16", "uint16", "ushort"):
        return 2
    if "long" in words or t in ("int64", "uint64", "longlong", "ulonglong"):
        return 8
    if "int" in words or t in ("int32", "uint32", "uint"):
        return 4
    return None


def _nifti_layout(head: bytes, path: Path, gz: bool) -> _Layout | None:
    """Layout of a one-file NIfTI-1/2 whose first bytes are ``head``; None if it is not one."""
    for e in "<>":  # the header's own size field tells its byte order
        hdr_size = struct.unpack(e + "i", head[:4])[0] if len(head) >= 4 else 0
        if hdr_size not in (348, 540):
            continue
        if len(head) < hdr_size:
            raise UnreadableImageError(path, f"is truncated: it ends inside its {hdr_size}-byte NIfTI header")
        if hdr_size == 348 and head[344:348] == b"n+1\0":
            dims = struct.unpack(e + "8h", head[40:56])
            datatype, bitpix = struct.unpack(e + "2h", head[70:74])
            offset = struct.unpack(e + "f", head[108:112])[0]
        elif hdr_size == 540 and head[4:8] == b"n+2\0":
            dims = struct.unpack(e + "8q", head[16:80])
            datatype, bitpix = struct.unpack(e + "2h", head[12:16])
            offset = struct.unpack(e + "q", head[168:176])[0]
        else:
            return None  # Analyze or a .hdr/.img pair: the data is elsewhere
        if not 1 <= dims[0] <= 7 or not np.isfinite(offset):
            return None
        sizes = tuple(int(d) for d in dims[1:dims[0] + 1])
        n = int(np.prod([max(s, 0) for s in sizes], dtype=np.int64))
        nbytes = n * bitpix // 8 if bitpix > 0 else None
        float_dtype = {16: e + "f4", 64: e + "f8"}.get(datatype)  # NIFTI_TYPE_FLOAT32 / FLOAT64
        return _Layout(sizes, int(offset), "gzip-file" if gz else "raw", nbytes, float_dtype)
    return None


def _header_lines(f: BinaryIO, limit: int):
    """The text lines of a NRRD or MetaImage header (bounded, so a garbage file cannot run away)."""
    for _ in range(limit):
        line = f.readline(65536)
        if not line:
            return
        yield line.decode("latin-1").rstrip("\r\n")


def _nrrd_layout(f: BinaryIO) -> _Layout | None:
    """Layout of a NRRD file (``f`` at its start)."""
    fields: dict[str, str] = {}
    for line in _header_lines(f, 4096):
        if line == "":  # a blank line ends the header; the data follows it
            break
        if not line.startswith("#") and ": " in line:
            key, _, value = line.partition(": ")
            fields[key.strip().lower()] = value.strip()
    else:
        if f.read(1):
            return None  # a header longer than we care to parse
        # Otherwise the file ends inside the header: the data that should follow is missing.
    if "sizes" not in fields:
        return None
    sizes = tuple(int(s) for s in fields["sizes"].split())
    encoding = _NRRD_ENCODINGS.get(fields.get("encoding", "").lower())
    per_value = _nrrd_type_bytes(fields.get("type", ""))
    if encoding is None or per_value is None or any(k in fields for k in (
            "data file", "datafile", "line skip", "byte skip")):
        # Detached, skipped or text data: too many variants to check; the reader checks those.
        return _Layout(sizes, f.tell(), "raw", None)
    return _Layout(sizes, f.tell(), encoding, int(np.prod(sizes, dtype=np.int64)) * per_value)


def _meta_layout(f: BinaryIO) -> _Layout | None:
    """Layout of a MetaImage file (``f`` at its start)."""
    fields: dict[str, str] = {}
    for line in _header_lines(f, 256):
        key, _, value = line.partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    if "DimSize" not in fields:
        return None
    sizes = tuple(int(s) for s in fields["DimSize"].split())
    if fields.get("ElementDataFile") != "LOCAL":
        return _Layout(sizes, f.tell(), "raw", None)
    if fields.get("CompressedData", "").lower() == "true":
        # zlib data: its compressed size is declared, the reader checks that the stream is whole.
        size = fields.get("CompressedDataSize")
        return _Layout(sizes, f.tell(), "raw", int(size) if size else None)
    per_value = _META_TYPE_BYTES.get(fields.get("ElementType", ""))
    if per_value is None:
        return _Layout(sizes, f.tell(), "raw", None)
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    return _Layout(sizes, f.tell(), "raw", int(np.prod(sizes, dtype=np.int64)) * per_value * channels)


def _gunzip_chunks(f: BinaryIO, path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    """Decompressed chunks of the gzip stream in ``f``; raises :class:`UnreadableImageError` if it is
    cut short or corrupt (bad data or CRC)."""
    try:
        with gzip.GzipFile(fileobj=f, mode="rb") as g:
            while chunk := g.read(size):
                yield chunk
    except EOFError as e:
        raise UnreadableImageError(path, f"is truncated: its gzip stream ends early ({e})") from e
    except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise UnreadableImageError(path, f"is corrupt: its gzip data cannot be decompressed ({e})") from e


def _file_layout(path: Path, meta: bool = False) -> _Layout | None:
    """Parse the header of a NIfTI (.nii, .nii.gz), NRRD or MetaImage (.mha, or ``meta``) file; None
    for others.

    Raises :class:`UnreadableImageError` for a file cut inside its header and
    :class:`EmptyImageError` for a header that declares a zero size.
    """
    with open(path, "rb") as f:
        magic = f.read(8)
        f.seek(0)
        try:
            if magic.startswith(_GZIP_MAGIC):
                layout = _nifti_layout(next(_gunzip_chunks(f, path, size=540), b""), path, gz=True)
            elif magic.startswith(b"NRRD"):
                layout = _nrrd_layout(f)
            elif meta or path.suffix.lower() == ".mha":
                layout = _meta_layout(f)
            else:
                layout = _nifti_layout(f.read(540), path, gz=False)
        except ImageError:
            raise
        except (struct.error, ValueError, OverflowError):
            return None  # a header we cannot parse is the reader's to reject
    if layout is not None and any(s == 0 for s in layout.sizes):
        raise EmptyImageError(path, f"has no voxels (its header declares size {layout.sizes})")
    return layout


def _scan_voxel_data(path: Path, layout: _Layout, cap: int | None = None) -> tuple[int, int, int]:
    """``(bytes of voxel data present, NaN count, infinite count)``; the counts only for float NIfTI.

    Decompression stops as soon as more than ``cap`` bytes of voxel data have come out, so a small
    file that inflates to gigabytes costs milliseconds (the caller sees ``have > cap``).
    """
    dt = np.dtype(layout.float_dtype) if layout.float_dtype else None
    need = layout.nbytes or 0
    have = n_nan = n_inf = 0
    skip = layout.offset if layout.encoding == "gzip-file" else 0  # header bytes inside the stream
    carry = b""  # a value split across two chunks
    with open(path, "rb") as f:
        f.seek(0 if layout.encoding == "gzip-file" else layout.offset)
        chunks = iter(lambda: f.read(1 << 20), b"") if layout.encoding == "raw" else _gunzip_chunks(f, path)
        for chunk in chunks:
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            start, have = have, have + len(chunk)
            if cap is not None and have > cap:
                break
            if dt is None or start >= need:
                continue
            buf = carry + chunk[: need - start]
            whole = len(buf) - len(buf) % dt.itemsize
            values, carry = np.frombuffer(buf, dtype=dt, count=whole // dt.itemsize), buf[whole:]
            bad = ~np.isfinite(values)
            if bad.any():
                nan = int(np.isnan(values).sum())
                n_nan, n_inf = n_nan + nan, n_inf + int(bad.sum()) - nan
    return have, n_nan, n_inf


def _inflate_cap(declared: int, settings: Settings) -> int:
    """Most bytes that compressed data declared as ``declared`` bytes may inflate to (the slack allows
    for padding some writers add; real files have none)."""
    slack = max(settings.untrusted_gzip_slack_mb * 2**20, settings.untrusted_gzip_slack_fraction * declared)
    return declared + int(slack)


def _check_data(path: Path, layout: _Layout | None, settings: Settings | None = None) -> None:
    """Raise :class:`UnreadableImageError` when ``path`` holds less voxel data than ``layout`` declares,
    :class:`NonFiniteError` when a NIfTI stores NaN or infinite floats (which ITK would turn into 0),
    :class:`DecompressionBombError` when a gzip stream holds far more than its header declares."""
    if layout is None or layout.nbytes is None:
        return
    if layout.encoding == "raw" and layout.float_dtype is None:
        have, n_nan, n_inf = path.stat().st_size - layout.offset, 0, 0  # no need to read the data
    else:
        cap = None
        if layout.encoding != "raw":
            from .settings import Settings

            cap = _inflate_cap(layout.nbytes, settings or Settings())
        have, n_nan, n_inf = _scan_voxel_data(path, layout, cap)
        if cap is not None and have > cap:
            raise DecompressionBombError(path, f"has gzip data that inflates to more than {_mib(cap)} although "
                                               f"its header declares {_mib(layout.nbytes)} of voxels (trailing "
                                               "data); refused without inflating the rest")
    if have < layout.nbytes:
        what = "once decompressed " if layout.encoding != "raw" else ""
        raise UnreadableImageError(path, f"is truncated: its header declares {layout.nbytes} bytes of voxel "
                                         f"data, the file {what}holds only {max(have, 0)}")
    if n_nan or n_inf:
        raise NonFiniteError(path, f"has {n_nan} NaN and {n_inf} infinite voxels")


# ------------------------------------------------------------------------------- untrusted input
# Uploads are files whose every byte an attacker may choose. ITK reads what a header says: it opens
# the file a MetaImage ``ElementDataFile`` or an NRRD ``data file:`` names (so an upload could make the
# server read, store and serve its own files), it picks the reader by content among twenty formats,
# it turns a NaN or zero spacing into 1 mm, and it allocates whatever size the header declares. So for
# untrusted input the header text is read here first, before ITK opens the file:
#
# 1. the format is told from the content and must be one of: single-file NIfTI-1/2 (raw or gzip),
#    NRRD with attached data, MetaImage with ``ElementDataFile = LOCAL``, DICOM Part 10; ITK is then
#    told which reader to use, so no other format's reader can be picked;
# 2. headers that take the voxels from another file are refused (DetachedDataError) without the named
#    file being opened; so are Analyze / NIfTI ``.hdr``/``.img`` pairs;
# 3. DICOM objects that are not images (SEG, SR, RT, PR, KOS, ...) are refused by SOP class, read
#    with pydicom from the file meta and the dataset (NonImageDicomError);
# 4. spacings, origins and directions in the header must be finite, spacings positive (SpacingError,
#    GeometryError): ITK hides those;
# 5. the declared size must reach ``untrusted_min_size`` voxels per axis (TooSmallError);
# 6. compressed data may not inflate to more than the header declares plus a slack
#    (DecompressionBombError); inflation is streamed and stops at that cap;
# 7. the memory that decoding the declared voxels needs is estimated from the header and must fit
#    ``untrusted_max_decode_mb`` (DecodeBudgetError, a TooLargeError); it is then reserved in one
#    process-wide MemoryBudget shared by every concurrent upload, and released when the image is
#    validated (BudgetBusyError when others hold it for longer than ``untrusted_budget_wait_s``).

_HEADER_LIMIT = 1 << 20  # bytes of NRRD / MetaImage header text read before giving up
_DETACHED_NRRD = re.compile(r"^\s*data\s*_?file\s*:", re.IGNORECASE)
_META_LINE = re.compile(r"^\s*[A-Za-z][A-Za-z0-9_]*\s*=")
# Readers ITK is told to use, by the format found in the content.
_ITK_IO = {"nifti": "NiftiImageIO", "nrrd": "NrrdImageIO", "meta": "MetaImageIO", "dicom": "GDCMImageIO"}
_NRRD_UPLOAD_ENCODINGS = {"raw", "gzip", "gz", "ascii", "text", "txt", "hex"}


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class _Sniffed:
    """What the first bytes of an untrusted file say: its format, and for NRRD and MetaImage its header
    lines (up to the end of the header) and the byte offset where the data starts."""

    fmt: str
    lines: tuple[str, ...] = ()
    data_offset: int = 0


def _text_header(path: Path, blob: bytes, fmt: str) -> _Sniffed:
    """The header of a NRRD (up to its blank line) or MetaImage (up to ``ElementDataFile``)."""
    lines: list[str] = []
    pos = 0
    while True:
        nl = blob.find(b"\n", pos)
        if nl < 0:
            if len(blob) > _HEADER_LIMIT:
                raise UnreadableImageError(path, f"has a {_fmt_name(fmt)} header longer than {_mib(_HEADER_LIMIT)}")
            if blob[pos:]:
                lines.append(blob[pos:].decode("latin-1").rstrip("\r"))
            return _Sniffed(fmt, tuple(lines), len(blob))  # the file ends inside its header
        line = blob[pos:nl].decode("latin-1").rstrip("\r")
        pos = nl + 1
        lines.append(line)
        if (fmt == "nrrd" and line == "") or (
                fmt == "meta" and line.partition("=")[0].strip().lower() == "elementdatafile"):
            return _Sniffed(fmt, tuple(lines), pos)


def _fmt_name(fmt: str) -> str:
    return {"nifti": "NIfTI", "nrrd": "NRRD", "meta": "MetaImage", "dicom": "DICOM"}[fmt]


def _sniff(path: Path) -> _Sniffed:
    """The format of an untrusted file, from its content (never its name)."""
    with open(path, "rb") as f:
        blob = f.read(_HEADER_LIMIT + 1)
    if blob.startswith(_GZIP_MAGIC):
        with open(path, "rb") as f:
            head = next(_gunzip_chunks(f, path, size=540), b"")
        _nifti_kind(path, head, compressed=True)
        return _Sniffed("nifti")
    if blob.startswith(b"NRRD"):
        return _text_header(path, blob, "nrrd")
    if blob[128:132] == b"DICM":
        return _Sniffed("dicom")
    if len(blob) >= 4 and _nifti_kind(path, blob[:540], compressed=False):
        return _Sniffed("nifti")
    first = blob[:4096].split(b"\n", 1)[0].decode("latin-1")
    if _META_LINE.match(first):
        return _text_header(path, blob, "meta")
    if path.suffix.lower() in _DICOM_SUFFIXES:
        raise NonImageDicomError(path, "is not a DICOM Part 10 file (no 'DICM' marker after the 128-byte "
                                       "preamble); only Part 10 DICOM files can be uploaded")
    raise UnreadableImageError(path, "is not in a format uploads may use (single-file NIfTI, NRRD with its "
                                     "data attached, MetaImage with ElementDataFile = LOCAL, DICOM Part 10)")


def sniff_format(path: str | os.PathLike) -> str:
    """The format of a file from its content, never its name: ``"nifti"`` (single-file, raw or gzip),
    ``"nrrd"``, ``"meta"`` (MetaImage) or ``"dicom"`` (Part 10); raises an :class:`ImageError` for any
    other content, an Analyze / NIfTI pair header included (:class:`DetachedDataError`)."""
    return _sniff(Path(path)).fmt


def _nifti_kind(path: Path, head: bytes, compressed: bool) -> bool:
    """True for a single-file NIfTI-1/2 header; raises for a header whose voxels are in a separate
    file (NIfTI pair, Analyze 7.5); False when ``head`` is no NIfTI/Analyze header at all."""
    for e in "<>":
        hdr_size = struct.unpack(e + "i", head[:4])[0] if len(head) >= 4 else 0
        if hdr_size == 348 and len(head) >= 348:
            magic = head[344:348]
        elif hdr_size == 540 and len(head) >= 8:
            magic = head[4:8]
        else:
            continue
        if magic in (b"n+1\0", b"n+2\0"):
            return True
        if magic in (b"ni1\0", b"ni2\0"):
            raise DetachedDataError(path, "is a NIfTI header of a .hdr/.img pair: its voxels are in a separate "
                                          "file; upload a single-file NIfTI (.nii or .nii.gz)")
        raise DetachedDataError(path, "is an Analyze 7.5 header (.hdr) whose voxels are in a separate .img file; "
                                      "upload a single-file NIfTI (.nii or .nii.gz)")
    if compressed:
        raise UnreadableImageError(path, "is gzip-compressed but holds no single-file NIfTI; uploads may "
                                         "compress NIfTI only (.nii.gz)")
    return False


def _fields(lines: tuple[str, ...], sep: str) -> dict[str, str]:
    """``key -> value`` of header lines (keys lower-case; the first occurrence wins, as in the readers)."""
    out: dict[str, str] = {}
    for line in lines:
        if line.startswith("#") or sep not in line:
            continue
        key, _, value = line.partition(sep)
        out.setdefault(key.strip().lower(), value.strip())
    return out


def _floats(text: str) -> list[float]:
    """Numbers in a header value (``nan``/``inf`` included); ValueError for anything else."""
    return [float(v) for v in re.split(r"[\s,()]+", text.strip()) if v]


def _check_geometry_values(path: Path, what: str, spacing: list[float], other: dict[str, list[float]]) -> None:
    """Raise unless every spacing is finite and positive and every ``other`` value finite."""
    bad = [s for s in spacing if not (math.isfinite(s) and s > 0)]
    if bad:
        raise SpacingError(path, f"declares voxel spacing {tuple(spacing)} in its {what}: spacings must be finite "
                                 "and positive (a reader would silently use 1 mm)")
    for name, values in other.items():
        if not all(math.isfinite(v) for v in values):
            raise GeometryError(path, f"declares a non-finite {name} {tuple(values)} in its {what}")


def _check_nrrd_header(path: Path, lines: tuple[str, ...]) -> None:
    for line in lines:
        if not line.startswith("#") and _DETACHED_NRRD.match(line):
            raise DetachedDataError(path, f"has a NRRD header that takes its voxels from another file "
                                          f"({line.strip()[:120]!r}); uploads must hold their data (attached NRRD)")
    if not lines or lines[-1] != "":
        raise UnreadableImageError(path, "is truncated or a detached header: no voxel data follows its NRRD header")
    f = _fields(lines[1:], ":")
    enc = f.get("encoding", "").lower()
    if enc not in _NRRD_UPLOAD_ENCODINGS:
        raise UnreadableImageError(path, f"uses NRRD encoding {enc or 'none'!r}; uploads may use raw, gzip or text")
    if enc in ("gzip", "gz") and ("line skip" in f or "byte skip" in f or "lineskip" in f or "byteskip" in f):
        raise UnreadableImageError(path, "combines gzip encoding with 'line skip'/'byte skip', which uploads may not")
    try:
        spacing = _floats(f["spacings"])[:3] if "spacings" in f else []
        other: dict[str, list[float]] = {}
        if "space directions" in f:
            vectors = re.findall(r"\(([^)]*)\)", f["space directions"])[:3]
            for n, v in enumerate(vectors):
                vec = _floats(v)
                other[f"space direction {n}"] = vec
                spacing.append(float(np.linalg.norm(vec)))  # an axis' spacing is its vector's length
        if "space origin" in f:
            other["space origin"] = _floats(f["space origin"])
    except ValueError:
        raise GeometryError(path, "has spacing, direction or origin values in its NRRD header that are not "
                                  "numbers") from None
    _check_geometry_values(path, "NRRD header", spacing, other)


def _check_meta_header(path: Path, lines: tuple[str, ...]) -> None:
    f = _fields(lines, "=")
    if "elementdatafile" not in f:
        raise UnreadableImageError(path, "has a MetaImage header without an 'ElementDataFile = LOCAL' line "
                                         "(truncated, or not a MetaImage)")
    if f["elementdatafile"].upper() != "LOCAL":
        raise DetachedDataError(path, f"has a MetaImage header that takes its voxels from another file "
                                      f"(ElementDataFile = {f['elementdatafile'][:120]!r}); uploads must hold their "
                                      "data (ElementDataFile = LOCAL)")
    try:
        spacing = _floats(f["elementspacing"]) if "elementspacing" in f else []
        if "elementsize" in f:
            spacing += _floats(f["elementsize"])
        other = {k: _floats(f[k]) for k in ("offset", "origin", "position", "transformmatrix", "rotation",
                                            "orientation", "centerofrotation") if k in f}
    except ValueError:
        raise GeometryError(path, "has spacing, offset or matrix values in its MetaImage header that are not "
                                  "numbers") from None
    _check_geometry_values(path, "MetaImage header", spacing, other)


def _check_nifti_header(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(2) == _GZIP_MAGIC:
            f.seek(0)
            head = next(_gunzip_chunks(f, path, size=540), b"")
        else:
            f.seek(0)
            head = f.read(540)
    for e in "<>":
        hdr_size = struct.unpack(e + "i", head[:4])[0] if len(head) >= 4 else 0
        if hdr_size == 348 and len(head) >= 348:
            ndim = struct.unpack(e + "h", head[40:42])[0]
            pixdim = struct.unpack(e + "8f", head[76:108])
            qform_code, sform_code = struct.unpack(e + "2h", head[252:256])
            quatern = struct.unpack(e + "6f", head[256:280])
            srow = struct.unpack(e + "12f", head[280:328])
        elif hdr_size == 540 and len(head) >= 540:
            ndim = struct.unpack(e + "q", head[16:24])[0]
            pixdim = struct.unpack(e + "8d", head[104:168])
            qform_code, sform_code = struct.unpack(e + "2i", head[344:352])
            quatern = struct.unpack(e + "6d", head[352:400])
            srow = struct.unpack(e + "12d", head[400:496])
        else:
            continue
        n = min(max(int(ndim), 0), 3)
        other: dict[str, list[float]] = {}
        if qform_code > 0:
            other["qform"] = list(quatern)
        if sform_code > 0:
            other["sform"] = list(srow)
        _check_geometry_values(path, "NIfTI header", list(pixdim[1:n + 1]), other)
        if sform_code > 0 and all(math.isfinite(v) for v in srow):
            norms = np.linalg.norm(np.asarray(srow).reshape(3, 4)[:, :3], axis=0)
            if (norms[:n] <= 0).any():
                raise SpacingError(path, f"has a NIfTI sform with a zero-length axis (column norms {tuple(norms)}); "
                                         "spacings must be positive")
        return


# Storage SOP classes whose name ends with "Image Storage" are images; every other object is refused.
def _check_dicom_object(path: Path) -> None:
    """Raise :class:`NonImageDicomError` unless ``path`` is a DICOM image object with usable spacing."""
    import pydicom
    from pydicom.uid import UID

    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "PixelSpacing", "NumberOfFrames"])
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for a crafted file; all mean "unreadable"
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UnreadableImageError(path, f"cannot be read as DICOM: {why}") from None
    classes = {str(u) for u in (meta.get("MediaStorageSOPClassUID"), ds.get("SOPClassUID")) if u}
    if not classes:
        raise NonImageDicomError(path, "is a DICOM file without a SOP class; it cannot be told to be an image")
    for uid in sorted(classes):
        name = UID(uid).name
        if not name.endswith("Image Storage"):
            what = name if name != uid else "unknown (private or retired)"
            raise NonImageDicomError(path, f"is a DICOM {what} object (SOP class {uid}), not an image; upload the "
                                           "image it refers to (CT, MR, PET, ... image storage)")
    if "PixelSpacing" in ds:
        try:
            spacing = [float(v) for v in ds.PixelSpacing]
        except (TypeError, ValueError):
            raise SpacingError(path, f"has a DICOM Pixel Spacing {ds['PixelSpacing'].value!r} that is not two "
                                     "numbers") from None
        _check_geometry_values(path, "DICOM Pixel Spacing", spacing, {})


def _check_untrusted_file(path: Path) -> _Sniffed:
    """Header checks of an untrusted file, before ITK opens it; returns its format."""
    sniffed = _sniff(path)
    if sniffed.fmt == "nrrd":
        _check_nrrd_header(path, sniffed.lines)
    elif sniffed.fmt == "meta":
        _check_meta_header(path, sniffed.lines)
    elif sniffed.fmt == "nifti":
        _check_nifti_header(path)
    else:
        _check_dicom_object(path)
    return sniffed


def _check_meta_inflation(path: Path, sniffed: _Sniffed, cfg: Settings) -> None:
    """A compressed MetaImage's zlib stream may inflate to its declared voxels plus the slack only."""
    f = _fields(sniffed.lines, "=")
    if f.get("compresseddata", "").lower() != "true":
        return
    try:
        sizes = [int(v) for v in f.get("dimsize", "").split()]
        per_value = _META_TYPE_BYTES[f.get("elementtype", "").upper()]
        channels = int(f.get("elementnumberofchannels", "1"))
    except (KeyError, ValueError):
        return  # the reader rejects a header it cannot parse
    declared = int(np.prod(sizes, dtype=np.int64)) * per_value * channels
    cap = _inflate_cap(declared, cfg)
    inflater, out = zlib.decompressobj(), 0
    with open(path, "rb") as fh:
        fh.seek(sniffed.data_offset)
        while out <= cap and (chunk := fh.read(1 << 16)):
            try:
                out += len(inflater.decompress(chunk, cap + 1 - out))
                while inflater.unconsumed_tail and out <= cap:
                    out += len(inflater.decompress(inflater.unconsumed_tail, cap + 1 - out))
            except zlib.error as e:
                raise UnreadableImageError(path, f"is corrupt: its zlib data cannot be decompressed ({e})") from e
            if inflater.eof:
                break
    if out > cap:
        raise DecompressionBombError(path, f"has zlib data that inflates to more than {_mib(cap)} although its "
                                           f"header declares {_mib(declared)} of voxels; refused without inflating "
                                           "the rest")


def _decode_cost(n_values: int, bytes_per_value: int) -> int:
    """Bytes of memory a read of ``n_values`` stored values needs at its peak: ITK's buffer, numpy's copy
    of it, the float32 result and a boolean mask during validation (an upper estimate)."""
    return n_values * (2 * bytes_per_value + 4 + 1)


class MemoryBudget:
    """Bytes that concurrent decodes may hold at once, shared by the threads of a process.

    ``with budget.reserve(n, ...)`` waits until ``n`` bytes are free (at most ``timeout`` seconds),
    holds them for the block and gives them back after it, however the block ends.
    """

    def __init__(self, limit_bytes: int):
        self.limit = int(limit_bytes)
        self._used = 0
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        """Bytes reserved now."""
        with self._cond:
            return self._used

    @contextlib.contextmanager
    def reserve(self, nbytes: int, *, timeout: float, path: str | os.PathLike | None = None) -> Iterator[None]:
        """Hold ``nbytes`` for the block; :class:`DecodeBudgetError` if they exceed the whole budget,
        :class:`BudgetBusyError` if they are not free within ``timeout`` seconds."""
        nbytes = int(nbytes)
        if nbytes > self.limit:
            raise DecodeBudgetError(path, f"needs about {_mib(nbytes)} of memory to decode, more than the "
                                          f"server's decode budget of {_mib(self.limit)}")
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._used + nbytes > self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BudgetBusyError(path, f"cannot be decoded now: other uploads hold {_mib(self._used)} of "
                                                f"the {_mib(self.limit)} decode budget; try again shortly")
                self._cond.wait(left)
            self._used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self._used -= nbytes
                self._cond.notify_all()


_BUDGET: MemoryBudget | None = None
_BUDGET_LOCK = threading.Lock()


def decode_budget(settings: Settings | None = None) -> MemoryBudget:
    """The one process-wide budget of every untrusted read (sized by ``untrusted_memory_budget_mb`` of
    the settings given at its first use)."""
    global _BUDGET
    with _BUDGET_LOCK:
        if _BUDGET is None:
            from .settings import Settings

            cfg = settings or Settings()
            _BUDGET = MemoryBudget(int(cfg.untrusted_memory_budget_mb * 2**20))
        return _BUDGET


class _Guard:
    """The extra checks of an untrusted read, called by :func:`_read` at the right moments."""

    def __init__(self, settings: Settings, budget: MemoryBudget):
        self.cfg = settings
        self.budget = budget
        self.sniffed: _Sniffed | None = None

    def check_file(self, path: Path) -> str:
        """Header checks before ITK opens the file; returns the ITK reader to use."""
        self.sniffed = _check_untrusted_file(path)
        return _ITK_IO[self.sniffed.fmt]

    def check_series(self, folder: Path, files: list[str]) -> None:
        for f in files:
            _check_dicom_object(Path(f))

    def check_size(self, path: Path, size: tuple[int, ...], pixel_id: int, ncomp: int) -> int:
        """Refuse a small volume or one too costly to decode; returns the bytes to reserve."""
        eff = list(size)
        while len(eff) > 3 and eff[-1] == 1:
            eff.pop()
        least = self.cfg.untrusted_min_size
        if min(eff) < least:
            raise TooSmallError(path, f"has size {tuple(size)}: uploads need at least {least} voxels along each axis")
        n = int(np.prod(size, dtype=np.int64)) * ncomp
        cost = _decode_cost(n, sitk.Image([1, 1], pixel_id).GetSizeOfPixelComponent())
        limit = int(self.cfg.untrusted_max_decode_mb * 2**20)
        if cost > limit:
            raise DecodeBudgetError(path, f"declares {n} voxels (size {tuple(size)}) that need about {_mib(cost)} of "
                                          f"memory to decode, more than the per-upload limit of {_mib(limit)}")
        return cost

    def check_data(self, path: Path) -> None:
        if self.sniffed is not None and self.sniffed.fmt == "meta":
            _check_meta_inflation(path, self.sniffed, self.cfg)

    def reserve(self, path: Path, cost: int):
        return self.budget.reserve(cost, timeout=self.cfg.untrusted_budget_wait_s, path=path)

    @staticmethod
    def check_geometry(path: Path, img: sitk.Image) -> None:
        spacing, origin, direction = img.GetSpacing(), img.GetOrigin(), img.GetDirection()
        _check_geometry_values(path, "image geometry", list(spacing),
                               {"origin": list(origin), "direction": list(direction)})
        d = int(round(math.sqrt(len(direction))))
        if abs(np.linalg.det(np.asarray(direction).reshape(d, d))) < 1e-6:
            raise GeometryError(path, f"has a singular direction matrix {tuple(direction)}")


# ------------------------------------------------------------------------------------- read_image

def read_image(path: str | os.PathLike, *, require_3d: bool = True, max_voxels: int | None = None,
               dtype=np.float32, untrusted: bool = False, settings: Settings | None = None) -> Image:
    """Read a NIfTI/NRRD/MetaImage file, a DICOM file or a folder holding a DICOM series.

    Checks run in this order, so that nothing large is read before it is known to be wanted: the file
    exists and is not empty; the header is whole and declares a non-zero, scalar, 3-D size within
    ``max_voxels``; the file holds all the voxel data its header declares (and, for NIfTI, no NaN/Inf
    that ITK would turn into 0; gzip data may not inflate to much more than declared); then the voxels
    are read and validated (finite, not constant); a DICOM series must also have evenly spaced slices
    and no unreadable DICOM file beside it.

    Args:
        path: file or folder.
        require_3d: reject 2-D images (a single-slice DICOM, a PNG) with :class:`DimensionError`.
        max_voxels: refuse larger images before reading their voxels (default from settings).
        dtype: dtype of the returned array (``None`` keeps the stored type).
        untrusted: the file comes from a client: apply every check of :func:`read_untrusted_image`.
        settings: limits (default ``Settings()``).

    Returns:
        A validated :class:`Image` (finite, non-constant).

    Raises:
        UnreadableImageError: missing, empty, corrupt, truncated or unknown-format file or folder.
        DimensionError: 2-D (when ``require_3d``), 4-D with several volumes, or multi-component.
        TooLargeError: more voxels than ``max_voxels``.
        EmptyImageError: no voxels, or every voxel the same.
        NonFiniteError: NaN or infinite voxels.
        DecompressionBombError: gzip data that inflates far beyond what the header declares.
    """
    if untrusted:
        return read_untrusted_image(path, require_3d=require_3d, max_voxels=max_voxels, dtype=dtype,
                                    settings=settings)
    return _read(Path(path), require_3d=require_3d, max_voxels=max_voxels, dtype=dtype, settings=settings)


def read_untrusted_image(path: str | os.PathLike, *, require_3d: bool = True, max_voxels: int | None = None,
                         dtype=np.float32, allow_constant: bool = False, settings: Settings | None = None,
                         budget: MemoryBudget | None = None) -> Image:
    """:func:`read_image` for a file from a client (an upload): every check of ``read_image``, and
    refusals of what a crafted file could do to the process (see "untrusted input" above).

    The header is read here before ITK opens the file, and ITK is told which reader to use.

    Args:
        path: the uploaded file (or a folder holding a DICOM series).
        require_3d, max_voxels, dtype: as for :func:`read_image`.
        allow_constant: accept a volume whose voxels all have one value (an all-zero label).
        settings: the ``untrusted_*`` limits and ``max_voxels`` (default ``Settings()``).
        budget: the memory budget shared by concurrent reads (default: :func:`decode_budget`).

    Raises:
        Everything :func:`read_image` raises, and
        DetachedDataError: the header takes its voxels from another file (or is an Analyze/NIfTI pair).
        NonImageDicomError: a DICOM object that is not an image (SEG, SR, RT, PR, KOS, ...), named.
        SpacingError, GeometryError: non-finite, zero or negative spacing; non-finite origin/direction.
        TooSmallError: fewer than ``untrusted_min_size`` voxels along an axis.
        DecompressionBombError: compressed data inflates to more than declared plus the slack.
        DecodeBudgetError: decoding would need more than ``untrusted_max_decode_mb`` (413 over HTTP).
        BudgetBusyError: concurrent uploads hold the shared budget for longer than the wait allows.
    """
    from .settings import Settings

    cfg = settings or Settings()
    guard = _Guard(cfg, budget or decode_budget(cfg))
    return _read(Path(path), require_3d=require_3d, max_voxels=max_voxels, dtype=dtype, settings=cfg,
                 guard=guard, allow_constant=allow_constant)


def _read(path: Path, *, require_3d: bool, max_voxels: int | None, dtype, settings: Settings | None,
          guard: _Guard | None = None, allow_constant: bool = False) -> Image:
    """The one reader behind :func:`read_image` (``guard`` None) and :func:`read_untrusted_image`."""
    from .settings import Settings

    cfg = settings or Settings()
    if max_voxels is None:
        max_voxels = cfg.max_voxels
    if not path.exists():
        raise UnreadableImageError(path, "no such file or folder")
    layout: _Layout | None = None
    # Holds an untrusted read's share of the decode budget from just before ITK decodes the voxels until
    # the returned array is validated, so that concurrent uploads never decode more than the budget.
    with contextlib.ExitStack() as held:
        try:
            if path.is_dir():
                files = _series_files(path)
                if guard is not None:
                    guard.check_series(path, files)
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(files)
                reader.MetaDataDictionaryArrayUpdateOn()  # per-slice positions, for the spacing check
                probe = sitk.ImageFileReader()
                probe.SetFileName(files[0])
                if guard is not None:
                    probe.SetImageIO("GDCMImageIO")
                    reader.SetImageIO("GDCMImageIO")
                probe.ReadImageInformation()
                size = tuple(probe.GetSize()[:2]) + (len(files),)
                _check_header(path, size, probe.GetNumberOfComponents(), require_3d, max_voxels)
                if guard is not None:
                    cost = guard.check_size(path, size, probe.GetPixelID(), probe.GetNumberOfComponents())
                    held.enter_context(guard.reserve(path, cost))
                img = reader.Execute()
                _check_slice_positions(path, reader, img)
            else:
                if path.stat().st_size == 0:
                    raise UnreadableImageError(path, "file is empty (0 bytes)")
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(path))
                if guard is not None:
                    io_name = guard.check_file(path)  # before anything else opens the file's header
                    reader.SetImageIO(io_name)  # never let ITK pick a reader by the content
                    dicom_file = io_name == "GDCMImageIO"
                    layout = _file_layout(path, meta=io_name == "MetaImageIO")
                else:
                    dicom_file = _is_dicom_file(path)
                    if dicom_file:
                        reader.SetImageIO("GDCMImageIO")
                    layout = _file_layout(path)
                reader.ReadImageInformation()
                size = tuple(reader.GetSize())
                _check_header(path, size, reader.GetNumberOfComponents(), require_3d, max_voxels)
                cost = 0
                if guard is not None:
                    cost = guard.check_size(path, size, reader.GetPixelID(), reader.GetNumberOfComponents())
                _check_data(path, layout, cfg)
                if guard is not None:
                    guard.check_data(path)
                    held.enter_context(guard.reserve(path, cost))
                img = reader.Execute()
                if dicom_file:
                    img = _multiframe_spacing(reader, img)
        except ImageError:
            raise
        except RuntimeError as e:
            _check_data(path, layout, cfg)  # a file cut short can fail in ITK: say "truncated" if it is
            raise UnreadableImageError(path, _itk_problem(e)) from e
        except (OSError, EOFError) as e:
            raise UnreadableImageError(path, f"cannot be read: {e}") from e

        if guard is not None:
            guard.check_geometry(path, img)
        # Drop trailing unit dimensions (4-D NIfTI with one volume).
        while img.GetDimension() > 3 and img.GetSize()[-1] == 1:
            ext = list(img.GetSize())
            ext[-1] = 0
            img = sitk.Extract(img, ext, [0] * img.GetDimension())
        if img.GetDimension() == 3 and img.GetSize()[2] == 1 and not require_3d:
            img = img[:, :, 0]
        image = Image.from_sitk(img, source=str(path))
        del img  # ITK's buffer: the array is a copy
        if dtype is not None:
            image = replace(image, array=image.array.astype(dtype, copy=False))
        if allow_constant:
            _validate_values(image)
        else:
            validate(image)
        return image


def _multiframe_spacing(reader: sitk.ImageFileReader, img: sitk.Image) -> sitk.Image:
    """Slice spacing for a multi-frame DICOM file that records no frame geometry.

    GDCM then returns ITK's defaults (spacing 1, origin 0, identity direction) even where the file
    states Spacing Between Slices (0018,0088), as pydicom-data's ``emri_small.dcm`` does: use that
    value along k. A file with frame positions keeps what GDCM computed from them.
    """
    if img.GetDimension() != 3 or img.GetSize()[2] < 2:
        return img
    keys = set(reader.GetMetaDataKeys())
    no_geometry = (img.GetSpacing()[2] == 1.0 and not any(img.GetOrigin())
                   and np.array_equal(img.GetDirection(), np.eye(3).ravel()) and "0020|0032" not in keys)
    if not no_geometry or "0018|0088" not in keys:
        return img
    try:
        dz = float(reader.GetMetaData("0018|0088"))
    except ValueError:
        return img
    if np.isfinite(dz) and dz > 0:
        img.SetSpacing((*img.GetSpacing()[:2], dz))
    return img


def _itk_problem(e: BaseException) -> str:
    """A message for an ITK read failure: plain words for the common case, ITK's own sentence otherwise."""
    if "Unable to determine ImageIO reader" in str(e):
        return "is not in an image format we can read (unknown format, or a corrupt or cut-off header)"
    return f"cannot be read as an image (corrupt, truncated or unknown format): {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    """The sentence of an ITK exception that says what went wrong, without source paths and tags."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # ITK messages put the useful sentence last, after file/line noise and an "ITK ERROR: Class(0x..):" tag.
    # MetaImage adds "Reason: <errno text>" from a stale errno ("No such file" for a file that exists).
    useful = [ln for ln in lines if not ln.startswith(("/", "Exception thrown in", "Reason:"))] or lines
    text = useful[-1] if useful else type(e).__name__
    text = re.sub(r"^(sitk::ERROR:|ITK ERROR: \w+\(0x[0-9a-fA-F]+\):)\s*", "", text)
    return text[:300]



def _validate_values(image: Image, path: str | os.PathLike | None = None) -> None:
    """Raise an :class:`ImageError` if ``image`` has no voxels or non-finite values."""
    path = path or image.source
    a = image.array
    if a.size == 0:
        raise EmptyImageError(path, f"has no voxels (shape {a.shape})")
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        if not finite.all():
            n_nan = int(np.isnan(a).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise NonFiniteError(path, f"has {n_nan} NaN and {n_inf} infinite voxels")


def validate(image: Image, path: str | os.PathLike | None = None) -> Image:
    """Raise an :class:`ImageError` if ``image`` has no voxels, non-finite or constant values."""
    path = path or image.source
    _validate_values(image, path)
    a = image.array
    lo, hi = a.min(), a.max()
    if lo == hi:
        raise EmptyImageError(path, f"is constant (every voxel is {lo.item()!r}); "
                                    "there is nothing to explain")
    return image


# -------------------------------------------------------------------------------------------- write

def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def write_image(image: Image, path: str | os.PathLike, *, dicom: bool | None = None,
                compress: bool = True, dicom_uid: str | None = None) -> Path:
    """Write ``image`` with its exact geometry.

    ``path`` ending in ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.mha`` writes one file; ``.nhdr`` and
    ``.mhd`` write a header and a data file beside it. A folder (no suffix, or ``dicom=True``) receives
    a DICOM series, one file per k slice, int16 with rescale, so voxel values come back within half a
    rescale step (exactly for int16 integers); it refuses NaN/Inf voxels and left-handed directions.
    ``dicom_uid`` makes the series' UIDs a function of that string (deterministic output).
    Returns the path written.
    """
    path = Path(path)
    if dicom is None:
        dicom = _suffix(path) == ""
    if dicom:
        return _write_dicom_series(image, path, dicom_uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A detached header names its data file, so it must be written under its final name.
    detached = _suffix(path) in (".nhdr", ".mhd", ".hdr")
    tmp = path if detached else path.with_name(f".{path.name}.{os.getpid()}.tmp{_suffix(path)}")
    try:
        sitk.WriteImage(image.to_sitk(), str(tmp), useCompression=compress)
    except RuntimeError as e:
        if tmp != path:
            tmp.unlink(missing_ok=True)
        raise ImageError(path, f"cannot be written: {_first_line(e)}") from e
    if tmp != path:
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    return path


def _ds(value: float) -> str:
    """``value`` as a DICOM decimal string: as many digits as its 16 characters allow."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def _int16_rescale(a: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` that store ``a`` as int16: exactly when it holds int16 integers, else
    spread over +/-32500 (the quantisation error is at most slope / 2)."""
    lo, hi = float(a.min()), float(a.max())
    if np.array_equal(a, np.round(a)) and -32768 <= lo and hi <= 32767:
        return 1.0, 0.0  # label maps and CT numbers come back unchanged
    if hi == lo:
        return 1.0, float(_ds(lo))
    # The stored values are computed from the numbers as written (DS strings), which readers apply.
    return float(_ds((hi - lo) / 65000.0)), float(_ds((hi + lo) / 2.0))


def _write_dicom_series(image: Image, folder: Path, uid: str | None = None) -> Path:
    """Write a 3-D image as a classic MR Image Storage series: one file per k slice, int16 voxels
    with Rescale Slope/Intercept.

    pydicom writes the files because GDCM (SimpleITK's DICOM writer) turns an MR image with a
    rescale into single-frame Enhanced MR files and then records a wrong slice spacing (1.0).
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    if image.ndim != 3:
        raise DimensionError(folder, f"a DICOM series needs a 3-D image, got {image.ndim}-D")
    a = np.asarray(image.array, dtype=np.float64)
    if a.size == 0:
        raise EmptyImageError(folder, f"has no voxels (shape {a.shape}); nothing to write as DICOM")
    if not np.isfinite(a).all():
        raise NonFiniteError(folder, "holds NaN or infinite voxels, which a DICOM series cannot store")
    if np.linalg.det(image.direction_matrix) < 0:
        # DICOM implies the slice normal as row x column; readers sort slices along it, so a left-handed
        # grid would come back with k reversed: refuse rather than write a different grid.
        raise ImageError(folder, "has a left-handed direction matrix (det < 0), which a DICOM series "
                                 "cannot keep; write NIfTI/NRRD, or reverse k first")
    slope, intercept = _int16_rescale(a)
    stored = np.clip(np.round((a - intercept) / slope), -32768, 32767).astype("<i2")

    def _uid(*parts: str) -> str:
        # With ``uid`` the UIDs are a hash of it (same input, same files); without, they are unique.
        return generate_uid(PYDICOM_ROOT_UID, entropy_srcs=[uid, *parts] if uid is not None else None)

    study_uid, series_uid, frame_uid = _uid("study"), _uid("series"), _uid("frame of reference")
    d = image.direction_matrix
    orientation = [_ds(v) for v in (*d[:, 0], *d[:, 1])]  # row (i) then column (j) direction cosines
    lo, hi = float(a.min()), float(a.max())
    folder.mkdir(parents=True, exist_ok=True)
    depth = stored.shape[0]
    for k in range(depth):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = _uid("instance", str(k))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.preamble = b"\0" * 128
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.ImageType = "MR", ["DERIVED", "SECONDARY"]
        ds.PatientName, ds.PatientID = "Anonymous", "XAI-SYNTH"
        ds.PatientBirthDate = ds.PatientSex = ds.StudyDate = ds.StudyTime = ds.StudyID = ""
        ds.ReferringPhysicianName = ds.AccessionNumber = ds.PositionReferenceIndicator = ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "RM", "NONE", "3D"
        ds.ImagePositionPatient = [_ds(v) for v in image.index_to_physical((0, 0, k))]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = [_ds(image.spacing[1]), _ds(image.spacing[0])]  # between rows, then columns
        ds.SliceThickness = ds.SpacingBetweenSlices = _ds(image.spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(intercept), _ds(slope), "US"
        ds.WindowCenter, ds.WindowWidth = _ds((hi + lo) / 2.0), _ds(max(hi - lo, 1e-6))
        ds.PixelData = stored[k].tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(folder / f"slice_{k:04d}.dcm", ds, write_like_original=False)
    # Slices left by an earlier, deeper write to this folder would join or outvote the new series.
    for old in folder.glob("slice_*.dcm"):
        if old.stem[6:].isdigit() and int(old.stem[6:]) >= depth:
            old.unlink()
    return folder

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
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import SimpleITK as sitk

__all__ = [
    "Image",
    "ImageError",
    "UnreadableImageError",
    "DimensionError",
    "NonFiniteError",
    "EmptyImageError",
    "TooLargeError",
    "read_image",
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


def _file_layout(path: Path) -> _Layout | None:
    """Parse the header of a NIfTI (.nii, .nii.gz), NRRD or MetaImage (.mha) file; None for others.

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
            elif path.suffix.lower() == ".mha":
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


def _scan_voxel_data(path: Path, layout: _Layout) -> tuple[int, int, int]:
    """``(bytes of voxel data present, NaN count, infinite count)``; the counts only for float NIfTI."""
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


def _check_data(path: Path, layout: _Layout | None) -> None:
    """Raise :class:`UnreadableImageError` when ``path`` holds less voxel data than ``layout`` declares,
    :class:`NonFiniteError` when a NIfTI stores NaN or infinite floats (which ITK would turn into 0)."""
    if layout is None or layout.nbytes is None:
        return
    if layout.encoding == "raw" and layout.float_dtype is None:
        have, n_nan, n_inf = path.stat().st_size - layout.offset, 0, 0  # no need to read the data
    else:
        have, n_nan, n_inf = _scan_voxel_data(path, layout)
    if have < layout.nbytes:
        what = "once decompressed " if layout.encoding != "raw" else ""
        raise UnreadableImageError(path, f"is truncated: its header declares {layout.nbytes} bytes of voxel "
                                         f"data, the file {what}holds only {max(have, 0)}")
    if n_nan or n_inf:
        raise NonFiniteError(path, f"has {n_nan} NaN and {n_inf} infinite voxels")


# ------------------------------------------------------------------------------------- read_image

def read_image(path: str | os.PathLike, *, require_3d: bool = True, max_voxels: int | None = None,
               dtype=np.float32) -> Image:
    """Read a NIfTI/NRRD/MetaImage file, a DICOM file or a folder holding a DICOM series.

    Checks run in this order, so that nothing large is read before it is known to be wanted: the file
    exists and is not empty; the header is whole and declares a non-zero, scalar, 3-D size within
    ``max_voxels``; the file holds all the voxel data its header declares (and, for NIfTI, no NaN/Inf
    that ITK would turn into 0); then the voxels are read and validated (finite, not constant); a
    DICOM series must also have evenly spaced slices and no unreadable DICOM file beside it.

    Args:
        path: file or folder.
        require_3d: reject 2-D images (a single-slice DICOM, a PNG) with :class:`DimensionError`.
        max_voxels: refuse larger images before reading their voxels (default from settings).
        dtype: dtype of the returned array (``None`` keeps the stored type).

    Returns:
        A validated :class:`Image` (finite, non-constant).

    Raises:
        UnreadableImageError: missing, empty, corrupt, truncated or unknown-format file or folder.
        DimensionError: 2-D (when ``require_3d``), 4-D with several volumes, or multi-component.
        TooLargeError: more voxels than ``max_voxels``.
        EmptyImageError: no voxels, or every voxel the same.
        NonFiniteError: NaN or infinite voxels.
    """
    from .settings import get_settings

    path = Path(path)
    if max_voxels is None:
        max_voxels = get_settings().max_voxels
    if not path.exists():
        raise UnreadableImageError(path, "no such file or folder")
    layout: _Layout | None = None
    try:
        if path.is_dir():
            files = _series_files(path)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            reader.MetaDataDictionaryArrayUpdateOn()  # per-slice positions, for the spacing check
            probe = sitk.ImageFileReader()
            probe.SetFileName(files[0])
            probe.ReadImageInformation()
            size = tuple(probe.GetSize()[:2]) + (len(files),)
            _check_header(path, size, probe.GetNumberOfComponents(), require_3d, max_voxels)
            img = reader.Execute()
            _check_slice_positions(path, reader, img)
        else:
            if path.stat().st_size == 0:
                raise UnreadableImageError(path, "file is empty (0 bytes)")
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            dicom_file = _is_dicom_file(path)
            if dicom_file:
                reader.SetImageIO("GDCMImageIO")
            layout = _file_layout(path)
            reader.ReadImageInformation()
            _check_header(path, tuple(reader.GetSize()), reader.GetNumberOfComponents(), require_3d,
                          max_voxels)
            _check_data(path, layout)
            img = reader.Execute()
            if dicom_file:
                img = _multiframe_spacing(reader, img)
    except ImageError:
        raise
    except RuntimeError as e:
        _check_data(path, layout)  # a file cut short can fail in ITK: say "truncated" if it is
        raise UnreadableImageError(path, _itk_problem(e)) from e
    except (OSError, EOFError) as e:
        raise UnreadableImageError(path, f"cannot be read: {e}") from e

    # Drop trailing unit dimensions (4-D NIfTI with one volume).
    while img.GetDimension() > 3 and img.GetSize()[-1] == 1:
        ext = list(img.GetSize())
        ext[-1] = 0
        img = sitk.Extract(img, ext, [0] * img.GetDimension())
    if img.GetDimension() == 3 and img.GetSize()[2] == 1 and not require_3d:
        img = img[:, :, 0]
    image = Image.from_sitk(img, source=str(path))
    if dtype is not None:
        image = replace(image, array=image.array.astype(dtype, copy=False))
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



def validate(image: Image, path: str | os.PathLike | None = None) -> Image:
    """Raise an :class:`ImageError` if ``image`` has no voxels, non-finite or constant values."""
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

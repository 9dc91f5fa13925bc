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

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

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
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
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


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _series_files(folder: Path) -> list[str]:
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise UnreadableImageError(folder, "folder holds no readable DICOM series")
    if len(ids) > 1:
        # The largest series wins; say which so the caller can pass a folder with one series.
        ids = sorted(ids, key=lambda s: -len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s)))
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


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
        raise DimensionError(path, f"is {dims}-D with size {tuple(size)}; a 3-D volume is needed")
    if require_3d and (len(eff) < 3 or eff[2] == 1):
        raise DimensionError(path, f"is 2-D (size {tuple(size)}); a 3-D volume is needed")
    n = int(np.prod(size, dtype=np.int64))
    if n == 0:
        raise EmptyImageError(path, f"has no voxels (size {tuple(size)})")
    if n > max_voxels:
        raise TooLargeError(path, f"has {n} voxels (size {tuple(size)}), more than the limit of {max_voxels}")


def read_image(path: str | os.PathLike, *, require_3d: bool = True, max_voxels: int | None = None,
               dtype=np.float32) -> Image:
    """Read a NIfTI/NRRD/MetaImage file, a DICOM file or a folder holding a DICOM series.

    Args:
        path: file or folder.
        require_3d: reject 2-D images (a single-slice DICOM, a PNG) with :class:`DimensionError`.
        max_voxels: refuse larger images before reading their voxels (default from settings).
        dtype: dtype of the returned array (``None`` keeps the stored type).

    Returns:
        A validated :class:`Image` (finite, non-constant).
    """
    from .settings import get_settings

    path = Path(path)
    max_voxels = max_voxels or get_settings().max_voxels
    if not path.exists():
        raise UnreadableImageError(path, "no such file or folder")
    try:
        if path.is_dir():
            files = _series_files(path)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            probe = sitk.ImageFileReader()
            probe.SetFileName(files[0])
            probe.ReadImageInformation()
            size = tuple(probe.GetSize()[:2]) + (len(files),)
            _check_header(path, size, probe.GetNumberOfComponents(), require_3d, max_voxels)
            img = reader.Execute()
        else:
            if path.stat().st_size == 0:
                raise UnreadableImageError(path, "file is empty (0 bytes)")
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            if _is_dicom_file(path):
                reader.SetImageIO("GDCMImageIO")
            reader.ReadImageInformation()
            _check_header(path, tuple(reader.GetSize()), reader.GetNumberOfComponents(), require_3d, max_voxels)
            img = reader.Execute()
    except ImageError:
        raise
    except RuntimeError as e:
        raise UnreadableImageError(path, f"cannot be read as an image (corrupt, truncated or unknown "
                                         f"format): {_first_line(e)}") from e
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


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # ITK messages put the useful sentence last, after file/line noise.
    useful = [ln for ln in lines if not ln.startswith(("/", "sitk::ERROR"))] or lines
    return (useful[-1] if useful else type(e).__name__)[:300]


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
        raise EmptyImageError(path, f"is constant (every voxel is {lo.item()!r}); there is nothing to explain")
    return image


# -------------------------------------------------------------------------------------------- write

def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def write_image(image: Image, path: str | os.PathLike, *, dicom: bool | None = None,
                compress: bool = True, dicom_uid: str | None = None) -> Path:
    """Write ``image`` with its exact geometry.

    ``path`` ending in ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr`` or ``.mha`` writes one file; a
    folder (no suffix, or ``dicom=True``) receives a DICOM series, one file per k slice.
    ``dicom_uid`` makes the series' UIDs a function of that string (deterministic output).
    Returns the path written.
    """
    path = Path(path)
    if dicom is None:
        dicom = _suffix(path) == ""
    if dicom:
        return _write_dicom_series(image, path, dicom_uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{_suffix(path)}")
    sitk.WriteImage(image.to_sitk(), str(tmp), useCompression=compress)
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return path


def _write_dicom_series(image: Image, folder: Path, uid: str | None = None) -> Path:
    """Write a 3-D image as an MR DICOM series (int16 with rescale slope/intercept)."""
    if image.ndim != 3:
        raise DimensionError(folder, f"a DICOM series needs a 3-D image, got {image.ndim}-D")
    folder.mkdir(parents=True, exist_ok=True)
    a = image.array.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    slope = (hi - lo) / 32000.0 if hi > lo else 1.0
    intercept = lo
    stored = np.round((a - intercept) / slope).astype(np.int16)
    img = image.with_array(stored).to_sitk()

    uid_root = "1.2.826.0.1.3680043.8.498"
    stamp = uid or f"{int(time.time() * 1e6)}.{os.getpid()}"
    study_uid, series_uid = f"{uid_root}.1.{stamp}", f"{uid_root}.2.{stamp}"
    d = image.direction
    orientation = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
            "0008|0018": f"{series_uid}.{k + 1}",
            "0010|0010": "Anonymous",
            "0010|0020": "XAI-SYNTH",
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0011": "1",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.10g}" for v in pos),
            "0020|0037": orientation,
            "0028|0030": f"{image.spacing[1]:.10g}\\{image.spacing[0]:.10g}",
            "0018|0050": f"{image.spacing[2]:.10g}",
            "0018|0088": f"{image.spacing[2]:.10g}",
            "0028|1052": f"{intercept:.10g}",
            "0028|1053": f"{slope:.10g}",
            "0028|1054": "US",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice_{k:04d}.dcm"))
        writer.Execute(sl)
    return folder

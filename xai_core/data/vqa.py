"""Med-VQA data from generated studies, in the SLAKE layout (docs/vqa.md).

From each study (image, lesion mask and manifest row of :mod:`.brain`) slices are resampled in the
three patient planes (:mod:`xai_core.slices`), through the lesion and away from it, and questions are
asked about each slice. Every answer is computed from ground truth on that slice:

- presence / normal-abnormal: lesion pixels on the slice (nearest-neighbour mask) covering at least
  :data:`MIN_LESION_AREA_MM2`; slices with a smaller, non-zero lesion area are never used;
- side: the side of the lesion components visible on the slice (the manifest's hemisphere, read on
  the atlas where it is exact; for bilateral studies each component by its LPS L coordinate against
  the brain's midline, and components within :data:`MIDLINE_MARGIN_MM` of it are not asked about);
- class: the study's lesion class when lesion pixels are on the slice, none otherwise;
- structure and lobe: the manifest's largest Harvard-Oxford structure on the visible side, asked only
  on the slice through the lesion's centre;
- size band: the study's total lesion volume (``volume_ml``) in :data:`SIZE_BANDS`;
- plane: the plane the slice was resampled in.

Phrasings are written by hand (:data:`PHRASINGS`), six per question type; the last
:data:`HELD_OUT_PER_TYPE` of each type never appear in train or validation: the test split asks each
question once in a seen phrasing and once more in a held-out one (``phrasing_held_out: true``).
Splits are by study. Output is a deterministic function of the studies and the seed.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..io import Image, read_image
from ..slices import PLANES, plane_extent, sample_slice, to_png8
from .brain import LESION_CLASSES, read_manifest

MIN_LESION_AREA_MM2 = 20.0  # a lesion smaller than this on a slice is not called present (nor absent)
FREE_MARGIN_MM = 15.0  # a lesion-free slice of a lesion study lies this far from the mask (clear of oedema)
MIDLINE_MARGIN_MM = 10.0  # bilateral components this close to the midline have no reliable side
# Total lesion volume (mL) -> band: [low, high). Metastases fall mostly in small, meningiomas in
# medium, gliomas in medium or large (measured on data/heldout: 1.5-7, 4.5-16, 9.7-34 mL).
SIZE_BANDS: tuple[tuple[str, float, float], ...] = (("small", 0.0, 5.0), ("medium", 5.0, 15.0),
                                                    ("large", 15.0, float("inf")))
SPLITS: tuple[str, ...] = ("train", "validation", "test")
HELD_OUT_PER_TYPE = 2
MODALITY = "MRI"
LOCATION = "Brain"

# question type -> (answer type, SLAKE content type)
QUESTION_TYPES: dict[str, tuple[str, str]] = {
    "presence": ("CLOSED", "Abnormality"),
    "normality": ("CLOSED", "Abnormality"),
    "side_closed": ("CLOSED", "Position"),
    "is_class": ("CLOSED", "Abnormality"),
    "structure": ("OPEN", "Position"),
    "lobe": ("OPEN", "Position"),
    "side_open": ("OPEN", "Position"),
    "kind": ("OPEN", "Abnormality"),
    "size": ("OPEN", "Size"),
    "plane": ("OPEN", "Plane"),
}

# Written as people type them: mixed case, missing question marks, shorthand. The last
# HELD_OUT_PER_TYPE of each list are held out of training. {side} is left/right, {cls} a lesion class.
PHRASINGS: dict[str, tuple[str, ...]] = {
    "presence": (
        "Is there a lesion in this image?",
        "is there any lesion on this slice",
        "Does this slice show a lesion?",
        "any lesion visible here?",
        "Can you see a tumour in this picture?",
        "is a mass present on this scan",
    ),
    "normality": (
        "Is this brain normal or abnormal?",
        "normal or abnormal?",
        "Does this slice look normal or abnormal?",
        "would you call this image normal or abnormal",
        "Healthy looking (normal) or abnormal, which is it?",
        "is what we see here normal, or abnormal",
    ),
    "side_closed": (
        "Is the lesion on the {side} side?",
        "is the lesion in the {side} hemisphere",
        "Is the abnormality located on the patient's {side}?",
        "lesion on the {side}?",
        "Does the mass sit in the {side} half of the brain?",
        "would you say the abnormal area is {side} sided",
    ),
    "is_class": (
        "Is this a {cls}?",
        "is the lesion a {cls}",
        "Does this slice show a {cls}?",
        "could this be a {cls}?",
        "Are we looking at a {cls} here?",
        "{cls} on this slice, yes or no?",
    ),
    "structure": (
        "Which structure is the lesion in?",
        "where is the lesion located",
        "In which brain structure is the abnormality?",
        "what structure does the lesion involve?",
        "Name the anatomical structure that holds the mass.",
        "which region of the brain is the tumour in",
    ),
    "lobe": (
        "Which lobe is the lesion in?",
        "what lobe is affected",
        "In which lobe of the brain is the abnormality?",
        "lesion is in which lobe?",
        "Which lobe does the mass lie in?",
        "tell me the lobe where the abnormal tissue is",
    ),
    "side_open": (
        "Which side is the lesion on?",
        "which hemisphere is the lesion in",
        "On which side of the brain is the abnormality?",
        "lesion side: left, right or both?",
        "Is the mass in the left or the right half of the brain, or both?",
        "what side is abnormal here",
    ),
    "kind": (
        "What kind of lesion is this?",
        "what type of lesion is shown",
        "What is the abnormality in this image?",
        "which lesion type is it?",
        "What would you diagnose this mass as?",
        "the lesion here is what, glioma, meningioma or metastasis?",
    ),
    "size": (
        "How big is the lesion?",
        "what size is the lesion",
        "Is the lesion small, medium or large?",
        "lesion size?",
        "How large would you say the mass is?",
        "whats the size of the abnormal area, roughly",
    ),
    "plane": (
        "In which plane is this image?",
        "what plane is this slice",
        "Is this an axial, coronal or sagittal slice?",
        "which plane?",
        "What is the scanning plane of this picture?",
        "this slice was cut in which orientation",
    ),
}


def is_held_out(qtype: str, phrasing: int) -> bool:
    """True for the phrasings of ``qtype`` that only the test split uses."""
    return phrasing >= len(PHRASINGS[qtype]) - HELD_OUT_PER_TYPE


def size_band(volume_ml: float) -> str:
    """Band of a total lesion volume in mL (:data:`SIZE_BANDS`, low end inclusive)."""
    for name, lo, hi in SIZE_BANDS:
        if lo <= volume_ml < hi:
            return name
    raise ValueError(f"lesion volume must be >= 0 mL, got {volume_ml}")


@dataclass(frozen=True)
class VQAOptions:
    """How many slices a study gives, per plane.

    Attributes:
        lesion_slices: slices through the lesion in a lesion study (the first through its centre).
        free_slices: lesion-free slices of a lesion study, at least :data:`FREE_MARGIN_MM` from it.
        normal_slices: slices of a lesion-free study.
        split_fractions: train / validation / test shares of the studies.
    """

    lesion_slices: int = 2
    free_slices: int = 1
    normal_slices: int = 2
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)


# ------------------------------------------------------------------------------- ground truth

@dataclass
class _SliceTruth:
    name: str  # folder under imgs/
    plane: str
    position_mm: float
    through_centre: bool
    area_mm2: float
    side: str | None  # left | right | both | None (no lesion, or no reliable side)
    structure: str | None  # Harvard-Oxford name
    geometry: dict
    window: tuple[float, float]


def _read_mask(path: str) -> Image:
    # Masks of lesion-free studies are all zero, which read_image rightly refuses for an image.
    return Image.from_sitk(sitk.ReadImage(str(path)))


def _physical_points(img: Image, where: np.ndarray) -> np.ndarray:
    """LPS mm of the voxels where ``where`` (``(K, J, I)`` bool) is true, shape ``(n, 3)``."""
    kji = np.array(np.nonzero(where)).T
    return img.index_to_physical(kji[:, ::-1].astype(float))


def _midline_l(image: Image, row: dict) -> float:
    """LPS L (mm) of the brain's midline: the brain mask's centroid (the foreground's without one)."""
    brain = None
    if row.get("brain_mask") and Path(row["brain_mask"]).exists():
        b = _read_mask(row["brain_mask"])
        if b.same_geometry(image):
            brain = b.array > 0
    if brain is None:
        fg = image.array[image.array > 0]
        brain = image.array > (np.percentile(fg, 50) * 0.3 if fg.size else 0)
    return float(_physical_points(image, brain)[:, 0].mean())


def _component_sides(image: Image, mask: np.ndarray, row: dict) -> tuple[np.ndarray, dict[int, str | None]]:
    """3-D components of the lesion mask and the side of each (None: too near the midline)."""
    comps, n = ndimage.label(mask)
    if row["hemisphere"] in ("left", "right"):
        return comps, {c: row["hemisphere"] for c in range(1, n + 1)}
    mid = _midline_l(image, row)
    sides: dict[int, str | None] = {}
    for c in range(1, n + 1):
        x = float(_physical_points(image, comps == c)[:, 0].mean())
        # LPS: +L is the patient's left.
        sides[c] = None if abs(x - mid) < MIDLINE_MARGIN_MM else ("left" if x > mid else "right")
    return comps, sides


def _structure_on(row: dict, side: str | None) -> str | None:
    """The manifest's largest structure with a lobe on ``side`` (any side when ``both``)."""
    from ..atlas import lobe_of

    for name, _frac in row["structures"]:
        try:
            lobe_of(name)
        except KeyError:
            continue
        if side == "both" or (side == "left" and name.startswith("Left_")) or (
                side == "right" and name.startswith("Right_")):
            return name
    return None


def _study_slices(args) -> list[dict]:
    """Slices of one study written under ``imgs/``; returns their ground truth as dicts."""
    row, out, seed, options = args
    from PIL import Image as PILImage

    rng = np.random.default_rng([seed, zlib.crc32(row["study_id"].encode())])
    image = read_image(row["image"])
    mask_img = _read_mask(row["mask"])
    if not mask_img.same_geometry(image, tol=1e-3):
        raise ValueError(f"{row['study_id']}: the mask's grid differs from the image's")
    mask = mask_img.array > 0
    fg = image.array[image.array > 0]
    p1, p50, p995 = (float(v) for v in np.percentile(fg, [1, 50, 99.5])) if fg.size else (0.0, 0.0, 1.0)
    window = (p1, p995)
    has_lesion = bool(mask.any()) and row["label"] != "none"
    comps, sides = _component_sides(image, mask, row) if has_lesion else (np.zeros(mask.shape, np.int32), {})
    comp_img = image.with_array(comps.astype(np.int32))
    # The brain's extent along each axis: lesion-free slices are drawn in its central part.
    thr = p50 * 0.3
    head_pts = _physical_points(image, image.array > thr)
    lesion_pts = _physical_points(image, mask) if has_lesion else None
    if has_lesion:
        largest = int(np.argmax(np.bincount(comps[comps > 0]))) if comps.max() else 0
        centre_pts = _physical_points(image, comps == largest)
    truths: list[dict] = []

    def take(plane: str, pos: float, through_centre: bool, want_lesion: bool, n: int) -> bool:
        sl = sample_slice(image, plane, pos)
        ms = sample_slice(comp_img, plane, pos, label=True)
        px_mm2 = float(sl.geometry.spacing[0] * sl.geometry.spacing[1])
        area = float((ms.array > 0).sum()) * px_mm2
        if want_lesion and area < MIN_LESION_AREA_MM2:
            return False
        if not want_lesion and area > 0:
            return False
        side = structure = None
        if want_lesion:
            seen = {sides.get(int(c)) for c in np.unique(ms.array[ms.array > 0])
                    if (ms.array == c).sum() * px_mm2 >= MIN_LESION_AREA_MM2 / 4}
            if None not in seen and seen:
                side = seen.pop() if len(seen) == 1 else "both"
            if through_centre and side is not None:
                structure = _structure_on(row, side)
        name = f"{row['study_id']}_{plane}{n}"
        folder = out / "imgs" / name
        folder.mkdir(parents=True, exist_ok=True)
        PILImage.fromarray(to_png8(sl.array, window)).save(folder / "source.png")
        PILImage.fromarray(((ms.array > 0) * 255).astype(np.uint8)).save(folder / "mask.png")
        geom = sl.to_json()
        meta = dict(study_id=row["study_id"], source_image=row["image"], label=row["label"], **geom,
                    lesion_area_mm2=round(area, 2), has_lesion=want_lesion, side=side, structure=structure,
                    window=[round(window[0], 4), round(window[1], 4)])
        (folder / "slice.json").write_text(json.dumps(meta, indent=1))
        truths.append(dict(_SliceTruth(name, plane, sl.position_mm, through_centre, area, side, structure,
                                       geom, window).__dict__))
        return True

    for plane in PLANES:
        axis = {"sagittal": 0, "coronal": 1, "axial": 2}[plane]
        lo_b, hi_b = float(head_pts[:, axis].min()), float(head_pts[:, axis].max())
        lo_v, hi_v = plane_extent(image, plane)
        n = 0
        if has_lesion:
            lo_l, hi_l = float(lesion_pts[:, axis].min()), float(lesion_pts[:, axis].max())
            if take(plane, float(centre_pts[:, axis].mean()), True, True, n):
                n += 1
            for _ in range(10 * max(options.lesion_slices - 1, 0)):
                if n >= options.lesion_slices:
                    break
                if take(plane, float(rng.uniform(lo_l, hi_l)), False, True, n):
                    n += 1
            made = 0
            for _ in range(20 * options.free_slices):
                if made >= options.free_slices:
                    break
                pos = float(rng.uniform(lo_b + 0.2 * (hi_b - lo_b), hi_b - 0.2 * (hi_b - lo_b)))
                if lo_l - FREE_MARGIN_MM < pos < hi_l + FREE_MARGIN_MM or not lo_v < pos < hi_v:
                    continue
                if take(plane, pos, False, False, n):
                    n += 1
                    made += 1
        else:
            for _ in range(options.normal_slices):
                pos = float(rng.uniform(lo_b + 0.25 * (hi_b - lo_b), hi_b - 0.25 * (hi_b - lo_b)))
                if take(plane, pos, False, False, n):
                    n += 1
    return truths


# ---------------------------------------------------------------------------------- questions

def _answers(qtype: str, t: dict, row: dict, rng: np.random.Generator) -> tuple[dict, str] | None:
    """Slot values and the answer of ``qtype`` on slice ``t`` of study ``row``; None: not askable."""
    from ..atlas import lobe_of, readable_name

    lesion = t["area_mm2"] >= MIN_LESION_AREA_MM2
    if qtype == "presence":
        return {}, "yes" if lesion else "no"
    if qtype == "normality":
        return {}, "abnormal" if lesion else "normal"
    if qtype == "plane":
        return {}, t["plane"]
    if qtype == "is_class":
        cls = row["label"] if lesion and rng.random() < 0.5 else str(rng.choice(LESION_CLASSES))
        return {"cls": cls}, "yes" if lesion and cls == row["label"] else "no"
    if not lesion:
        return None
    if qtype == "kind":
        return {}, row["label"]
    if qtype == "size":
        return {}, size_band(float(row["volume_ml"]))
    if qtype == "side_open":
        return ({}, t["side"]) if t["side"] else None
    if qtype == "side_closed":
        if t["side"] not in ("left", "right"):
            return None
        asked = t["side"] if rng.random() < 0.5 else ("left" if t["side"] == "right" else "right")
        return {"side": asked}, "yes" if asked == t["side"] else "no"
    if qtype in ("structure", "lobe"):
        if not t["structure"]:
            return None
        return {}, readable_name(t["structure"]) if qtype == "structure" else lobe_of(t["structure"])
    raise KeyError(qtype)


def _questions(split: str, t: dict, row: dict, rng: np.random.Generator) -> list[dict]:
    """Records (without ids) for slice ``t``: every askable type once in a seen phrasing, and in the
    test split once more in a held-out phrasing (same slots, same answer)."""
    recs = []
    for qtype, (answer_type, content_type) in QUESTION_TYPES.items():
        got = _answers(qtype, t, row, rng)
        if got is None:
            continue
        slots, answer = got
        n_seen = len(PHRASINGS[qtype]) - HELD_OUT_PER_TYPE
        choices = [int(rng.integers(0, n_seen))]
        if split == "test":
            choices.append(n_seen + int(rng.integers(0, HELD_OUT_PER_TYPE)))
        for p in choices:
            recs.append(dict(
                img_name=f"{t['name']}/source.png", question=PHRASINGS[qtype][p].format(**slots), answer=answer,
                answer_type=answer_type, content_type=content_type, location=LOCATION, modality=MODALITY,
                base_type="vqa", q_lang="en", question_type=qtype, phrasing=p,
                phrasing_held_out=is_held_out(qtype, p), study_id=row["study_id"], plane=t["plane"],
                position_mm=round(t["position_mm"], 3)))
    return recs


def split_studies(study_ids: list[str], seed: int,
                  fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> dict[str, str]:
    """study id -> split; a seeded permutation of the sorted ids, each split non-empty from 3 studies."""
    ids = sorted(study_ids)
    order = np.random.default_rng([seed, 0x51A4E]).permutation(len(ids))
    n = len(ids)
    n_test = max(1, int(round(fractions[2] * n))) if n >= 3 else 0
    n_val = max(1, int(round(fractions[1] * n))) if n >= 3 else 0
    out = {}
    for rank, i in enumerate(order):
        out[ids[i]] = "test" if rank < n_test else ("validation" if rank < n_test + n_val else "train")
    return out


def make_vqa(out: str | os.PathLike, data: str | os.PathLike, seed: int = 0, options: VQAOptions | None = None,
             workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Write a SLAKE-layout VQA set into ``out`` from the studies of ``data`` (with manifest.csv).

    Writes ``imgs/<id>/{source.png, mask.png, slice.json}``, ``train.json``, ``validation.json``,
    ``test.json``, ``answers.json`` (the answer vocabulary) and ``phrasings.json``. Returns the
    number of records per split (and ``images``).
    """
    options = options or VQAOptions()
    out = Path(out)
    (out / "imgs").mkdir(parents=True, exist_ok=True)
    rows = sorted(read_manifest(data), key=lambda r: r["study_id"])
    if not rows:
        raise ValueError(f"{data}: the manifest lists no studies")
    splits = split_studies([r["study_id"] for r in rows], seed, options.split_fractions)
    jobs = [(r, out, seed, options) for r in rows]
    workers = workers or min(2, os.cpu_count() or 1)
    results: list[list[dict]] = []
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            for res in pool.map(_study_slices, jobs):
                results.append(res)
                if progress:
                    progress(len(results), len(jobs))
    else:
        for job in jobs:
            results.append(_study_slices(job))
            if progress:
                progress(len(results), len(jobs))

    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    img_id = qid = 0
    for row, truths in zip(rows, results, strict=True):
        split = splits[row["study_id"]]
        rng = np.random.default_rng([seed, zlib.crc32(row["study_id"].encode()), 0xA5])
        for t in truths:
            for rec in _questions(split, t, row, rng):
                records[split].append(dict(img_id=img_id, qid=qid, **rec))
                qid += 1
            img_id += 1
    for split, recs in records.items():
        (out / f"{split}.json").write_text(json.dumps(recs, indent=1))
    vocab: dict[str, set[str]] = {}
    for recs in records.values():
        for r in recs:
            vocab.setdefault(r["question_type"], set()).add(r["answer"])
    train_counts: dict[str, int] = {}
    for r in records["train"]:
        train_counts[r["answer"]] = train_counts.get(r["answer"], 0) + 1
    (out / "answers.json").write_text(json.dumps({
        "answers": sorted(set().union(*vocab.values())) if vocab else [],
        "by_question_type": {k: sorted(v) for k, v in sorted(vocab.items())},
        "train_counts": dict(sorted(train_counts.items()))}, indent=1))
    (out / "phrasings.json").write_text(json.dumps({
        q: [{"text": p, "held_out": is_held_out(q, i), "answer_type": QUESTION_TYPES[q][0],
             "content_type": QUESTION_TYPES[q][1]} for i, p in enumerate(ps)] for q, ps in PHRASINGS.items()},
        indent=1))
    (out / "vqa_info.json").write_text(json.dumps({
        "data": str(data), "seed": seed, "studies": {s: sorted(k for k, v in splits.items() if v == s) for s in SPLITS},
        "options": options.__dict__, "min_lesion_area_mm2": MIN_LESION_AREA_MM2, "free_margin_mm": FREE_MARGIN_MM,
        "size_bands_ml": [[n, lo, None if hi == float("inf") else hi] for n, lo, hi in SIZE_BANDS]}, indent=1))
    counts = {s: len(r) for s, r in records.items()}
    counts["images"] = img_id
    return counts

"""Reader of SLAKE-layout VQA folders: the real SLAKE release and ``xai data make-vqa`` output.

Layout (docs/vqa.md)::

    ROOT/imgs/<folder>/source.jpg|png   the image (mask.png, detection.json, ... beside it)
    ROOT/train.json                     list of records
    ROOT/validate.json                  (official zip) or validation.json (other copies)
    ROOT/test.json

Only English records (``q_lang == "en"``) are kept by default. ``answer`` is not always a string in
the release (numbers for counting questions), so it is read through ``str()``. Nothing is
downloaded: the folder must be local.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train.json",),
    "validation": ("validation.json", "validate.json"),
    "test": ("test.json",),
}
_KNOWN = {"qid", "img_id", "img_name", "question", "answer", "answer_type", "content_type", "location",
          "modality", "q_lang", "base_type", "triple"}


@dataclass(frozen=True)
class VQARecord:
    """One question about one image.

    Attributes:
        qid: question id (unique within the release).
        img_id: image id (``-1`` when the record has none).
        img_name: image path relative to ``imgs/`` (``xmlab0/source.jpg``).
        image_path: the image file, resolved under the folder's ``imgs/``.
        question, answer: text (``answer`` converted with ``str()`` and stripped).
        answer_type: ``OPEN`` or ``CLOSED`` (upper-cased).
        content_type, location, modality, base_type, q_lang: as in the release ("" when absent).
        triple: SLAKE's knowledge triple, or None.
        split: ``train``, ``validation`` or ``test``.
        extra: every other field of the record (make-vqa's ``question_type``, ``phrasing_held_out``, ...).
    """

    qid: int
    img_id: int
    img_name: str
    image_path: Path
    question: str
    answer: str
    answer_type: str
    content_type: str
    location: str
    modality: str
    q_lang: str
    base_type: str
    triple: tuple[Any, ...] | None
    split: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def split_path(root: str | os.PathLike, split: str) -> Path:
    """The file of ``split`` under ``root`` (``validation`` accepts ``validation.json`` or ``validate.json``)."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {tuple(SPLIT_FILES)}, got {split!r}")
    root = Path(root)
    for name in SPLIT_FILES[split]:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root}: no {' or '.join(SPLIT_FILES[split])}")


def _record(r: dict, root: Path, split: str) -> VQARecord:
    triple = r.get("triple")
    return VQARecord(
        qid=int(r["qid"]), img_id=int(r.get("img_id", -1)), img_name=str(r["img_name"]),
        image_path=root / "imgs" / str(r["img_name"]), question=str(r["question"]).strip(),
        answer=str(r["answer"]).strip(), answer_type=str(r.get("answer_type", "")).strip().upper(),
        content_type=str(r.get("content_type", "")), location=str(r.get("location", "")),
        modality=str(r.get("modality", "")), q_lang=str(r.get("q_lang", "")), base_type=str(r.get("base_type", "")),
        triple=tuple(triple) if isinstance(triple, list | tuple) else None, split=split,
        extra={k: v for k, v in r.items() if k not in _KNOWN})


def read_split(root: str | os.PathLike, split: str, lang: str | None = "en",
               check_images: bool = True) -> list[VQARecord]:
    """Records of one split, in file order.

    Args:
        root: the SLAKE folder (holding ``imgs/`` and the split files).
        split: ``train``, ``validation`` or ``test``.
        lang: keep records whose ``q_lang`` is this (None keeps all).
        check_images: raise ``FileNotFoundError`` naming the first record whose image is missing.
    """
    root = Path(root)
    path = split_path(root, split)
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    out = []
    for i, r in enumerate(raw):
        if lang is not None and r.get("q_lang", "en") != lang:
            continue
        missing = {"qid", "img_name", "question", "answer"} - set(r)
        if missing:
            raise ValueError(f"{path}: record {i} lacks {sorted(missing)}")
        rec = _record(r, root, split)
        if check_images and not rec.image_path.is_file():
            raise FileNotFoundError(f"{path}: record {i} (qid {rec.qid}) names a missing image {rec.image_path}")
        out.append(rec)
    return out


def load_slake(root: str | os.PathLike, splits: tuple[str, ...] = ("train", "validation", "test"),
               lang: str | None = "en", check_images: bool = True) -> dict[str, list[VQARecord]]:
    """Every split of a local SLAKE-layout folder: split name -> records (see :func:`read_split`)."""
    return {s: read_split(root, s, lang=lang, check_images=check_images) for s in splits}

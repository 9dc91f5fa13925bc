"""Scoring explanation methods against ground-truth lesion masks of generated studies.

For every study with a lesion and every method: Dice and IoU of the method's adaptive mask, AUPRC
of the continuous map (over brain voxels), and the pointing game (peak inside the lesion, with a
tolerance of one model-grid voxel, 3 mm by default, because maps come from a coarser grid).
The explained class is the study's true lesion class: localisation is scored for the finding that
is really there, whatever the model predicted (its prediction is recorded next to it).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .data.brain import read_manifest
from .io import Image, read_image
from .metrics import bootstrap_ci, dice, expected_calibration_error, per_class_auroc
from .models import ModelAdapter
from .models import load as load_model
from .settings import Settings

METRICS = ("dice", "iou", "auprc", "pointing_game")


def read_mask(path: str | Path) -> Image:
    """A label volume (may be all zero, unlike an image) as uint8."""
    return Image.from_sitk(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkUInt8), source=str(path))


def evaluate_methods(methods: Sequence[str], data_dir: str | Path, model: ModelAdapter | None = None,
                     limit: int | None = None, tolerance_mm: float | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     method_kwargs: dict[str, dict] | None = None, settings: Settings | None = None) -> list[dict]:
    """One row per (study with a lesion, method) with the four metrics and the prediction.
    ``method_kwargs`` maps a method name to its explainer parameters. Runs
    :func:`xai_core.engines.explain_study` on the local engine (localisation only)."""
    from .engines import Task, run_local

    cfg = settings or Settings()
    model = model or load_model("brain-lesion-3d", settings=cfg)
    rows = [r for r in read_manifest(data_dir) if r["label"] != "none"][:limit]
    task = Task(methods=list(methods), method_kwargs=dict(method_kwargs or {}), tolerance_mm=tolerance_mm,
                faithfulness=False)
    keep = ("study_id", "label", "format", "method", "predicted", *METRICS, "mask_empty", "seconds")
    return [{k: r[k] for k in keep} for r in run_local(rows, task, cfg, model=model, progress=progress)
            if r["table"] == "cases"]


def cohort_rows(data_dir: str | Path, limit: int | None = None, lesion_only: bool = True) -> list[dict]:
    """Manifest rows of ``data_dir`` (those with a lesion when ``lesion_only``), at most ``limit``."""
    rows = [r for r in read_manifest(data_dir) if not lesion_only or r["label"] != "none"]
    return rows[:limit]


def evaluate_cohort(methods: Sequence[str], data_dir: str | Path, *, limit: int | None = None,
                    engine: str = "local", address: str | None = None, workers: int | None = None,
                    faithfulness: bool = True, insertion: bool = False, sanity_studies: int = 3,
                    examples: int = 3, method_kwargs: dict[str, dict] | None = None, model: str = "brain-lesion-3d",
                    progress: Callable[[int, int], None] | None = None,
                    settings: Settings | None = None) -> dict[str, Any]:
    """Everything the evaluation report shows, for the lesion studies of ``data_dir``.

    Every study is explained by every method (target: the true lesion class) and scored: Dice, IoU,
    AUPRC, pointing game, deletion curves (MoRF / LeRF, and insertion with ``insertion``) with their
    areas and AOPC, and seconds per volume. The first ``sanity_studies`` studies also get the
    randomisation cascade of every method, and the first ``examples`` studies return slices for the
    overlay grid. ``engine`` is ``local`` or ``ray`` (:mod:`xai_core.engines`; identical numbers).

    Returns:
        ``{"cases", "curves", "sanity", "examples": lists of rows, "engine": {...}, "n_studies": int}``.
    """
    from .engines import Task, run, tables

    cfg = settings or Settings()
    rows = cohort_rows(data_dir, limit)
    if not rows:
        raise ValueError(f"no studies with a lesion in {data_dir}")
    curves = ("deletion_morf", "deletion_lerf") + (("insertion_morf", "insertion_lerf") if insertion else ())
    task = Task(methods=list(methods), model=model, method_kwargs=dict(method_kwargs or {}),
                faithfulness=faithfulness, curves=curves,
                sanity_ids=tuple(r["study_id"] for r in rows[:sanity_studies]),
                example_ids=tuple(r["study_id"] for r in rows[:examples]))
    stats: dict[str, Any] = {"engine": engine}
    out = tables(run(rows, task, cfg, engine=engine, address=address, workers=workers, progress=progress,
                     stats=stats))
    for key in ("cases", "curves", "sanity", "examples"):
        out.setdefault(key, [])
    out["engine"] = {k: v for k, v in stats.items() if k != "study_s"}
    out["n_studies"] = len(rows)
    out["task"] = task.to_dict()
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and 95 % bootstrap CI per method and metric."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        rec = {"method": method, "n": len(sel)}
        for m in METRICS:
            mean, lo, hi = bootstrap_ci([r[m] for r in sel])
            rec.update({m: mean, f"{m}_ci_low": lo, f"{m}_ci_high": hi})
        out.append(rec)
    return out


def write_results(rows: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """``per_study.csv``, ``summary.csv`` and ``summary.md`` (a Markdown table) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    paths = {"per_study": out_dir / "per_study.csv", "summary_csv": out_dir / "summary.csv",
             "summary_md": out_dir / "summary.md"}
    for path, data in ((paths["per_study"], rows), (paths["summary_csv"], summary)):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
    lines = ["| method | n | Dice | IoU | AUPRC | pointing game |", "|---|---|---|---|---|---|"]
    for s in summary:
        cells = [f"{s[m]:.3f} [{s[m + '_ci_low']:.3f}, {s[m + '_ci_high']:.3f}]" for m in METRICS]
        lines.append(f"| {s['method']} | {s['n']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Mean [95 % bootstrap CI] over studies with a lesion; target = true lesion class.")
    paths["summary_md"].write_text("\n".join(lines) + "\n")
    return paths


def model_accuracy(data_dir: str | Path, model: ModelAdapter | None = None, limit: int | None = None) -> dict:
    """Classification and segmentation-head figures of ``model`` on the studies of ``data_dir``, on
    each study's input grid: accuracy (overall and per class), lesion-versus-none sensitivity and
    specificity, mean lesion Dice (overall and per class, lesion studies only), one-vs-rest AUROC per
    class and the calibrated top-label ECE."""
    model = model or load_model("brain-lesion-3d")
    rows = read_manifest(data_dir)[:limit]
    per = []
    for r in rows:
        pred = model.predict(read_image(r["image"]))
        d = None
        if r["label"] != "none":
            d = dice(pred.lesion_mask.array, read_mask(r["mask"]).array)
        per.append({"study_id": r["study_id"], "label": r["label"], "predicted": pred.label, "dice": d,
                    "probabilities": [float(p) for p in pred.probabilities]})
    classes = list(model.classes)
    labels = np.array([classes.index(p["label"]) for p in per], dtype=int)
    probs = np.array([p["probabilities"] for p in per], dtype=float).reshape(len(per), len(classes))
    correct = np.array([p["predicted"] == p["label"] for p in per], dtype=bool)
    dices = [p["dice"] for p in per if p["dice"] is not None]
    present = [c for c in classes if any(p["label"] == c for p in per)]
    lesion = np.array([p["label"] != "none" for p in per], dtype=bool)
    called = np.array([p["predicted"] != "none" for p in per], dtype=bool)
    return {
        "n": len(per),
        "accuracy": float(correct.mean()) if per else float("nan"),
        # Lesion versus none, whatever the class: a lesion called the wrong kind is still found.
        "sensitivity": float(called[lesion].mean()) if lesion.any() else float("nan"),
        "specificity": float((~called[~lesion]).mean()) if (~lesion).any() else float("nan"),
        "mean_dice": float(np.mean(dices)) if dices else float("nan"),
        "accuracy_per_class": {c: float(correct[labels == classes.index(c)].mean()) for c in present},
        "dice_per_class": {c: float(np.mean([p["dice"] for p in per if p["label"] == c]))
                           for c in present if c != "none"},
        "auroc": per_class_auroc(probs, labels, classes) if per else {},
        "ece_calibrated": expected_calibration_error(probs, labels) if per else float("nan"),
        "per_study": per,
    }

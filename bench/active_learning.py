"""Corrected labels in a condition the model handles badly: Dice after 0, 5, 10, 20 labels, picked by
the ``least_sure`` strategy or at random (issue 18 item 5).

    python bench/active_learning.py --condition skull_t1 --out runs/bench_al/skull_t1
    python bench/active_learning.py --condition t2 --budgets 0 5 10 20 --repeats 3 --out runs/bench_al/t2

For a condition (``--condition``, see :data:`CONDITIONS`) it generates, once (kept in ``--data``):
a pool of studies to label (``--pool``, seed 7100), held-out studies of the same condition
(``--heldout``, seed 7200) and held-out studies of the original condition (skull-stripped T1,
``--original``, seed 7300). The generator's ground-truth masks stand in for a radiologist's corrected
labels. For each strategy and label budget it picks that many pool studies, fine-tunes the shipped
model on them exactly as ``POST /train/seg_head_finetune`` does (``lib.trainers.finetune.finetune``
with the guard: weights that are not better on validation are not published, so the base model
stays), and scores the result on both held-out sets (segmentation-head lesion Dice on the model
grid, lesion studies only).

``least_sure`` ranks the pool once with the base model (batch selection: the top-k of one ranking);
``random`` draws ``--repeats`` seeded permutations. Writes ``<out>/results.json``, ``<out>/results.csv``,
``<out>/active_learning.png`` and prints the markdown table for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "monai_app"))  # the app's modules import as lib.* (as MONAI Label loads them)

from lib.activelearning.uncertainty import score_study  # noqa: E402
from lib.trainers.finetune import FinetuneSettings, Sample, dice_per_sample, finetune, to_sample  # noqa: E402

from xai_core.data.brain import BrainOptions, make_brain_studies, read_manifest  # noqa: E402
from xai_core.io import Image, read_image  # noqa: E402
from xai_core.models import LesionModel, load  # noqa: E402
from xai_core.settings import Settings  # noqa: E402

# Weak conditions of the shipped model (docs/data.md, baseline per condition) and the original one.
CONDITIONS: dict[str, BrainOptions] = {
    "skull_t1": BrainOptions(skull="on"),
    "t2": BrainOptions(contrasts=("t2",)),
    "flair": BrainOptions(contrasts=("flair",)),
    "skull_t2": BrainOptions(skull="on", contrasts=("t2",)),
    "original": BrainOptions(),
}
SEEDS = {"pool": 7100, "heldout": 7200, "original": 7300}


def studies(folder: Path, n: int, seed: int, options: BrainOptions, workers: int) -> list[dict]:
    """The manifest rows of ``n`` generated studies in ``folder`` (generated when missing)."""
    if not (folder / "manifest.csv").is_file():
        t = time.time()
        make_brain_studies(n, seed, folder, workers=workers, options=options)
        print(f"generated {n} studies in {folder} ({time.time() - t:.0f} s)", flush=True)
    rows = read_manifest(folder)
    if len(rows) < n:
        raise SystemExit(f"{folder} holds {len(rows)} studies, {n} asked: remove it or lower the count")
    return rows[:n]


def samples(model: LesionModel, rows: list[dict]) -> list[Sample]:
    import SimpleITK as sitk

    out = []
    for r in rows:
        image = read_image(r["image"])
        # Masks of lesion-free studies are all zero, which read_image rightly refuses for an image.
        mask = Image.from_sitk(sitk.ReadImage(r["mask"]))
        out.append(to_sample(model, image, mask, key=Path(r["image"]).name))
    return out


def lesion_dice(model: LesionModel, state: dict | None, evaluate: list[Sample]) -> float:
    net = model.net
    if state is not None:
        net = type(net)(**model.card.arch_kwargs).eval()
        net.load_state_dict(state)
    with_lesion = [s for s in evaluate if s.m.any()]
    return float(np.mean(dice_per_sample(net, with_lesion, model.device)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--condition", default="skull_t1", choices=sorted(c for c in CONDITIONS if c != "original"))
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "bench_al")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_al")
    ap.add_argument("--pool", type=int, default=40)
    ap.add_argument("--heldout", type=int, default=20)
    ap.add_argument("--original", type=int, default=20)
    ap.add_argument("--budgets", type=int, nargs="+", default=[0, 5, 10, 20])
    ap.add_argument("--strategies", nargs="+", default=["least_sure", "random"], choices=["least_sure", "random"])
    ap.add_argument("--repeats", type=int, default=1, help="random draws (and fine-tune seeds) per budget")
    ap.add_argument("--parts", default="head", choices=["head", "last_stages", "all"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-epochs", type=int, default=40)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    settings = Settings()
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    opts = CONDITIONS[args.condition]
    pool_rows = studies(args.data / f"{args.condition}_pool", args.pool, SEEDS["pool"], opts, args.workers)
    held_rows = studies(args.data / f"{args.condition}_heldout", args.heldout, SEEDS["heldout"], opts, args.workers)
    orig_rows = studies(args.data / "original_heldout", args.original, SEEDS["original"], CONDITIONS["original"],
                        args.workers)
    # The shipped weights, not a fine-tuned copy in the user weights folder.
    model = load("brain-lesion-3d", weights_dir=settings.weights_dir, settings=settings)
    print(f"model {model.card.name} {model.card.version}, condition {args.condition}", flush=True)
    pool, held, orig = samples(model, pool_rows), samples(model, held_rows), samples(model, orig_rows)

    t = time.time()
    scores = {s.key: asdict(score_study(model, read_image(r["image"]), settings=settings))
              for s, r in zip(pool, pool_rows, strict=True)}
    ranked = sorted(range(len(pool)), key=lambda i: (-scores[pool[i].key]["score"], pool[i].key))
    print(f"scored the pool in {time.time() - t:.0f} s", flush=True)

    base = {"heldout": lesion_dice(model, None, held), "original": lesion_dice(model, None, orig)}
    rows: list[dict] = []
    for strategy in args.strategies:
        for rep in range(args.repeats if strategy == "random" else 1):
            order = ranked if strategy == "least_sure" else np.random.default_rng(rep).permutation(len(pool)).tolist()
            for budget in args.budgets:
                rec = {"condition": args.condition, "strategy": strategy, "repeat": rep, "labels": budget,
                       "published": False, "val_before": None, "val_after": None, "seconds": 0.0}
                state = None
                if budget >= 2:
                    picked = [pool[i] for i in order[:budget]]
                    cfg = FinetuneSettings(parts=args.parts, lr=args.lr, max_epochs=args.max_epochs, seed=rep)
                    t = time.time()
                    out = finetune(model, picked, cfg)
                    rec.update(published=out.better, val_before=round(out.before, 4), val_after=round(out.after, 4),
                               scheme=out.scheme, seconds=round(time.time() - t, 1))
                    state = out.state  # None when the guard kept the base model
                rec["heldout_dice"] = round(base["heldout"] if state is None else lesion_dice(model, state, held), 4)
                rec["original_dice"] = round(base["original"] if state is None else lesion_dice(model, state, orig), 4)
                rows.append(rec)
                print(json.dumps(rec), flush=True)

    summary = {"condition": args.condition, "model": f"{model.card.name}@{model.card.version}",
               "base": base, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
               "pool_scores": scores}
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    plot(rows, args.out / "active_learning.png", args.condition)
    print(table(rows))
    return 0


def mean_by(rows: list[dict], key: str) -> dict[tuple[str, int], float]:
    out: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        out.setdefault((r["strategy"], r["labels"]), []).append(r[key])
    return {k: float(np.mean(v)) for k, v in out.items()}


def table(rows: list[dict]) -> str:
    held, orig = mean_by(rows, "heldout_dice"), mean_by(rows, "original_dice")
    lines = ["| strategy | labels | Dice, held-out (condition) | Dice, original condition |", "|---|---|---|---|"]
    for (strategy, labels), v in sorted(held.items()):
        lines.append(f"| {strategy} | {labels} | {v:.3f} | {orig[(strategy, labels)]:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, condition: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, key, title in ((axes[0], "heldout_dice", f"held-out, {condition}"),
                           (axes[1], "original_dice", "held-out, original condition")):
        means = mean_by(rows, key)
        for strategy in sorted({s for s, _ in means}):
            pts = sorted((n, v) for (s, n), v in means.items() if s == strategy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=strategy)
        ax.set_title(title)
        ax.set_xlabel("corrected labels")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("lesion Dice (segmentation head)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())

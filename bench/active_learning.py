"""Corrected labels in a condition the shipped model handles badly: segmentation Dice after 0, 5, 10
and 20 labels, picked by the ``least_sure`` strategy or at random (issue 18 item 5).

    nice -n 19 python bench/active_learning.py --out runs/al            # skull-on T1 (the default)

The weak condition is skull-on T1 (``brain-lesion-3d`` 1.2.0 was trained on skull-stripped T1). Data,
all from the project's generator (``xai data make-brain``; nothing downloaded):

* ``--pool``: studies to correct, skull-on T1; their ground-truth masks stand in for a radiologist's
  corrected labels (made with ``xai data make-brain --n 40 --seed 7100 --templates icbm09a
  --skull on --contrasts t1 --out data/al/pool_on_t1``);
* ``--heldout``: held-out studies of the weak condition (``data/r16/held/on_t1``, seed 6002);
* ``--original``: held-out studies of the original condition (``data/heldout``, skull-off T1, seed 3000);
* ``--replay``: studies of the original condition for rehearsal and for the guard's check: the first
  ``--replay-n`` are rehearsed in every mini-batch, the next ``--check-n`` are the guard's held-out
  check (``data/val``, seed 2000, the same generator and condition as the trainer's own replay set;
  the server generates its own, ``lib.trainers.seg_head.replay_sets``). ``--check DIR`` takes the
  check from another folder, after its first ``--check-skip`` studies (a larger rehearsal set, e.g.
  ``data/al/replay_orig64``, ``xai data make-brain --n 64 --seed 9300 --out data/al/replay_orig64``, with
  the same check as before: ``--check data/val --check-skip 16``; the trainer's defaults since session 9
  rehearse 64).

For each strategy and label budget it fine-tunes the shipped model on that many pool studies exactly
as ``POST /train/seg_head_finetune`` does (``lib.trainers.finetune.finetune`` with rehearsal and the
guard: weights that are not better on the validation labels, or lose more than ``max_original_drop``
on the check set, are not published and the base model stays), and scores the model that would
serve on both held-out sets (segmentation-head lesion Dice on the model grid, lesion studies only).
It also scores the weights the guard judged (``candidate_*``), published or not.

``least_sure`` ranks the pool once with the base model (batch selection: the top k of one ranking);
``random`` draws seeded permutations (``--repeats``). Every finished row is written to
``<out>/results.json`` at once; a rerun skips the rows already there. ``--plot-only`` redraws the
plot and table from it. Writes ``<out>/results.json``, ``<out>/active_learning.png`` and prints the
markdown table for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "monai_app"))  # the app's modules import as lib.* (as MONAI Label loads them)

from lib.activelearning.uncertainty import score_study  # noqa: E402
from lib.trainers.finetune import FinetuneSettings, Sample, dice_per_sample, finetune, to_sample  # noqa: E402

from xai_core.io import Image, read_image  # noqa: E402
from xai_core.models import LesionModel, build_network, load  # noqa: E402
from xai_core.settings import Settings  # noqa: E402

DATA = ROOT / "data"


def manifest(folder: Path) -> list[dict]:
    """``study_id``, ``image``, ``mask`` (absolute) of the rows of ``folder/manifest.csv``: all this
    needs, so that a manifest of only those columns (a pool whose generation was cut short) reads too."""
    with open(folder / "manifest.csv", newline="") as f:
        return [{"study_id": r["study_id"], "image": str(folder / r["image"]), "mask": str(folder / r["mask"])}
                for r in csv.DictReader(f)]


def samples(model: LesionModel, folder: Path, n: int | None = None, skip: int = 0) -> list[Sample]:
    import SimpleITK as sitk

    rows = manifest(folder)[skip:]
    rows = rows[:n] if n is not None else rows
    out = []
    for r in rows:
        image = read_image(r["image"])
        # Masks of lesion-free studies are all zero, which read_image rightly refuses for an image.
        mask = Image.from_sitk(sitk.ReadImage(r["mask"]))
        out.append(to_sample(model, image, mask, key=r["study_id"]))
    return out


def lesion_dice(model: LesionModel, state: dict | None, evaluate: list[Sample]) -> float:
    net = model.net
    if state is not None:
        net = build_network(model.card).eval()
        net.load_state_dict(state)
    with_lesion = [s for s in evaluate if s.m.any()]
    return float(np.mean(dice_per_sample(net, with_lesion, model.device)))


def key_of(rec: dict) -> tuple:
    return rec["strategy"], rec["repeat"], rec["labels"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=Path, default=DATA / "al" / "pool_on_t1")
    ap.add_argument("--pool-n", type=int, default=None, help="pool studies used (default: all)")
    ap.add_argument("--heldout", type=Path, default=DATA / "r16" / "held" / "on_t1")
    ap.add_argument("--heldout-n", type=int, default=None, help="held-out studies used (default: all)")
    ap.add_argument("--original", type=Path, default=DATA / "heldout")
    ap.add_argument("--original-n", type=int, default=None, help="original-condition studies used (default: all)")
    ap.add_argument("--replay", type=Path, default=DATA / "val")
    ap.add_argument("--replay-n", type=int, default=16)
    ap.add_argument("--check-n", type=int, default=8)
    ap.add_argument("--check", type=Path, default=None, help="check-set folder (default: --replay, after --replay-n)")
    ap.add_argument("--check-skip", type=int, default=None,
                    help="studies of --check skipped (default: --replay-n when --check is --replay, else 0)")
    ap.add_argument("--condition", default="skull-on T1", help="name of the weak condition (table, plot)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "al")
    ap.add_argument("--budgets", type=int, nargs="+", default=[0, 5, 10, 20])
    ap.add_argument("--strategies", nargs="+", default=["least_sure", "random"], choices=["least_sure", "random"])
    ap.add_argument("--repeats", type=int, default=2, help="random draws per budget")
    ap.add_argument("--repeat-from", type=int, default=0,
                    help="first random draw (draws repeat-from .. repeats-1: split draws across processes)")
    ap.add_argument("--settings", default="{}", help="JSON of FinetuneSettings fields over the defaults")
    ap.add_argument("--seed", type=int, default=0, help="fine-tune seed of draw 0 (draw k: seed + k)")
    ap.add_argument("--save-candidates", action="store_true",
                    help="also write each judged candidate's weights to OUT/candidates/<strategy>_<repeat>_<labels>.pt")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / "results.json"
    summary = json.loads(out_json.read_text()) if out_json.is_file() else {}
    if args.plot_only:
        plot(summary["rows"], args.out / "active_learning.png", summary)
        print(table(summary["rows"], summary))
        return 0
    settings = Settings()
    torch.set_num_threads(settings.num_threads or 1)
    cfg = replace(FinetuneSettings(), **json.loads(args.settings))
    # The shipped weights, not a fine-tuned copy in the user weights folder.
    model = load("brain-lesion-3d", weights_dir=settings.weights_dir, settings=settings)
    print(f"model {model.card.name} {model.card.version}; settings {cfg.as_dict()}", flush=True)
    t = time.time()
    pool = samples(model, args.pool, args.pool_n)
    held, orig = samples(model, args.heldout, args.heldout_n), samples(model, args.original, args.original_n)
    replay = samples(model, args.replay, args.replay_n) if cfg.replay_per_batch else []
    check_dir = args.check or args.replay
    skip = args.check_skip if args.check_skip is not None else (args.replay_n if check_dir == args.replay else 0)
    check = samples(model, check_dir, args.check_n, skip=skip)
    print(f"read {len(pool)} pool, {len(held)} + {len(orig)} held-out, {len(replay)} replay, {len(check)} check "
          f"studies ({time.time() - t:.0f} s)", flush=True)

    if summary and (summary.get("settings") != cfg.as_dict() or summary.get("pool_n") != len(pool)):
        raise SystemExit(f"{out_json} holds rows of other settings or another pool: move it away")
    data = {k: str(getattr(args, k)) for k in ("pool", "heldout", "original", "replay")}
    summary.update(model=f"{model.card.name}@{model.card.version}", condition=args.condition, settings=cfg.as_dict(),
                   pool_n=len(pool), data={**data, "check": f"{check_dir} after {skip}"},
                   n={"pool": len(pool), "heldout_lesion": sum(bool(s.m.any()) for s in held),
                      "original_lesion": sum(bool(s.m.any()) for s in orig), "replay": len(replay),
                      "check": len(check)},
                   command=" ".join(sys.argv))
    summary.setdefault("rows", [])

    def save() -> None:
        tmp = out_json.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(out_json)

    if "base" not in summary:
        summary["base"] = {"heldout": lesion_dice(model, None, held), "original": lesion_dice(model, None, orig)}
        save()
        print(f"base model: {summary['base']}", flush=True)
    base = summary["base"]
    if "pool_scores" not in summary and "least_sure" in args.strategies and max(args.budgets) >= 2:
        t = time.time()
        summary["pool_scores"] = {s.key: asdict(score_study(model, read_image(r["image"]), settings=settings))
                                  for s, r in zip(pool, manifest(args.pool), strict=False)}
        summary["scoring_seconds"] = round(time.time() - t, 1)
        save()
        print(f"scored the pool in {time.time() - t:.0f} s", flush=True)
    scores = summary.get("pool_scores", {})
    ranked = sorted(range(len(pool)), key=lambda i: (-scores.get(pool[i].key, {}).get("score", 0.0), pool[i].key))
    done = {key_of(r) for r in summary["rows"]}
    draws = range(args.repeat_from, args.repeats)
    plan = [(s, rep) for s in args.strategies for rep in (draws if s == "random" else [0])]
    for budget in args.budgets:  # budget-major: every strategy has its 5-label row before any 20-label row
        for strategy, rep in plan:
            rec = {"strategy": strategy, "repeat": rep, "labels": budget}
            if key_of(rec) in done:
                continue
            order = ranked if strategy == "least_sure" else np.random.default_rng(rep).permutation(len(pool)).tolist()
            rec.update(published=False, reason="no labels", val_before=None, val_after=None, seconds=0.0)
            state = candidate = None
            if budget >= 2:
                picked = [pool[i] for i in order[:budget]]
                t = time.time()
                out = finetune(model, picked, replace(cfg, seed=args.seed + rep), replay=replay, replay_check=check)
                rec.update(picked=[s.key for s in picked], published=out.better, reason=out.reason,
                           val_before=round(out.before, 4), val_after=round(out.after, 4), scheme=out.scheme,
                           final_epochs=out.final_epochs, check=out.original(), alpha=out.alpha,
                           interpolation=out.interpolation, seconds=round(time.time() - t, 1))
                state, candidate = out.state, out.candidate
            rec["heldout_dice"] = round(base["heldout"] if state is None else lesion_dice(model, state, held), 4)
            rec["original_dice"] = round(base["original"] if state is None else lesion_dice(model, state, orig), 4)
            if candidate is not None and args.save_candidates:
                (args.out / "candidates").mkdir(exist_ok=True)
                torch.save(candidate, args.out / "candidates" / f"{strategy}_{rep}_{budget}.pt")
            if candidate is not None:
                rec["candidate_heldout_dice"] = round(lesion_dice(model, candidate, held), 4)
                rec["candidate_original_dice"] = round(lesion_dice(model, candidate, orig), 4)
            summary["rows"].append(rec)
            save()
            print(json.dumps({k: v for k, v in rec.items() if k != "picked"}), flush=True)
    plot(summary["rows"], args.out / "active_learning.png", summary)
    print(table(summary["rows"], summary))
    return 0


def mean_by(rows: list[dict], key: str) -> dict[tuple[str, int], tuple[float, int]]:
    out: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r.get(key) is not None:
            out.setdefault((r["strategy"], r["labels"]), []).append(r[key])
    return {k: (float(np.mean(v)), len(v)) for k, v in out.items()}


def table(rows: list[dict], summary: dict) -> str:
    held, orig = mean_by(rows, "heldout_dice"), mean_by(rows, "original_dice")
    cand_h, cand_o = mean_by(rows, "candidate_heldout_dice"), mean_by(rows, "candidate_original_dice")
    pub: dict[tuple[str, int], list[bool]] = {}
    alphas: dict[tuple[str, int], list[str]] = {}
    for r in rows:
        pub.setdefault((r["strategy"], r["labels"]), []).append(bool(r["published"]))
        if r["published"] and r.get("alpha") is not None:
            alphas.setdefault((r["strategy"], r["labels"]), []).append(f"{r['alpha']:g}")
    weak = summary.get("condition", "skull-on T1")
    lines = [f"| strategy | labels | runs | published | Dice, held-out {weak} | Dice, original condition "
             f"| judged weights: {weak} / original | alpha published |", "|---|---|---|---|---|---|---|---|"]
    for (strategy, labels), (v, n) in sorted(held.items(), key=lambda t: (t[0][1], t[0][0])):
        c = (f"{cand_h[(strategy, labels)][0]:.3f} / {cand_o[(strategy, labels)][0]:.3f}"
             if (strategy, labels) in cand_h else "-")
        a = ", ".join(alphas.get((strategy, labels), [])) or "-"
        lines.append(f"| {strategy} | {labels} | {n} | {sum(pub[(strategy, labels)])}/{n} | {v:.3f} | "
                     f"{orig[(strategy, labels)][0]:.3f} | {c} | {a} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    weak = summary.get("condition", "skull-on T1")
    for ax, key, title in ((axes[0], "heldout_dice", f"held-out, {weak} (weak)"),
                           (axes[1], "original_dice", "held-out, skull-off T1 (original)")):
        means = mean_by(rows, key)
        for strategy in sorted({s for s, _ in means}):
            pts = sorted((n, v[0]) for (s, n), v in means.items() if s == strategy)
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{strategy} (mean)")
            runs = [(r["labels"], r[key]) for r in rows if r["strategy"] == strategy and r.get(key) is not None]
            # Every run, faint: random draws and fine-tune seeds spread more than the means differ.
            ax.scatter([x for x, _ in runs], [y for _, y in runs], s=10, alpha=0.4, color=line.get_color())
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:  # a scale of Dice, not of the spread: a change of 0.001 must not look like a fall
            ax.set_ylim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.05))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("corrected labels")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("lesion Dice (segmentation head)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{summary.get('model', '')}: fine-tune on corrected labels with rehearsal", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

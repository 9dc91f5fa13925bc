"""Choose RE-LIG's layer and the display of RE-LIG and IG by localisation on the VALIDATION set.

For each of the first ``--n`` studies with a lesion in ``--data`` (default ``data/val``, made by
``xai data make-brain --n 64 --seed 2000 --out data/val``; never the held-out set) and the true
lesion class as target, runs on the default model:

* ``relig`` at each ``--layers`` candidate (``model.explainer("relig", layer=...)``, so the
  sequential stages take the ``forward_from`` fast path), and ``ig`` on the voxels;
* Grad-CAM++ as the reference the other methods sit beside.

Each path method's raw attribution is turned into both display views, ``positive`` (evidence for
the class only) and ``absolute`` (magnitude of either sign), exactly as the pipeline does it: the
0..1 view on the model grid, mapped to the input grid (``model.to_input``), rescaled to a maximum of
1, then scored against the ground-truth mask with AUPRC inside the brain foreground
(:func:`xai_core.metrics.auprc`) and Dice of the adaptive mask (:func:`xai_core.masks.saliency_mask`
with the settings' bounds). One attribution serves both views.

Rows are appended to ``--jsonl`` as they come (a long run can be resumed: finished studies are
skipped); the table (mean and 95 % bootstrap CI per method, layer and display) goes to stdout and
``--out``.

Usage: ``python bench/relig_layer.py [--data data/val] [--n 16] [--layers stem,down1,down2]
[--samples 8] [--steps 16] [--ig-steps 32] [--jsonl runs/relig_layer.jsonl] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xai_core.data.brain import read_manifest  # noqa: E402
from xai_core.evaluate import read_mask  # noqa: E402
from xai_core.explain import display_view  # noqa: E402
from xai_core.io import read_image  # noqa: E402
from xai_core.masks import saliency_mask  # noqa: E402
from xai_core.metrics import auprc, dice  # noqa: E402
from xai_core.models import load  # noqa: E402
from xai_core.pipeline import brain_foreground  # noqa: E402
from xai_core.settings import Settings  # noqa: E402


def score(raw: torch.Tensor, display: str, model: Any, inputs: Any, image: Any, truth: np.ndarray,
          fg: np.ndarray, cfg: Settings) -> dict[str, float]:
    """AUPRC and mask Dice of one raw attribution ``(1, 1, C, *grid)`` shown as ``display``."""
    maps, flat, _ = display_view(raw, display)
    sal = model.to_input(maps[0], inputs)[0].array
    hi = float(sal.max())
    sal = np.clip(sal / hi, 0, 1) if hi > 0 else np.zeros_like(sal)
    sm = saliency_mask(sal, fg, spacing=tuple(image.spacing[::-1]), min_fraction=cfg.mask_min_fraction,
                       max_fraction=cfg.mask_max_fraction, levels_percent=cfg.mask_levels_percent)
    return {"auprc": auprc(sal, truth, within=fg), "dice": dice(sm.mask, truth), "flat": bool(flat.any())}


def bootstrap(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    v = np.asarray(values, float)
    rng = np.random.default_rng(seed)
    means = rng.choice(v, size=(n, v.size)).mean(1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/val"))
    p.add_argument("--n", type=int, default=16, help="first N studies with a lesion")
    p.add_argument("--layers", default="stem,down1,down2")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--stdev-fraction", type=float, default=0.1)
    p.add_argument("--ig-steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jsonl", type=Path, default=Path("runs/relig_layer.jsonl"))
    p.add_argument("--only-relig", action="store_true", help="skip the Grad-CAM++ and IG rows")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if "heldout" in str(a.data):
        raise SystemExit("choose on the validation set, never the held-out one")
    torch.set_num_threads(a.threads)
    cfg = Settings()
    model = load("brain-lesion-3d", device="cpu", weights_dir=cfg.weights_dir)
    rows = [r for r in read_manifest(a.data) if r["label"] != "none"][:a.n]
    a.jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if a.jsonl.exists():
        done = {(d["study_id"], d["method"], d["layer"], d["stdev_fraction"])
                for d in map(json.loads, a.jsonl.read_text().splitlines())}
    runs: list[tuple[str, str | None, dict[str, Any], tuple[str, ...]]] = [
        ("gradcam++", model.card.cam_layer, {}, ("minmax",)),
        ("ig", None, {"n_steps": a.ig_steps}, ("positive", "absolute")),
    ][2 if a.only_relig else 0:] + [("relig", layer, {"layer": layer, "n_samples": a.samples, "n_steps": a.steps,
                           "stdev_fraction": a.stdev_fraction}, ("positive", "absolute"))
         for layer in a.layers.split(",")]
    for k, r in enumerate(rows):
        image = read_image(r["image"])
        truth = read_mask(r["mask"]).array.astype(bool)
        inputs = model.prepare(image)
        fg = brain_foreground(image)
        target = model.classes.index(r["label"])
        for method, layer, params, displays in runs:
            frac = params.get("stdev_fraction")
            if (r["study_id"], method, layer, frac) in done:
                continue
            t0 = time.perf_counter()
            att = model.explainer(method, **params).attribute(inputs.inputs, target=[[target]])
            seconds = time.perf_counter() - t0
            rec = {"study_id": r["study_id"], "label": r["label"], "method": method, "layer": layer,
                   "stdev_fraction": frac, "n_samples": params.get("n_samples"), "n_steps": params.get("n_steps"),
                   "seconds": seconds,
                   "delta": float(att.delta[0, 0]) if att.delta is not None else None,
                   **{d: score(att.raw[0], d, model, inputs, image, truth, fg, cfg) for d in displays}}
            with a.jsonl.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"[{k + 1}/{len(rows)}] {r['study_id']} {method} {layer}: "
                  + ", ".join(f"{d} AUPRC {rec[d]['auprc']:.3f} Dice {rec[d]['dice']:.3f}" for d in displays)
                  + f" ({seconds:.1f} s)", file=sys.stderr, flush=True)

    ids = {r["study_id"] for r in rows}
    groups: dict[tuple[str, str | None, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for d in map(json.loads, a.jsonl.read_text().splitlines()):
        if d["study_id"] not in ids or d["stdev_fraction"] not in (None, a.stdev_fraction):
            continue
        for disp in ("minmax", "positive", "absolute"):
            if disp in d:
                g = groups[(d["method"], d["layer"], disp)]
                for key in ("auprc", "dice"):
                    g[key].append(d[disp][key])
                g["seconds"].append(d["seconds"])
                if d["delta"] is not None:
                    g["abs_delta"].append(abs(d["delta"]))
    lines = [f"Validation studies with a lesion: {len(rows)} (first of `{a.data}`); RE-LIG {a.samples} samples x "
             f"{a.steps} steps, stdev_fraction {a.stdev_fraction}; IG {a.ig_steps} steps; target = true class.",
             "",
             "| method | layer | display | n | AUPRC | Dice (adaptive mask) | mean abs delta | s / study |",
             "|---|---|---|---|---|---|---|---|"]
    for (method, layer, disp), g in groups.items():
        au, dc = bootstrap(g["auprc"]), bootstrap(g["dice"])
        delta = f"{np.mean(g['abs_delta']):.4f}" if g["abs_delta"] else "-"
        lines.append(f"| {method} | {layer or '-'} | {disp} | {len(g['auprc'])} "
                     f"| {au[0]:.3f} [{au[1]:.3f}, {au[2]:.3f}] | {dc[0]:.3f} [{dc[1]:.3f}, {dc[2]:.3f}] "
                     f"| {delta} | {np.mean(g['seconds']):.1f} |")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

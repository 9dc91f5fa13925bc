"""Choose the adaptive threshold rule of :mod:`xai_core.masks` on a validation set.

For every lesion study of a generated set, explains the true class with each method once, then
thresholds the same map with several candidate rules and scores each mask against the ground truth
(Dice). The "oracle" row is the best threshold per map in hindsight: the ceiling any rule that only
sees the map could reach. Run it on the validation set (``data/val``), never on the held-out set
the figures are reported on.

Rules (fractions of the brain foreground ``F``; every rule works on the map's own distribution):

* ``otsu``:        Otsu on ``F``, clamped to ``[min_fraction, max_fraction]`` (the shipped rule,
  :func:`xai_core.masks.adaptive_threshold`).
* ``otsu2``:       Otsu again on the values above the first Otsu threshold (two-level Otsu), same clamp.
* ``max<a>``:      ``map >= a * max`` (a in 0.3 .. 0.7), same clamp.

The clamp is the library's (:func:`xai_core.masks.clamp_threshold`, ties and all), so the rules
differ only in their candidate threshold. The bounds are ``Settings.mask_min_fraction`` /
``mask_max_fraction``, as in :func:`xai_core.pipeline.explain`.

Usage::

    python bench/mask_rule.py --data data/val --methods gradcam gradcam++ [--limit N] [--out runs/mask_rule]
        [--weights-dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xai_core.data.brain import read_manifest  # noqa: E402
from xai_core.evaluate import read_mask  # noqa: E402
from xai_core.io import read_image  # noqa: E402
from xai_core.masks import adaptive_threshold, clamp_threshold  # noqa: E402
from xai_core.metrics import dice  # noqa: E402
from xai_core.models import load as load_model  # noqa: E402
from xai_core.pipeline import explain  # noqa: E402
from xai_core.settings import Settings  # noqa: E402

RULES = ("otsu", "otsu2", "max0.3", "max0.4", "max0.5", "max0.6", "max0.7")


def candidate_thresholds(vals: np.ndarray, lo: float, hi: float) -> dict[str, float]:
    """Threshold per rule from the sorted foreground values of one map (``map >= t`` is the mask),
    each clamped to ``lo`` .. ``hi`` of the values by the library's rule; NaN for a flat or empty map."""
    shipped = adaptive_threshold(vals, min_fraction=lo, max_fraction=hi)
    if shipped.empty:
        return dict.fromkeys(RULES, float("nan"))
    t1 = shipped.otsu
    upper = vals[vals >= t1]
    t2 = adaptive_threshold(upper).otsu if upper.size > 1 and upper[-1] > upper[0] else t1
    out = {"otsu": shipped.threshold,
           "otsu2": clamp_threshold(vals, t2, min_fraction=lo, max_fraction=hi)[0]}
    for a in (0.3, 0.4, 0.5, 0.6, 0.7):
        out[f"max{a:.1f}"] = clamp_threshold(vals, a * float(vals[-1]), min_fraction=lo, max_fraction=hi)[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--methods", nargs="+", default=["gradcam", "gradcam++"])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default="runs/mask_rule")
    ap.add_argument("--weights-dir", default=None, help="model weights folder (default: the shipped ones)")
    a = ap.parse_args()
    cfg = Settings()
    model = load_model("brain-lesion-3d", weights_dir=Path(a.weights_dir) if a.weights_dir else None, settings=cfg)
    rows = [r for r in read_manifest(a.data) if r["label"] != "none"][: a.limit]
    results = []
    for n, r in enumerate(rows):
        image = read_image(r["image"])
        truth = read_mask(r["mask"]).array.astype(bool)
        for method in a.methods:
            exp = explain(image, method, target=r["label"], model=model, settings=cfg)
            s, fg = exp.primary.array, exp.foreground
            vals = np.sort(s[fg])
            row = {"study_id": r["study_id"], "label": r["label"], "method": method}
            for rule, thr in candidate_thresholds(vals, cfg.mask_min_fraction, cfg.mask_max_fraction).items():
                row[rule] = dice(fg & (s >= thr), truth)
            qs = np.quantile(vals, np.linspace(0.5, 0.999, 60))
            row["oracle"] = max(dice(fg & (s >= q), truth) for q in qs)
            results.append(row)
        print(f"\r{n + 1}/{len(rows)} studies", end="", flush=True)
    print()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rules = [k for k in results[0] if k not in ("study_id", "label", "method")]
    with open(out / "per_study.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    lines = ["| method | class | n | " + " | ".join(rules) + " |", "|---" * (len(rules) + 3) + "|"]
    for method in a.methods:
        for cls in ["all", *sorted({r["label"] for r in results})]:
            sel = [r for r in results if r["method"] == method and cls in ("all", r["label"])]
            means = " | ".join(f"{np.mean([r[k] for r in sel]):.3f}" for k in rules)
            lines.append(f"| {method} | {cls} | {len(sel)} | {means} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The evaluation report: ``report.md`` with PNG figures and per-case CSVs, from
:func:`xai_core.evaluate.evaluate_cohort`.

Files written into the output folder:

* ``report.md``: the headline table (one row per method: Dice, AUPRC, pointing game, AOPC, MoRF and
  LeRF deletion areas, the sanity rank correlation at full randomisation, seconds per volume), the
  full table with 95 % bootstrap CIs, the sanity cascade table, the figures and how it was made;
* ``metrics.png``: bars with 95 % CIs per method and metric;
* ``curves.png``: mean MoRF and LeRF deletion curves (and insertion when computed) per method, on
  logarithmic axes;
* ``sanity_cascade.png``: rank correlation and SSIM along the randomisation cascade;
* ``overlays.png``: the same example studies for every method (axial plane through the lesion,
  ground-truth contour in cyan, the method's mask in white);
* ``per_study.csv`` (every case), ``curves.csv`` (every curve point), ``sanity_cases.csv``,
  ``summary.csv``, ``headline.csv``, ``sanity.csv`` and ``verdicts.json``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import bootstrap_ci
from .settings import Settings

__all__ = ["HEADLINE", "summary_rows", "headline_rows", "headline_markdown", "write_report"]

# (column key, title, better) of the headline table; sanity and seconds come from their own tables.
HEADLINE = (("dice", "Dice", "higher"), ("auprc", "AUPRC", "higher"), ("pointing_game", "pointing game", "higher"),
            ("aopc_morf", "AOPC", "higher"), ("auc_deletion_morf", "MoRF AUC", "lower"),
            ("auc_deletion_lerf", "LeRF AUC", "higher"), ("sanity_rank_correlation", "sanity ρ", "lower"),
            ("seconds", "s / volume", "lower"))
BAR_METRICS = ("dice", "iou", "auprc", "pointing_game", "aopc_morf", "auc_deletion_morf", "auc_deletion_lerf",
               "abpc", "seconds")
TITLES = {"dice": "Dice (mask vs lesion)", "iou": "IoU", "auprc": "AUPRC", "pointing_game": "pointing game",
          "aopc_morf": "AOPC (MoRF deletion)", "auc_deletion_morf": "MoRF deletion AUC (lower better)",
          "auc_deletion_lerf": "LeRF deletion AUC (higher better)", "abpc": "ABPC = LeRF - MoRF AUC",
          "auc_insertion_morf": "MoRF insertion AUC", "auc_insertion_lerf": "LeRF insertion AUC",
          "seconds": "seconds per volume"}


def _methods(cases: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(c["method"] for c in cases))


def summary_rows(cases: Sequence[dict]) -> list[dict[str, Any]]:
    """Per method: n and mean [95 % bootstrap CI] of every numeric column of the cases."""
    keys = [k for k in BAR_METRICS + ("auc_insertion_morf", "auc_insertion_lerf", "aopc_lerf", "p_target")
            if any(k in c for c in cases)]
    out = []
    for m in _methods(cases):
        sel = [c for c in cases if c["method"] == m]
        rec: dict[str, Any] = {"method": m, "n": len(sel)}
        for k in keys:
            mean, lo, hi = bootstrap_ci([float(c[k]) for c in sel if k in c])
            rec.update({k: mean, f"{k}_ci_low": lo, f"{k}_ci_high": hi})
        out.append(rec)
    return out


def headline_rows(cases: Sequence[dict], sanity: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per method with the headline figures (means; sanity: mean final rank correlation)."""
    summ = {s["method"]: s for s in summary_rows(cases)}
    out = []
    for m in _methods(cases):
        s = summ[m]
        finals = [r["final_rank_correlation"] for r in sanity if r["method"] == m]
        rec = {"method": m, "n": s["n"], **{k: s.get(k, float("nan")) for k, _, _ in HEADLINE if k in s}}
        rec["sanity_rank_correlation"] = float(np.mean(finals)) if finals else float("nan")
        rec["sanity_n"] = len(finals)
        out.append(rec)
    return out


def _fmt(v: Any, key: str = "") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:.1f}" if key == "seconds" else f"{v:.3f}"


def headline_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The headline table in Markdown (arrows say which way is better)."""
    arrow = {"higher": "↑", "lower": "↓"}
    head = "| method | n | " + " | ".join(f"{t} {arrow[b]}" for _, t, b in HEADLINE) + " |"
    lines = [head, "|---" * (len(HEADLINE) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['n']} | " + " | ".join(_fmt(r.get(k), k) for k, _, _ in HEADLINE) + " |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(summary: Sequence[dict[str, Any]], path: Path) -> Path:
    """One panel per metric; one bar per method with its 95 % CI."""
    plt = _plt()
    keys = [k for k in BAR_METRICS if k in summary[0]]
    cols = 3
    rows = int(np.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    methods = [s["method"] for s in summary]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, k in zip(axes.ravel(), keys, strict=False):
        y = np.array([s[k] for s in summary])
        err = np.array([[s[k] - s[f"{k}_ci_low"] for s in summary], [s[f"{k}_ci_high"] - s[k] for s in summary]])
        ax.bar(np.arange(len(methods)), y, yerr=np.nan_to_num(err), capsize=3,
               color=[colours[i % len(colours)] for i in range(len(methods))])
        ax.set_xticks(np.arange(len(methods)), methods, rotation=20)
        ax.set_title(TITLES.get(k, k), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"Mean and 95 % bootstrap CI over {summary[0]['n']} studies per method")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _on_grid(curves: Sequence[dict[str, Any]], grid: np.ndarray, lerf: bool) -> np.ndarray:
    """Each curve's scores at ``grid``: the removed fraction (MoRF) or the fraction still in place (LeRF),
    linearly interpolated (studies differ in their number of cubes, so their points differ)."""
    rows = []
    for c in curves:
        f, y = np.asarray(c["fractions"], float), np.asarray(c["scores"], float)
        rows.append(np.interp(grid, (1.0 - f)[::-1], y[::-1]) if lerf else np.interp(grid, f, y))
    return np.array(rows)


def plot_curves(curves: Sequence[dict[str, Any]], path: Path) -> Path:
    """Mean perturbation curves per method with 95 % CI bands over studies: one panel per order and kind.

    The x axes are logarithmic: MoRF against the fraction of cubes removed (or restored), LeRF against
    the fraction still in place, read right to left, so both show the first and last few cubes, where
    a lesion's evidence is (the ``log`` schedule of :mod:`xai_core.faithfulness` samples them)."""
    plt = _plt()
    kinds = [k for k in ("deletion", "insertion") if any(c["curve"].startswith(k) for c in curves)]
    fig, axes = plt.subplots(len(kinds), 2, figsize=(12, 4.3 * len(kinds)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(c["method"] for c in curves))
    first = min((f for c in curves for f in c["fractions"] if 0 < f < 1), default=1e-3)
    grid = np.geomspace(min(first, 1e-2), 1.0, 80)
    for row, kind in enumerate(kinds):
        verb = "removed" if kind == "deletion" else "restored"
        for col, order in enumerate(("morf", "lerf")):
            ax = axes[row, col]
            for i, m in enumerate(methods):
                sel = [c for c in curves if c["method"] == m and c["curve"] == f"{kind}_{order}"]
                if not sel:
                    continue
                y = _on_grid(sel, grid, lerf=order == "lerf")
                ci = np.array([bootstrap_ci(y[:, j], n_boot=300)[1:] for j in range(y.shape[1])])
                ax.plot(grid, y.mean(0), color=colours[i % len(colours)], label=m)
                ax.fill_between(grid, ci[:, 0], ci[:, 1], color=colours[i % len(colours)], alpha=0.08)
            ax.set_xscale("log")
            if order == "lerf":
                ax.invert_xaxis()
                ax.set_xlabel(f"fraction of foreground cubes not yet {verb} (least relevant go first)")
            else:
                ax.set_xlabel(f"fraction of foreground cubes {verb} (most relevant first)")
            ax.set_ylabel("probability of the explained class")
            ax.set_title(f"{kind}, {order.upper()} ({len(sel)} studies)", fontsize=10)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_overlays(examples: Sequence[dict[str, Any]], path: Path) -> Path:
    """Rows: example studies; columns: methods. Axial plane through the lesion centre."""
    plt = _plt()
    studies = list(dict.fromkeys(e["study_id"] for e in examples))
    methods = list(dict.fromkeys(e["method"] for e in examples))
    fig, axes = plt.subplots(len(studies), len(methods), figsize=(2.8 * len(methods), 2.9 * len(studies)),
                             squeeze=False)
    for e in examples:
        ax = axes[studies.index(e["study_id"]), methods.index(e["method"])]
        img = np.asarray(e["image"], np.float32)
        lo, hi = np.percentile(img, [1, 99.5])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=e["aspect"], interpolation="nearest")
        ax.imshow(np.ma.masked_less(np.asarray(e["saliency"]), 0.05), cmap="inferno", vmin=0, vmax=1, alpha=0.5,
                  aspect=e["aspect"], interpolation="nearest")
        if e.get("truth") is not None and np.asarray(e["truth"]).any():
            ax.contour(np.asarray(e["truth"]), levels=[0.5], colors="cyan", linewidths=0.8)
        if np.asarray(e["mask"]).any():
            ax.contour(np.asarray(e["mask"]), levels=[0.5], colors="white", linewidths=0.6, linestyles="dotted")
        ax.set_title(f"{e['method']}\n{e['study_id']} ({e['target']}) k={e['k']}", fontsize=7)
        ax.axis("off")
    fig.suptitle("Examples: map (inferno), method's mask (white, dotted), lesion (cyan)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _curve_rows(curves: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"study_id": c["study_id"], "method": c["method"], "curve": c["curve"], "step": i,
             "fraction": f, "score": s}
            for c in curves for i, (f, s) in enumerate(zip(c["fractions"], c["scores"], strict=True))]


def write_report(result: dict[str, Any], out_dir: str | Path, *, command: str = "", data: str = "",
                 settings: Settings | None = None) -> dict[str, Path]:
    """Write the report of :func:`~xai_core.evaluate.evaluate_cohort`'s ``result`` into ``out_dir``.

    ``command`` and ``data`` are quoted in the report (how to make it again). Sanity verdicts are
    also recorded where findings read them (:func:`xai_core.sanity.write_sanity`)."""
    from .sanity import sanity_markdown, verdicts, write_sanity

    cfg = settings or Settings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases, curves, sanity, examples = (result.get(k, []) for k in ("cases", "curves", "sanity", "examples"))
    if not cases:
        raise ValueError("no cases to report")
    paths: dict[str, Path] = {}
    paths["per_study"] = _write_csv(out / "per_study.csv", [{k: v for k, v in c.items()} for c in cases])
    summary = summary_rows(cases)
    paths["summary"] = _write_csv(out / "summary.csv", summary)
    head = headline_rows(cases, sanity)
    paths["headline"] = _write_csv(out / "headline.csv", head)
    paths["metrics_png"] = plot_bars(summary, out / "metrics.png")
    if curves:
        paths["curves"] = _write_csv(out / "curves.csv", _curve_rows(curves))
        paths["curves_png"] = plot_curves(curves, out / "curves.png")
    sanity_md = ""
    if sanity:
        sp = write_sanity(sanity, out, settings=cfg)
        paths.update({f"sanity_{k}": v for k, v in sp.items()})
        sanity_md = sanity_markdown(_read_csv_rows(sp["table"]), verdicts(sanity, cfg.sanity_max_rank_correlation))
    if examples:
        paths["overlays_png"] = plot_overlays(examples, out / "overlays.png")
    eng = result.get("engine", {})
    lines = ["# Evaluation report", "",
             f"Data: `{data or '?'}`, {result.get('n_studies', '?')} studies with a lesion; target = the true "
             f"lesion class. Engine: {eng.get('engine', 'local')} ({eng.get('workers', 1)} worker(s)), wall time "
             f"{eng.get('wall_s', float('nan')):.0f} s.", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += ["## Headline", "", headline_markdown(head), "",
              "Dice, AUPRC and pointing game: localisation of the lesion (the method's adaptive mask; the continuous "
              "map over brain voxels; the map's peak within one model-grid voxel of the lesion). AOPC, MoRF and LeRF: "
              "deletion curves of the map on the model grid (probability of the explained class as foreground cubes "
              "are filled, most / least relevant first; AUC over the removed fraction 0..1). Sanity ρ: Spearman rank "
              "correlation of the map with the original after the whole model is re-initialised (cascading "
              f"randomisation, mean over {head[0]['sanity_n']} studies; below {cfg.sanity_max_rank_correlation} "
              "passes). Seconds per volume: the explanation pipeline (prepare, predict, attribute, mask), not the "
              "evaluation.", "",
              "Faithfulness settings (`xai_core/settings.py`, block \"Faithfulness and sanity\"): "
              f"cube {cfg.faithfulness_patch_mm:g} mm, {cfg.faithfulness_steps} steps ({cfg.faithfulness_schedule} "
              f"schedule), fill `{cfg.faithfulness_fill}`"
              + (f" (blur sigma {cfg.faithfulness_blur_mm:g} mm)" if cfg.faithfulness_fill == "blur" else "")
              + f", foreground: normalised intensity > {cfg.faithfulness_foreground:g}; sanity seed "
              f"{cfg.sanity_seed}.", "",
              "## All metrics (mean [95 % bootstrap CI])", "", _full_table(summary), "",
              "![metrics](metrics.png)", ""]
    if curves:
        lines += ["## Deletion curves", "", "![curves](curves.png)", ""]
    if sanity:
        lines += ["## Randomisation sanity check", "", sanity_md, "![sanity cascade](sanity_cascade.png)", ""]
        failed = [m for m, v in verdicts(sanity, cfg.sanity_max_rank_correlation).items() if not v["passed"]]
        if failed:
            lines += [f"**Finding:** {', '.join(failed)} barely change(s) when the model is randomised: the map "
                      "reflects the image more than the model. Findings of these methods carry the quality flag "
                      "`failed_sanity_check`.", ""]
    if examples:
        lines += ["## Examples", "", "![overlays](overlays.png)", ""]
    lines += ["## Files", "", *[f"- `{p.name}`" for k, p in paths.items() if p.parent == out], ""]
    paths["report"] = out / "report.md"
    paths["report"].write_text("\n".join(lines))
    (out / "result.json").write_text(json.dumps({"engine": eng, "task": result.get("task"),
                                                 "n_studies": result.get("n_studies"), "headline": head},
                                                indent=2, default=str))
    return paths


def _read_csv_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k not in ("method", "layer"):
                r[k] = float(v) if k != "n" and k != "step" else int(v)
    return rows


def _full_table(summary: Sequence[dict[str, Any]]) -> str:
    keys = [k for k in BAR_METRICS + ("auc_insertion_morf", "auc_insertion_lerf") if k in summary[0]]
    lines = ["| method | n | " + " | ".join(TITLES.get(k, k) for k in keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for s in summary:
        cells = [f"{_fmt(s[k], k)} [{_fmt(s[k + '_ci_low'], k)}, {_fmt(s[k + '_ci_high'], k)}]" for k in keys]
        lines.append(f"| {s['method']} | {s['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

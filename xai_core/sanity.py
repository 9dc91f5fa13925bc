"""Randomisation sanity checks of explanation methods (Adebayo et al., NeurIPS 2018).

A saliency map that explains a model must change when the model does. The **cascading
model-parameter randomisation** re-initialises the layers of the model from the output down to the
input, one more at each step (:meth:`~xai_core.models.ModelAdapter.randomised`; for
``BrainLesionNet`` with its lesion gate: classifier, encoder_seg (the gate's lesion map),
encoder_body (the CAM layer's stage), down2, down1, stem, so every layer the CAM layer depends on is
included). At each step the map of the randomised model is compared with the original one:

* Spearman rank correlation over the foreground voxels of the model grid (ranks are what masks and
  levels are made of); a map that is flat after randomisation (nothing to rank) counts as 0;
* SSIM of the two display maps (0..1; ``skimage.metrics.structural_similarity``, 7-voxel window, in
  2-D or 3-D).

A method whose map still correlates at or above ``Settings.sanity_max_rank_correlation`` (0.5) with
the original once the whole model is random depends on the image, not on the model (an edge
detector passes for an explanation this way). That is a finding: :func:`write_sanity` records it in
``verdicts.json`` and :func:`xai_core.findings.build_findings` puts a ``failed_sanity_check`` quality
flag on every findings record of that method and model version (:func:`recorded_verdict`).

The **label randomisation** test (a model retrained on permuted labels) is :func:`label_randomisation`:
it trains two tiny networks on the same few studies, one with the true labels and one with permuted
labels, and compares their maps. It is cheap only because the networks are tiny, so it tests the method
on a small network, not the shipped one (see docs/evaluation.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .settings import Settings

__all__ = ["SanityStep", "SanityResult", "cascade", "spearman", "ssim", "aggregate", "write_sanity",
           "recorded_verdict", "label_randomisation", "ORIGINAL"]

ORIGINAL = "original"


def spearman(a: np.ndarray, b: np.ndarray, within: np.ndarray | None = None) -> float:
    """Spearman rank correlation of two maps over the voxels of ``within`` (default: all); 0.0 when
    either map is constant there (no ranking left to agree with)."""
    from scipy.stats import spearmanr

    sel = np.ones(np.shape(a), bool) if within is None else np.asarray(within, bool)
    x, y = np.asarray(a, np.float64)[sel], np.asarray(b, np.float64)[sel]
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    r = float(spearmanr(x, y).statistic)
    return r if math.isfinite(r) else 0.0


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two 0..1 maps (2-D or 3-D, 7-voxel window, data range 1)."""
    from skimage.metrics import structural_similarity

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    win = min(7, *[s if s % 2 else s - 1 for s in a.shape])
    return float(structural_similarity(a, b, data_range=1.0, win_size=max(3, win)))


@dataclass
class SanityStep:
    """One step of the cascade: every layer down to ``layer`` re-initialised (``original``: none)."""

    layer: str
    rank_correlation: float
    ssim: float
    flat: bool


@dataclass
class SanityResult:
    """The cascade of one method on one input.

    Attributes:
        method: explainer name; ``target``: class index explained.
        steps: the original first (rank correlation 1), then one per layer, output first.
        final_rank_correlation: at full randomisation (the last step).
        passed: ``final_rank_correlation < threshold`` (the map depends on the model).
        study_id: which study, when known.
    """

    method: str
    target: int
    steps: list[SanityStep]
    threshold: float
    study_id: str = ""
    seconds: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def final_rank_correlation(self) -> float:
        return self.steps[-1].rank_correlation

    @property
    def passed(self) -> bool:
        return self.final_rank_correlation < self.threshold

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(final_rank_correlation=self.final_rank_correlation, passed=self.passed)
        return d


def _map(model: Any, method: str, inputs: Any, target: int, method_kwargs: dict | None) -> tuple[np.ndarray, bool]:
    att = model.explainer(method, **dict(method_kwargs or {})).attribute(
        inputs.inputs, target=[[target]], additional_forward_args=inputs.additional_forward_args)
    return att.maps[0, 0].detach().float().cpu().numpy(), bool(att.flat[0, 0])


def cascade(model: Any, image_or_inputs: Any, method: str, target: int | str | None = None, *,
            settings: Settings | None = None, method_kwargs: dict | None = None, foreground: np.ndarray | None = None,
            study_id: str = "", progress: Callable[[int, int], None] | None = None) -> SanityResult:
    """Cascading model-parameter randomisation of ``method`` on one input.

    Args:
        model: a :class:`~xai_core.models.ModelAdapter` (its ``randomised`` copies are made here; the
            original is untouched).
        image_or_inputs: an :class:`~xai_core.io.Image` (prepared here) or a prepared ``ModelInput``.
        target: class index or name (default: the class the original model predicts); the same class
            is explained at every step.
        settings: seed and verdict threshold (default ``Settings()``).
        method_kwargs: explainer parameters.
        foreground: bool model-grid mask the rank correlation is computed over (default: input channel 0
            above ``settings.faithfulness_foreground``, the brain).
        progress: called with (steps done, steps in all).
    """
    import time

    from .io import Image

    cfg = settings or Settings()
    inputs = model.prepare(image_or_inputs) if isinstance(image_or_inputs, Image) else image_or_inputs
    t0 = time.perf_counter()
    if target is None:
        with torch.no_grad():
            target = int(model.forward_func()(*inputs.inputs, *inputs.additional_forward_args).argmax(-1)[0])
    elif isinstance(target, str):
        target = model.classes.index(target)
    x0 = inputs.inputs[0][0, 0].detach().float().cpu().numpy()
    fg = (x0 > cfg.faithfulness_foreground) if foreground is None else np.asarray(foreground, bool)
    layers = model.cascade_layers()
    original, flat0 = _map(model, method, inputs, target, method_kwargs)
    steps = [SanityStep(ORIGINAL, 1.0, 1.0, flat0)]
    for n, layer in enumerate(layers):
        rnd = model.randomised(layer, seed=cfg.sanity_seed)
        m, flat = _map(rnd, method, inputs, target, method_kwargs)
        steps.append(SanityStep(layer, spearman(original, m, fg), ssim(original, m), flat))
        if progress:
            progress(n + 1, len(layers))
    card = getattr(model, "card", None)
    info = {"name": getattr(card, "name", ""), "version": getattr(card, "version", "")}
    return SanityResult(method=method, target=int(target), steps=steps, threshold=cfg.sanity_max_rank_correlation,
                        study_id=study_id, seconds=time.perf_counter() - t0, model=info)


def aggregate(results: Sequence[SanityResult | dict]) -> list[dict[str, Any]]:
    """Per method and cascade step: mean rank correlation and SSIM with 95 % bootstrap CIs over inputs.
    One row per (method, step), in cascade order; the method's verdict on its last-step row."""
    from .metrics import bootstrap_ci

    res = [r.to_dict() if isinstance(r, SanityResult) else r for r in results]
    out = []
    for method in dict.fromkeys(r["method"] for r in res):
        sel = [r for r in res if r["method"] == method]
        names = [s["layer"] for s in sel[0]["steps"]]
        for i, name in enumerate(names):
            rho = bootstrap_ci([r["steps"][i]["rank_correlation"] for r in sel])
            ss = bootstrap_ci([r["steps"][i]["ssim"] for r in sel])
            out.append({"method": method, "step": i, "layer": name, "n": len(sel),
                        "rank_correlation": rho[0], "rank_correlation_ci_low": rho[1],
                        "rank_correlation_ci_high": rho[2], "ssim": ss[0], "ssim_ci_low": ss[1],
                        "ssim_ci_high": ss[2],
                        "flat_fraction": float(np.mean([r["steps"][i]["flat"] for r in sel]))})
    return out


def verdicts(results: Sequence[SanityResult | dict], threshold: float) -> dict[str, dict[str, Any]]:
    """Per method: the mean rank correlation at full randomisation and whether it is below ``threshold``."""
    res = [r.to_dict() if isinstance(r, SanityResult) else r for r in results]
    out = {}
    for method in dict.fromkeys(r["method"] for r in res):
        sel = [r for r in res if r["method"] == method]
        final = float(np.mean([r["final_rank_correlation"] for r in sel]))
        model = sel[0].get("model", {})
        out[method] = {"method": method, "model": model.get("name", ""), "version": model.get("version", ""),
                       "final_rank_correlation": final, "threshold": threshold, "passed": final < threshold,
                       "n": len(sel), "studies": [r.get("study_id", "") for r in sel]}
    return out


def plot_cascade(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """The cascade figure: rank correlation and SSIM per step (x: layers randomised, output first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        x = np.arange(len(sel))
        for ax, key in zip(axes, ("rank_correlation", "ssim"), strict=True):
            y = np.array([r[key] for r in sel])
            lo = np.array([r[f"{key}_ci_low"] for r in sel])
            hi = np.array([r[f"{key}_ci_high"] for r in sel])
            ax.plot(x, y, marker="o", label=method)
            ax.fill_between(x, lo, hi, alpha=0.15)
            ax.set_xticks(x, ["original"] + [f"+{r['layer']}" for r in sel[1:]], rotation=35, ha="right")
    axes[0].set_ylabel("Spearman rank correlation with the original map")
    axes[1].set_ylabel("SSIM with the original map")
    for ax in axes:
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xlabel("layers re-initialised (cumulative, output first)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Cascading model-parameter randomisation (Adebayo et al. 2018)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def write_sanity(results: Sequence[SanityResult | dict], out_dir: str | Path, *, settings: Settings | None = None,
                 record: bool = True) -> dict[str, Path]:
    """``sanity_cases.csv`` (per input and step), ``sanity.csv`` / ``sanity.md`` (means and CIs),
    ``sanity_cascade.png`` and ``verdicts.json`` in ``out_dir``; with ``record`` the verdicts are also
    merged into ``settings.sanity_verdicts``, which findings read."""
    import csv

    cfg = settings or Settings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = [r.to_dict() if isinstance(r, SanityResult) else r for r in results]
    rows = aggregate(res)
    paths = {"cases": out / "sanity_cases.csv", "table": out / "sanity.csv", "markdown": out / "sanity.md",
             "plot": out / "sanity_cascade.png", "verdicts": out / "verdicts.json"}
    with open(paths["cases"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_id", "method", "target", "step", "layer", "rank_correlation", "ssim", "flat"])
        for r in res:
            for i, s in enumerate(r["steps"]):
                w.writerow([r.get("study_id", ""), r["method"], r["target"], i, s["layer"],
                            f"{s['rank_correlation']:.6f}", f"{s['ssim']:.6f}", s["flat"]])
    with open(paths["table"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    v = verdicts(res, cfg.sanity_max_rank_correlation)
    paths["markdown"].write_text(sanity_markdown(rows, v))
    plot_cascade(rows, paths["plot"])
    paths["verdicts"].write_text(json.dumps(v, indent=2))
    if record:
        _record(v, Path(cfg.sanity_verdicts))
    return paths


def sanity_markdown(rows: list[dict[str, Any]], v: dict[str, dict[str, Any]]) -> str:
    """The cascade as a Markdown table (one row per method, one column per step) and the verdicts."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    layers = [r["layer"] for r in rows if r["method"] == methods[0]]
    lines = ["| method | " + " | ".join(["original"] + [f"+{x}" for x in layers[1:]]) + " | verdict |",
             "|---" * (len(layers) + 2) + "|"]
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        cells = [f"{r['rank_correlation']:.2f} / {r['ssim']:.2f}" for r in sel]
        verdict = "passes" if v[m]["passed"] else f"**fails** (rank correlation {v[m]['final_rank_correlation']:.2f})"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", "Spearman rank correlation / SSIM of the map with the original map, mean over "
              f"{rows[0]['n']} input(s); layers re-initialised cumulatively from the output. A method fails when "
              f"its rank correlation at full randomisation stays at or above {next(iter(v.values()))['threshold']}."]
    return "\n".join(lines) + "\n"


def _record(v: dict[str, dict[str, Any]], path: Path) -> None:
    """Merge verdicts into the file findings read, keyed ``model@version:method`` (atomic replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(path.read_text()) if path.exists() else {}
    for method, rec in v.items():
        known[f"{rec['model']}@{rec['version']}:{method}"] = rec
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=2))
    tmp.replace(path)


def recorded_verdict(method: str, model_name: str, model_version: str,
                     settings: Settings | None = None) -> dict[str, Any] | None:
    """The recorded sanity verdict of ``method`` on that model version, or None when none was recorded."""
    path = Path((settings or Settings()).sanity_verdicts)
    if not path.is_file():
        return None
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return known.get(f"{model_name}@{model_version}:{method}")


# ----------------------------------------------------------------------------------------------------------
# Label randomisation
# ----------------------------------------------------------------------------------------------------------


def label_randomisation(rows: Sequence[dict[str, Any]], methods: Sequence[str], *, epochs: int = 40, seed: int = 0,
                        grid_size: int = 32, grid_spacing_mm: float = 6.0, settings: Settings | None = None
                        ) -> list[dict[str, Any]]:
    """The data randomisation test on tiny networks (Adebayo et al. 2018, section 5).

    Two ``BrainLesionNet`` copies (4-16 channels, ``grid_size``^3 at ``grid_spacing_mm``, no lesion gate)
    start from the same weights and train for ``epochs`` full-batch Adam steps on the studies of
    ``rows`` (manifest rows): one on the true labels, one on a permutation of them. For each method and
    study, the rank correlation of the two maps (each for the study's true class) is returned along with
    both networks' training accuracy (the permuted one must have memorised its labels for the test to
    mean anything). A method whose maps agree although one network learnt nothing real fails.
    """
    from .io import read_image
    from .models import LesionModel, ModelCard, build_network
    from .models.grid import ModelGrid, normalise_intensity, to_tensor

    cfg = settings or Settings()
    classes = ["none", "glioma", "meningioma", "metastasis"]
    card = ModelCard(name="label-randomisation-tiny", version="0", classes=classes, grid_size=grid_size,
                     grid_spacing_mm=grid_spacing_mm, cam_layer="encoder_out",
                     arch_kwargs=dict(spatial_dims=3, in_channels=1, num_classes=4, seg_channels=2,
                                      channels=[4, 8, 8, 16], dropout=0.0))
    grid = ModelGrid(grid_size, grid_spacing_mm)
    x = torch.cat([to_tensor(normalise_intensity(grid.to_model(read_image(r["image"]))[0])) for r in rows])
    y = torch.tensor([classes.index(r["label"]) for r in rows])
    gen = torch.Generator().manual_seed(seed)
    y_perm = y[torch.randperm(len(y), generator=gen)]
    torch.manual_seed(seed)
    init = build_network(card).state_dict()
    nets, acc = {}, {}
    for name, labels in (("true", y), ("permuted", y_perm)):
        net = build_network(card)
        net.load_state_dict(init)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        net.train()
        for _ in range(epochs):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net.classify(x), labels)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            acc[name] = float((net.classify(x).argmax(1) == labels).float().mean())
        nets[name] = LesionModel(card, net, torch.device("cpu"))
    out = []
    for r, xi in zip(rows, x, strict=True):
        inputs = nets["true"].prepare(read_image(r["image"]))
        fg = xi[0].numpy() > cfg.faithfulness_foreground
        t = classes.index(r["label"])
        for m in methods:
            a, _ = _map(nets["true"], m, inputs, t, None)
            b, flat = _map(nets["permuted"], m, inputs, t, None)
            out.append({"study_id": r["study_id"], "method": m, "rank_correlation": spearman(a, b, fg),
                        "ssim": ssim(a, b), "permuted_flat": flat, "train_accuracy_true": acc["true"],
                        "train_accuracy_permuted": acc["permuted"], "epochs": epochs})
    return out

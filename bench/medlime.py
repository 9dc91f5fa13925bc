"""Benchmark plain LIME (``lime``) and MedLIME against captum's ``Lime`` at equal sample counts, in one process.

Same model (``brain-lesion-3d``, its class path ``BrainLesionNet.classify``: no segmentation decoder),
same input (a held-out lesion study prepared onto the 64^3 model grid), same units (cubes of
``--patch`` voxels: our ``patch_units`` labels are captum's ``feature_mask``), same number of
samples, same target (the study's class), mean fill (captum: ``baselines`` = the foreground mean).

Rows:

* ``floor``: ``N`` forwards of the class path in batches of ``--batch`` (the cost no LIME can avoid),
  and ``floor+mae``: the same plus ``N`` MAE reconstructions in batches (MedLIME's floor);
* ``lime``: ours, mean fill, batches of ``--batch``;
* ``medlime (GM only)``: ours with the MAE fill, no STTA and no evidence (the cost per sample);
* ``captum Lime ppe=1``: captum's default ``perturbations_per_eval``; ``ppe=B``: batched as ours;
* ``captum Lime (full forward) ppe=1``: on ``ClassLogits`` (the whole network, decoder included) as a
  user of captum would wrap this model;
* ``medlime default``: one full MedLIME explanation at default settings (STTA, MAE, EBR when
  ``--evidence`` is given) -- the "one volume" figure.

Each row: CPU time of the process (best of ``--repeats``; on a shared machine the wall time, also
reported, measures the other jobs too), ms per sample, peak RSS above the RSS before the row (sampled
every 5 ms by a thread), and the ratio to the floor (on CPU time). Usage::

    nice -n 19 env OMP_NUM_THREADS=1 python bench/medlime.py --samples 256 --threads 1 --out runs/bench_medlime.json

``--gm-distance``: instead, how far from the data each fill's samples lie (:func:`gm_distance`)::

    nice -n 19 env OMP_NUM_THREADS=1 python bench/medlime.py --gm-distance --studies 8 --out runs/gm_distance.json

``--ablation``: saliency AUPRC of LIME, MedLIME and MedLIME without each part (:func:`ablation`)::

    nice -n 19 env OMP_NUM_THREADS=1 python bench/medlime.py --ablation --studies 8 --samples 256 \\
        --evidence runs/evidence.npz --out runs/ablation.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class PeakRSS:
    """Peak resident memory of this process above its value at entry, MB (a 5 ms sampling thread)."""

    def __enter__(self) -> PeakRSS:
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def above_mb(self) -> float:
        return (self.peak - self.base) / 2**20


# On a shared machine the wall time measures the other jobs as much as this one; the process CPU time
# (user + system, all threads) does not. Rows report both; ratios are taken on the CPU time.
LAST_WALL: dict[str, float] = {}


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """``(best CPU seconds of this process, peak RSS above start MB, last result)``; the wall time of that
    best run is left in ``LAST_WALL["s"]``."""
    best, peak, out = float("inf"), 0.0, None
    for _ in range(repeats):
        with PeakRSS() as mem:
            t, c = time.perf_counter(), time.process_time()
            out = fn()
            cpu, wall = time.process_time() - c, time.perf_counter() - t
            if cpu < best:
                best, LAST_WALL["s"] = cpu, wall
        peak = max(peak, mem.above_mb)
    return best, peak, out


def batch_features(model: Any, x: torch.Tensor, layers: tuple[str, ...]) -> torch.Tensor:
    """The OOD guard's pooled features (``log1p`` of each channel's spatial mean and std at ``layers``) of
    every item of ``x (n, 1, *S)``, from one class-path forward: ``(n, D)`` float64."""
    acts: dict[str, torch.Tensor] = {}
    handles = [model.net.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: acts.__setitem__(name, out.detach())) for name in layers]
    try:
        with torch.no_grad():
            model.forward_func()(x)
    finally:
        for h in handles:
            h.remove()
    parts = []
    for name in layers:
        h = acts[name].float()
        dims = tuple(range(2, h.ndim))
        parts += [h.mean(dims), h.std(dims)]
    return torch.log1p(torch.cat(parts, 1).clamp(min=0)).double()


def gm_distance(a: argparse.Namespace) -> int:
    """How far from the data are the samples of each fill? The Mahalanobis distance, in the classifier's
    pooled feature space (the OOD guard's features and fitted statistics of the validation studies),
    of LIME samples made with each fill, against the clean studies' own distances."""
    import numpy as np

    from xai_core.data.brain import read_manifest
    from xai_core.explain.fills import make_fill
    from xai_core.explain.lime import patch_units, sample_masks
    from xai_core.io import read_image
    from xai_core.mae import load_mae
    from xai_core.models import load
    from xai_core.ood import OODGuard

    model = load("brain-lesion-3d", device="cpu")
    guard = OODGuard.for_model(model)
    if guard.stats is None:
        raise SystemExit(f"no OOD statistics for this model's weights ({guard.note})")
    stats = guard.stats
    mae = load_mae()
    rows = read_manifest(a.data)[:a.studies]
    fills = ("zero", "mean", "blur", "mae")
    dist: dict[str, list[float]] = {f: [] for f in ("clean", *fills)}
    per_ratio: dict[str, dict[float, list[float]]] = {f: {r: [] for r in a.ratios} for f in fills}
    for n_row, row in enumerate(rows):
        x = model.prepare(read_image(row["image"])).tensor
        f0 = batch_features(model, x, tuple(stats.layers))
        dist["clean"].append(stats.distance(f0[0].numpy()))
        units = patch_units(x.shape[2:], a.patch, x[0])
        g = torch.Generator().manual_seed(n_row)
        keep = sample_masks(a.per_study, units.d, a.ratios, g)
        hidden = units.hidden_voxels(keep)
        for name in fills:
            fill = make_fill(name, x, **({"mae": mae} if name == "mae" else {}))
            feats = batch_features(model, fill(x, hidden), tuple(stats.layers))
            for i, f in enumerate(feats):
                d = stats.distance(f.numpy())
                dist[name].append(d)
                per_ratio[name][a.ratios[i % len(a.ratios)]].append(d)
        print(f"study {n_row + 1}/{len(rows)}: " + ", ".join(f"{k} {np.median(v):.2f}" for k, v in dist.items()),
              flush=True)
    out = {"what": "Mahalanobis distance of LIME samples to the validation studies in the classifier's pooled "
                   "feature space (OOD guard statistics)", "studies": len(rows), "samples_per_study": a.per_study,
           "ratios": list(a.ratios), "patch": a.patch, "data": a.data, "threshold_99pct": stats.threshold,
           "model": {k: getattr(model.card, k) for k in ("name", "version", "weights_sha256")},
           "mae": getattr(mae, "card", None),
           "median": {k: round(float(np.median(v)), 3) for k, v in dist.items()},
           "mean": {k: round(float(np.mean(v)), 3) for k, v in dist.items()},
           "fraction_over_threshold": {k: round(float(np.mean(np.asarray(v) > stats.threshold)), 3)
                                       for k, v in dist.items()},
           "median_by_ratio": {k: {str(r): round(float(np.median(v)), 3) for r, v in d.items()}
                               for k, d in per_ratio.items()},
           "mae_nearer_than_mean_fill_pairs": round(float(np.mean(np.asarray(dist["mae"]) <
                                                                  np.asarray(dist["mean"]))), 3)}
    return _report(out, a.out)


def _report(results: dict, path: str | None) -> int:
    """Print ``results`` as JSON and write them to ``path`` when given."""
    text = json.dumps(results, indent=2)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)
    return 0


ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "lime": ("lime", {}),
    "medlime": ("medlime", {}),
    "medlime without GM (mean fill)": ("medlime", {"fill": "mean"}),
    "medlime without STTA": ("medlime", {"stta_steps": 0}),
    "medlime without EBR": ("medlime", {"ebr": "off"}),
    "medlime, EBR with random neighbours": ("medlime", {"ebr": "random"}),
}


def ablation(a: argparse.Namespace) -> int:
    """Saliency AUPRC against the lesion masks on the model grid (brain voxels), per variant, on the lesion
    studies of ``--data``: plain LIME, MedLIME, and MedLIME without each of its parts. Gradient-free
    reference: Grad-CAM++ on the same grid (not a black-box method; for scale only)."""
    import numpy as np

    from xai_core.data.brain import read_manifest
    from xai_core.explain import get_explainer
    from xai_core.io import read_image
    from xai_core.metrics import auprc, bootstrap_ci
    from xai_core.models import load

    model = load("brain-lesion-3d", device="cpu")
    classify = model.forward_func()
    rows = [r for r in read_manifest(a.data) if r["label"] != "none"][:a.studies]
    scores: dict[str, list[float]] = {k: [] for k in (*ABLATIONS, "gradcam++ (reference)")}
    seconds: dict[str, float] = dict.fromkeys(scores, 0.0)
    per_case = []
    for n_row, row in enumerate(rows):
        inputs = model.prepare(read_image(row["image"]))
        x = inputs.tensor
        truth = model.grid.to_model(read_image(row["mask"]))[0] > 0.5
        brain = x[0, 0].numpy() > 0.1
        target = model.classes.index(row["label"])
        case = {"study": row["study_id"], "label": row["label"]}
        for name, (method, params) in ABLATIONS.items():
            kw = {"n_samples": a.samples, "patch": a.patch, "seed": n_row, **params}
            if method == "medlime":
                kw["evidence"] = a.evidence
            t = time.perf_counter()
            att = get_explainer(method)(classify, **kw).attribute(x, target=target)
            seconds[name] += time.perf_counter() - t
            # The display view (positive evidence), the map the viewer shows and evaluate scores.
            case[name] = auprc(att.maps[0, 0].numpy(), truth, within=brain)
            scores[name].append(case[name])
        t = time.perf_counter()
        att = model.explainer("gradcam++").attribute(x, target=target)
        seconds["gradcam++ (reference)"] += time.perf_counter() - t
        case["gradcam++ (reference)"] = auprc(att.maps[0, 0].numpy(), truth, within=brain)
        scores["gradcam++ (reference)"].append(case["gradcam++ (reference)"])
        case["lesion_fraction"] = float(truth[brain | truth].mean())
        per_case.append(case)
        print(f"study {n_row + 1}/{len(rows)} {row['study_id']}: " +
              ", ".join(f"{k.split(' (')[0]} {v:.3f}" for k, v in case.items() if isinstance(v, float)), flush=True)
    summary = {}
    for name, vals in scores.items():
        mean, lo, hi = bootstrap_ci(vals)
        summary[name] = {"auprc": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)],
                         "seconds_per_volume": round(seconds[name] / max(1, len(rows)), 2)}
    out = {"what": "saliency AUPRC vs lesion masks, model grid, brain voxels; display view (positive)",
           "data": a.data, "studies": len(rows), "samples": a.samples, "patch": a.patch, "evidence": a.evidence,
           "model": {k: getattr(model.card, k) for k in ("name", "version", "weights_sha256")},
           "chance_auprc": round(float(np.mean([c["lesion_fraction"] for c in per_case])), 4),
           "summary": summary, "cases": per_case}
    text = json.dumps(out, indent=2)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "cases"}, indent=2))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gm-distance", action="store_true",
                   help="instead of the speed rows: the distance of each fill's samples to the data")
    p.add_argument("--ablation", action="store_true",
                   help="instead of the speed rows: AUPRC of LIME, MedLIME and its ablations on --data")
    p.add_argument("--studies", type=int, default=8, help="--gm-distance / --ablation: studies")
    p.add_argument("--per-study", type=int, default=12, help="--gm-distance: samples per study and fill")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=str(ROOT / "data" / "heldout"))
    p.add_argument("--evidence", default=None, help="evidence library for the default MedLIME row")
    p.add_argument("--skip", nargs="*", default=[], help="rows to skip (e.g. 'captum_full')")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.gm_distance:
        return gm_distance(a)
    if a.ablation:
        return ablation(a)

    from captum.attr import Lime

    from xai_core.data.brain import read_manifest
    from xai_core.explain import get_explainer
    from xai_core.explain.fills import MeanFill
    from xai_core.explain.lime import patch_units
    from xai_core.io import read_image
    from xai_core.mae import load_mae
    from xai_core.models import load
    from xai_core.models.brain_lesion_net import ClassLogits

    model = load("brain-lesion-3d", device="cpu")
    row = next(r for r in read_manifest(a.data) if r["label"] != "none")
    x = model.prepare(read_image(row["image"])).tensor
    target = model.classes.index(row["label"])
    classify = model.forward_func()
    units = patch_units(x.shape[2:], a.patch, x[0])
    n, bs = a.samples, a.batch
    mae = load_mae()
    mean = float(MeanFill(x).means[0])
    results: dict[str, Any] = {
        "study": row["study_id"], "label": row["label"], "samples": n, "patch": a.patch, "batch": bs,
        "units": units.d, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "model": {k: getattr(model.card, k) for k in ("name", "version", "weights_sha256")},
        "mae": getattr(mae, "card", None), "torch": torch.__version__,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()], "rows": {}}

    def record(name: str, seconds: float, peak: float, extra: dict[str, Any] | None = None) -> None:
        wall = LAST_WALL.get("s", float("nan"))
        results["rows"][name] = {"seconds": round(seconds, 3), "wall_seconds": round(wall, 3),
                                 "ms_per_sample": round(1000 * seconds / n, 2),
                                 "peak_rss_above_start_mb": round(peak, 1), **(extra or {})}
        print(f"{name:<40} cpu {seconds:8.2f} s  wall {wall:8.2f} s  {1000 * seconds / n:7.1f} ms/sample  "
              f"+{peak:7.1f} MB", flush=True)

    keep = torch.rand(n, units.d, generator=torch.Generator().manual_seed(0)) > 0.3

    @torch.no_grad()
    def floor() -> None:
        for s in range(0, n, bs):
            classify(x.expand(min(bs, n - s), *x.shape[1:]))

    @torch.no_grad()
    def floor_mae() -> None:
        for s in range(0, n, bs):
            hidden = units.hidden_voxels(keep[s:s + bs])
            classify(mae.fill(x, hidden, batch_size=bs))

    sec, peak, _ = timed(floor, a.repeats)
    record("floor (N class-path forwards)", sec, peak)
    floor_s = sec
    sec, peak, _ = timed(floor_mae, a.repeats)
    record("floor+mae (forwards + reconstructions)", sec, peak)
    floor_mae_s = sec

    lime = get_explainer("lime")(classify, patch=a.patch, n_samples=n, batch_size=bs)
    sec, peak, att = timed(lambda: lime.attribute(x, target=target), a.repeats)
    record("lime (ours, mean fill)", sec, peak, {"ratio_to_floor": round(sec / floor_s, 3)})
    ours_lime = att.raw[0][0, 0, 0]

    med = get_explainer("medlime")(classify, patch=a.patch, n_samples=n, batch_size=bs, stta_steps=0, ebr="off")
    sec, peak, _ = timed(lambda: med.attribute(x, target=target), a.repeats)
    record("medlime (GM only, no STTA/EBR)", sec, peak, {"ratio_to_floor": round(sec / floor_mae_s, 3)})

    fmask = units.labels[None, None]
    feature_ids = set(units.features.tolist())
    # captum perturbs every unit of the mask; give background units one shared id so both fit the same d.
    remap = torch.full((units.n_units,), -1, dtype=torch.long)
    remap[units.features] = torch.arange(units.d)
    fm = remap[fmask]
    fm[fm < 0] = units.d
    assert len(feature_ids) == units.d

    def captum_run(fwd: Callable[..., torch.Tensor], ppe: int) -> torch.Tensor:
        torch.manual_seed(0)
        with torch.no_grad():
            return Lime(fwd).attribute(x, baselines=mean, target=target, feature_mask=fm, n_samples=n,
                                       perturbations_per_eval=ppe)

    ratios = {}
    for ppe in (1, bs):
        sec, peak, out = timed(lambda ppe=ppe: captum_run(classify, ppe), a.repeats)
        ratios[ppe] = sec
        record(f"captum Lime ppe={ppe}", sec, peak, {"ratio_to_floor": round(sec / floor_s, 3)})
    cap = out[0, 0]
    corr = torch.corrcoef(torch.stack([cap.flatten(), ours_lime.flatten()]))[0, 1]
    results["captum_vs_ours_map_correlation"] = round(float(corr), 4)
    best = min(ratios.values())
    results["speedup_vs_captum_default"] = round(ratios[1] / results["rows"]["lime (ours, mean fill)"]["seconds"], 3)
    results["speedup_vs_captum_best"] = round(best / results["rows"]["lime (ours, mean fill)"]["seconds"], 3)
    if "captum_full" not in a.skip:
        full = ClassLogits(model.net, 0).eval()
        sec, peak, _ = timed(lambda: captum_run(full, 1), a.repeats)
        record("captum Lime (full forward) ppe=1", sec, peak, {"ratio_to_floor": round(sec / floor_s, 3)})
    if "medlime_default" not in a.skip:
        default = get_explainer("medlime")(classify, evidence=a.evidence)
        sec, peak, att = timed(lambda: default.attribute(x, target=target), 1)
        results["rows"]["medlime default (one volume)"] = {
            "seconds": round(sec, 3), "wall_seconds": round(LAST_WALL["s"], 3),
            "peak_rss_above_start_mb": round(peak, 1),
            "n_samples": default.n_samples, "stta_steps": default.stta_steps,
            "evidence": att.extras.get("evidence", {}).get("mode")}
        print(f"medlime default (one volume): {sec:.1f} s ({default.n_samples} samples, STTA "
              f"{default.stta_steps} steps, evidence {att.extras.get('evidence', {}).get('mode')})")
    results["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return _report(results, a.out)


if __name__ == "__main__":
    sys.exit(main())

"""Faithfulness of VQA explanations: AOPC of patch deletion, with paired statistics (issue 12, item 4).

AOPC (area over the MoRF perturbation curve; Samek et al., "Evaluating the visualization of what a
deep neural network has learned", IEEE TNNLS 2017). The model image ``(C, S, S)`` is cut into square
patches; patches are ranked by the explanation's sum over each patch, and the most relevant are
deleted first, in ``L`` steps; ``f`` is the softmax probability of the answer the model gave on the
clean image, for the same question::

    AOPC = 1 / (L + 1) * sum_{k=0..L} ( f(x_0) - f(x_k) )

``x_k`` has the ``n_k = round(k * fraction * P / L)`` top-ranked patches set to the fill (``x_0`` is
the clean image, so its term is zero; ``P`` patches in all). A larger AOPC means deleting what the
map calls relevant lowers the answer's probability faster: the map is more faithful to the model.
All ``L + 1`` images of one curve go through the network in one batch.

Settings (:class:`AOPCSettings`) and why:

* ``patch = 8`` px: the ViT patch of ``brain-vqa`` (14 x 14 = 196 patches at its 112 px run size),
  so a deleted patch is exactly one image token and no token is half deleted. RE-LIG's map lives on
  that token grid (bilinearly upsampled), IG's on pixels; both are summed over the same squares.
* ``steps = 49``, ``fraction = 0.25``: one patch per step at 112 px, up to a quarter of the image
  (about 40 % of the brain, which fills 55-65 % of a slice). Samek et al. delete one region per step;
  the answer's probability falls in the first patches, where a coarse schedule (10 steps of 20
  patches) would not tell the methods apart, and deleting every patch ends on the same black image
  for every method.
* ``fill = 0.0``: black, the background of an MR slice outside the head (the model has seen it on
  every image), and the baseline of both IG and RE-LIG, so deletion moves a patch to its baseline.
  ``"mean"`` (the image's mean) is the alternative.
* ranking ``signed`` (the default): relevance is the signed attribution for the answer (Samek's
  ``R_i``; a patch that argues against the answer is deleted last). ``absolute`` ranks by the sum of
  ``|attribution|``, the display map both methods show (reported beside it).
* a random order (seeded per case) is the control: a map no better than chance scores near it.

Statistics (:func:`compare`): per-case values, a percentile bootstrap 95 % CI of each mean (10,000
resamples, seeded), a paired bootstrap CI of the ratio of means (cases resampled together), and
the two-sided Wilcoxon signed-rank test of the paired differences (scipy).

:func:`evaluate_vqa` runs it on a SLAKE-layout split: accuracy on every question (overall, closed,
open), then AOPC on ``cases`` questions, a seeded random sample of the split (wrong answers
included: an explanation explains the answer given, right or wrong).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["AOPCSettings", "PAPER", "aopc", "aopc_from_curve", "aopc_statistics", "bootstrap_mean_ci",
           "bootstrap_ratio_ci", "compare", "deletion_batch", "deletion_counts", "evaluate_vqa", "evaluation_params",
           "patch_scores", "summary_table", "wilcoxon_p", "write_vqa_results"]

# The paper's figures (RE-LIG for Med-VQA): what our run is set beside. Its one CI, [0.262, 0.375],
# brackets RE-LIG's mean AOPC (0.318), not the ratio 1.29, so it is shown on that row.
PAPER = {"aopc_relig": 0.3180, "aopc_ig": 0.2467, "aopc_relig_ci": (0.262, 0.375), "ratio": 1.29, "p": "< 0.001",
         "accuracy": {"overall": 0.8077, "closed": 0.8761, "open": 0.7734}}

Forward = Callable[[torch.Tensor], torch.Tensor]  # images (B, C, S, S) -> answer probability (B,)


@dataclass(frozen=True)
class AOPCSettings:
    """How patches are deleted (see the module docstring for the reasons).

    Attributes:
        patch: side of a square patch in model-image pixels (edge patches are smaller when ``S`` is
            not a multiple).
        steps: ``L``, deletion steps after the clean image (the curve has ``L + 1`` points).
        fraction: share of the patches deleted at step ``L`` (0 < fraction <= 1).
        fill: the value deleted pixels take (model-image units, 0..1), or ``"mean"`` for the image's mean.
        rank: ``signed`` (sum of the attribution) or ``absolute`` (sum of its magnitude).
    """

    patch: int = 8
    steps: int = 49
    fraction: float = 0.25
    fill: float | str = 0.0
    rank: str = "signed"

    def __post_init__(self) -> None:
        if self.patch < 1:
            raise ValueError(f"the AOPC patch must be at least 1 pixel, got {self.patch}")
        if self.steps < 1:
            raise ValueError(f"AOPC needs at least 1 deletion step, got {self.steps}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"the deleted fraction must be in (0, 1], got {self.fraction}")
        if isinstance(self.fill, str) and self.fill != "mean":
            raise ValueError(f"fill must be a number or 'mean', got {self.fill!r}")
        if self.rank not in ("signed", "absolute"):
            raise ValueError(f"rank must be 'signed' or 'absolute', got {self.rank!r}")


# ---------------------------------------------------------------------------------------------- AOPC

def _grid(size: tuple[int, int], patch: int) -> tuple[int, int]:
    return math.ceil(size[0] / patch), math.ceil(size[1] / patch)


def patch_scores(relevance: np.ndarray | torch.Tensor, patch: int, absolute: bool = False) -> np.ndarray:
    """Sum of ``relevance (H, W)`` over each ``patch x patch`` square -> ``(P,)``, row-major over the
    ``ceil(H/patch) x ceil(W/patch)`` grid (edge patches cover what is left)."""
    r = relevance.detach().float().cpu().numpy() if isinstance(relevance, torch.Tensor) else np.asarray(relevance)
    r = np.abs(r.astype(np.float64)) if absolute else r.astype(np.float64)
    if r.ndim != 2:
        raise ValueError(f"relevance must be (H, W), got shape {r.shape}")
    gh, gw = _grid(r.shape, patch)
    padded = np.zeros((gh * patch, gw * patch))
    padded[:r.shape[0], :r.shape[1]] = r
    return padded.reshape(gh, patch, gw, patch).sum(axis=(1, 3)).ravel()


def deletion_order(scores: np.ndarray) -> np.ndarray:
    """Patch indices, most relevant first (ties in index order, so the order is deterministic)."""
    return np.argsort(-np.asarray(scores, float), kind="stable")


def deletion_counts(n_patches: int, steps: int, fraction: float) -> np.ndarray:
    """``n_k = round(k * fraction * P / L)`` for ``k = 0..L``: patches deleted at each step, ``(L + 1,)``."""
    return np.rint(np.arange(steps + 1) * fraction * n_patches / steps).astype(int)


def deletion_batch(image: torch.Tensor, order: np.ndarray, counts: np.ndarray, patch: int,
                   fill: float | str = 0.0) -> torch.Tensor:
    """The perturbed images of one curve.

    Args:
        image: ``(1, C, H, W)`` (or ``(C, H, W)``) model image.
        order: patch indices, first deleted first (row-major over the patch grid).
        counts: ``(L + 1,)`` patches deleted at each step (non-decreasing).
        patch: patch side in pixels.
        fill: value of deleted pixels, or ``"mean"`` (the image's mean).

    Returns:
        ``(L + 1, C, H, W)``; row ``k`` has the first ``counts[k]`` patches of ``order`` set to the fill.
    """
    x = image if image.ndim == 4 else image[None]
    _, c, h, w = x.shape
    gh, gw = _grid((h, w), patch)
    value = float(x.mean()) if fill == "mean" else float(fill)
    # Deletion step of each patch (a patch never deleted gets L + 1), then a pixel mask per step.
    when = np.full(gh * gw, len(counts), dtype=np.int64)
    for k in range(len(counts) - 1, 0, -1):
        when[np.asarray(order)[:counts[k]]] = k
    when_px = torch.from_numpy(when.reshape(gh, gw)).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    when_px = when_px[:h, :w].to(x.device)
    steps = torch.arange(len(counts), device=x.device).view(-1, 1, 1)
    deleted = (when_px[None] <= steps)[:, None]  # (L + 1, 1, H, W)
    return torch.where(deleted, torch.as_tensor(value, dtype=x.dtype, device=x.device), x.expand(len(counts), c, h, w))


def aopc_from_curve(curve: Sequence[float] | np.ndarray) -> float:
    """``1 / (L + 1) * sum_k (f_0 - f_k)`` of a curve ``(L + 1,)`` whose first point is the clean input."""
    f = np.asarray(curve, float)
    return float(np.mean(f[0] - f))


def aopc(forward: Forward, image: torch.Tensor, relevance: np.ndarray | torch.Tensor | None = None,
         settings: AOPCSettings | None = None, order: np.ndarray | None = None) -> dict[str, Any]:
    """AOPC of one explanation.

    Args:
        forward: images ``(B, C, S, S)`` -> ``(B,)`` probability of the answer (no grad needed).
        image: ``(1, C, S, S)`` clean model image.
        relevance: ``(S, S)`` map (signed attribution; see ``settings.rank``), or None with ``order``.
        settings: patch, steps, fraction, fill, rank.
        order: a given deletion order (the random control) instead of ranking ``relevance``.

    Returns:
        ``{"aopc": float, "curve": (L + 1,) probabilities, "counts": (L + 1,) patches deleted}``.
    """
    s = settings or AOPCSettings()
    h, w = image.shape[-2:]
    gh, gw = _grid((h, w), s.patch)
    if order is None:
        if relevance is None:
            raise ValueError("give a relevance map or a deletion order")
        order = deletion_order(patch_scores(relevance, s.patch, absolute=s.rank == "absolute"))
    counts = deletion_counts(gh * gw, s.steps, s.fraction)
    with torch.no_grad():
        curve = forward(deletion_batch(image, order, counts, s.patch, s.fill)).detach().double().cpu().numpy()
    return {"aopc": aopc_from_curve(curve), "curve": curve, "counts": counts}


# ---------------------------------------------------------------------------------------------- statistics

def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, (n_boot, n))


def bootstrap_mean_ci(values: Sequence[float] | np.ndarray, n_boot: int = 10_000, alpha: float = 0.05,
                      seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: percentile bootstrap ``1 - alpha`` CI of the mean of ``values (n,)``."""
    v = np.asarray(values, float)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    means = v[_resamples(v.size, n_boot, seed)].mean(axis=1)
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(v.mean()), float(lo), float(hi)


def bootstrap_ratio_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_boot: int = 10_000,
                       alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """``(mean(a) / mean(b), low, high)``: paired percentile bootstrap CI of the ratio of means (the
    same cases drawn for both, so their correlation is kept). Resamples whose ``mean(b)`` is not
    positive give no ratio and are dropped (none are when ``b`` is clearly positive)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two (n,) arrays, got {a.shape} and {b.shape}")
    if a.size == 0:
        return float("nan"), float("nan"), float("nan")
    idx = _resamples(a.size, n_boot, seed)
    ma, mb = a[idx].mean(axis=1), b[idx].mean(axis=1)
    ok = mb > 0
    ratio = float(a.mean() / b.mean()) if b.mean() != 0 else float("nan")
    if not ok.any():
        return ratio, float("nan"), float("nan")
    lo, hi = np.percentile(ma[ok] / mb[ok], [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return ratio, float(lo), float(hi)


def wilcoxon_p(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of the paired differences ``a - b`` (scipy's default: exact
    for n <= 50 without ties, else the normal approximation; zero differences dropped). 1.0 when
    every difference is zero."""
    from scipy.stats import wilcoxon

    d = np.asarray(a, float) - np.asarray(b, float)
    if not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d, alternative="two-sided").pvalue)


def compare(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_boot: int = 10_000,
            seed: int = 0) -> dict[str, float]:
    """Paired comparison of per-case values ``a`` (e.g. RE-LIG) and ``b`` (e.g. IG), both ``(n,)``:
    means with CIs, the ratio of means with its paired CI, the relative gain ``ratio - 1``, the mean
    difference with its CI, the two-sided Wilcoxon p and how often ``a > b``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ratio, rlo, rhi = bootstrap_ratio_ci(a, b, n_boot=n_boot, seed=seed)
    dm, dlo, dhi = bootstrap_mean_ci(a - b, n_boot=n_boot, seed=seed)
    return {"n": int(a.size), "ratio": ratio, "ratio_ci_low": rlo, "ratio_ci_high": rhi, "gain": ratio - 1,
            "difference": dm, "difference_ci_low": dlo, "difference_ci_high": dhi,
            "p_wilcoxon": wilcoxon_p(a, b), "share_a_greater": float(np.mean(a > b)) if a.size else float("nan")}


# ---------------------------------------------------------------------------------------------- VQA runs

def _read_png(path: Path) -> np.ndarray:
    from PIL import Image as PILImage

    with PILImage.open(path) as im:
        return np.asarray(im.convert("L"))


@torch.no_grad()
def predict_split(model: Any, records: Sequence[Any], batch: int = 64,
                  progress: Callable[[int, int], None] | None = None) -> list[int]:
    """Answer indices of ``model`` (a ``vqa`` adapter) for ``records``, in batches of ``batch``
    questions (questions padded to the longest in the batch, as in training; each image prepared with
    :meth:`~xai_core.models.vqa.VQAModel.prepare_slice`'s resize)."""
    from .models.brain_vqa import to_model_image

    net, tok, dev = model.net.eval(), model.tokenizer, model.device
    size, channels = model.run_size, net.vision.config.num_channels
    cache: dict[str, torch.Tensor] = {}
    out: list[int] = []
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        for r in chunk:
            if r.img_name not in cache:
                cache[r.img_name] = to_model_image(_read_png(r.image_path), size, channels)[0]
        names = list(dict.fromkeys(r.img_name for r in chunk))
        images = torch.cat([cache[n] for n in names]).to(dev)
        index = torch.tensor([names.index(r.img_name) for r in chunk], device=dev)
        enc = tok([r.question for r in chunk], padding=True, truncation=True, return_tensors="pt")
        logits = net.forward_indexed(images, index, enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
        out.extend(int(i) for i in logits.argmax(1).cpu())
        if progress:
            progress(min(start + batch, len(records)), len(records))
    return out


def accuracy(records: Sequence[Any], predicted: Sequence[str]) -> dict[str, Any]:
    """Exact-match accuracy overall, closed, open and per question type: ``{"overall": {"accuracy",
    "n"}, ...}`` (the training card's table, :func:`xai_core.train_vqa.accuracy_table`)."""
    from .train_vqa import accuracy_table

    return accuracy_table(list(records), list(predicted))


def _method_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters of ``params`` that ``method``'s explainer takes."""
    import inspect

    from .explain import get_explainer

    taken = inspect.signature(get_explainer(method).__init__).parameters
    return {k: v for k, v in params.items() if k in taken}


def evaluation_params(config: Any | None = None) -> dict[str, Any]:
    """What both path methods run at by default here, from ``config`` (:class:`xai_core.settings.Settings`;
    the defaults when None): IG's path steps (``vqa_ig_n_steps``, 32) for both, so that RE-LIG's gain is
    the layer and the noise, not more integration points, and RE-LIG's noisy samples
    (``vqa_relig_n_samples``, 8)."""
    if config is None:
        from .settings import Settings

        config = Settings()
    return {"n_steps": config.vqa_ig_n_steps, "n_samples": config.vqa_relig_n_samples}


def evaluate_vqa(model: Any, data_dir: str | Path, methods: Sequence[str] = ("relig", "ig"), *,
                 split: str = "test", cases: int = 200, settings: AOPCSettings | None = None,
                 params: dict[str, Any] | None = None, config: Any | None = None, seed: int = 0,
                 random_control: bool = True,
                 progress: Callable[[int, int], None] | None = None,
                 accuracy_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Accuracy on a split and AOPC of each method on ``cases`` of its questions.

    Args:
        model: a ``vqa`` adapter (:class:`~xai_core.models.vqa.VQAModel`).
        data_dir: SLAKE-layout folder (:func:`xai_core.data.slake.read_split`).
        methods: explanation methods (first against second in the comparison: ``relig`` vs ``ig``).
        split: ``train``, ``validation`` or ``test``.
        cases: questions explained: the first ``cases`` of a seeded permutation of the split
            (``seed``), all when the split is smaller.
        settings: AOPC settings; ``settings.rank`` is the primary ranking, the other is computed too.
        params: explainer parameters, given to each method that takes them (default
            :func:`evaluation_params` of ``config``, updated by these).
        config: the process's :class:`xai_core.settings.Settings` (the defaults when None).
        seed: case sample, random-control orders (``seed`` and the case's position) and bootstrap.
        random_control: also a random deletion order per case.

    Returns:
        ``{"accuracy", "cases": per-case rows, "curves": per-curve rows, "stats", "settings", ...}``.
    """
    from .data.slake import read_split

    if not methods:
        raise ValueError("give at least one method")
    if cases < 1:
        raise ValueError(f"--cases must be at least 1, got {cases}")
    if getattr(model, "kind", None) != "vqa":
        raise ValueError(f"model {model.name!r} is not a vqa model (kind {getattr(model, 'kind', None)!r})")
    s = settings or AOPCSettings()
    other = "absolute" if s.rank == "signed" else "signed"
    p = {**evaluation_params(config), **(params or {})}
    records = read_split(data_dir, split)
    if not records:
        raise ValueError(f"{data_dir}: the {split} split has no English questions")
    classes = list(model.classes)

    t0 = time.perf_counter()
    pred = predict_split(model, records, progress=accuracy_progress)
    acc = accuracy(records, [classes[i] for i in pred])
    acc_s = time.perf_counter() - t0

    chosen = np.random.default_rng(seed).permutation(len(records))[:cases]
    explainers = {m: model.explainer(m, **_method_params(m, p)) for m in methods}
    rows, curves = [], []
    for n, i in enumerate(chosen):
        r = records[int(i)]
        x = model.prepare_slice(_read_png(r.image_path), r.question)
        answer = model.predict(x)
        image = x.inputs[0]
        ids, mask = x.additional_forward_args

        def forward(batch: torch.Tensor, _ids=ids, _mask=mask, _a=answer.answer_index) -> torch.Tensor:
            b = batch.shape[0]
            logits = model.net(batch, _ids.expand(b, -1), _mask.expand(b, -1))
            return torch.softmax(logits.float(), dim=-1)[:, _a]

        row: dict[str, Any] = {"case": n, "qid": r.qid, "img_name": r.img_name,
                               "question_type": r.extra.get("question_type", ""), "answer_type": r.answer_type,
                               "phrasing_held_out": bool(r.extra.get("phrasing_held_out", False)),
                               "question": r.question, "answer": r.answer, "predicted": answer.answer,
                               "correct": answer.answer == r.answer, "f0": answer.confidence}
        for m, e in explainers.items():
            t = time.perf_counter()
            att = e.attribute(x.inputs, target=[[answer.answer_index]],
                              additional_forward_args=x.additional_forward_args)
            row[f"seconds_{m}"] = time.perf_counter() - t
            relevance = att.raw[0][0, 0].sum(0)  # (S, S) signed, summed over channels
            for rank in (s.rank, other):
                res = aopc(forward, image, relevance, AOPCSettings(**{**asdict(s), "rank": rank}))
                key = f"aopc_{m}" if rank == s.rank else f"aopc_{rank}_{m}"
                row[key] = res["aopc"]
                curves.append({"case": n, "qid": r.qid, "method": m, "rank": rank, "curve": res["curve"].tolist()})
        if random_control:
            gh, gw = _grid(tuple(image.shape[-2:]), s.patch)
            order = np.random.default_rng([seed, n]).permutation(gh * gw)
            res = aopc(forward, image, settings=s, order=order)
            row["aopc_random"] = res["aopc"]
            curves.append({"case": n, "qid": r.qid, "method": "random", "rank": "random",
                           "curve": res["curve"].tolist()})
        rows.append(row)
        if progress:
            progress(n + 1, len(chosen))
    counts = deletion_counts(int(np.prod(_grid((model.run_size, model.run_size), s.patch))), s.steps, s.fraction)
    return {"accuracy": acc, "n_questions": len(records), "split": split, "cases": rows, "curves": curves,
            "counts": counts.tolist(), "methods": list(methods), "settings": asdict(s), "params": p, "seed": seed,
            "random_control": random_control, "accuracy_seconds": acc_s,
            "stats": aopc_statistics(rows, list(methods), s.rank, random_control, seed=seed),
            "model": {"name": model.card.name, "version": model.card.version,
                      "weights_sha256": getattr(model.card, "weights_sha256", ""), "run_size": model.run_size}}


def aopc_statistics(rows: list[dict], methods: list[str], rank: str = "signed", random_control: bool = True,
               n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Means with bootstrap CIs per method (both rankings, and the random control), and the paired
    comparison of the first method against the second (primary ranking and the other)."""
    other = "absolute" if rank == "signed" else "signed"
    out: dict[str, Any] = {"methods": {}, "comparison": None, "comparison_other_rank": None, "rank": rank}
    keys = {m: (f"aopc_{m}", f"aopc_{other}_{m}") for m in methods}
    if random_control:
        keys["random"] = ("aopc_random", None)
    for m, (k1, k2) in keys.items():
        mean, lo, hi = bootstrap_mean_ci([r[k1] for r in rows], n_boot=n_boot, seed=seed)
        rec = {"mean": mean, "ci_low": lo, "ci_high": hi, "n": len(rows)}
        if k2:
            mean2, lo2, hi2 = bootstrap_mean_ci([r[k2] for r in rows], n_boot=n_boot, seed=seed)
            rec.update({f"{other}_mean": mean2, f"{other}_ci_low": lo2, f"{other}_ci_high": hi2})
            sec = [r[f"seconds_{m}"] for r in rows]
            rec["seconds_median"] = float(np.median(sec)) if sec else float("nan")
        out["methods"][m] = rec
    if len(methods) >= 2:
        a, b = methods[0], methods[1]
        out["comparison"] = {"a": a, "b": b, **compare([r[f"aopc_{a}"] for r in rows],
                                                       [r[f"aopc_{b}"] for r in rows], n_boot=n_boot, seed=seed)}
        out["comparison_other_rank"] = {"a": a, "b": b, "rank": other,
                                        **compare([r[f"aopc_{other}_{a}"] for r in rows],
                                                  [r[f"aopc_{other}_{b}"] for r in rows], n_boot=n_boot, seed=seed)}
    return out


def _p_text(p: float) -> str:
    return "< 0.001" if p < 1e-3 else f"{p:.3f}"


def _acc_text(entry: dict[str, Any]) -> str:
    return "-" if entry.get("accuracy") is None else f"{100 * entry['accuracy']:.2f} % (n {entry['n']})"


def summary_table(res: dict[str, Any]) -> str:
    """The paper-shaped Markdown table: accuracy overall / closed / open, AOPC per method with its
    95 % CI, the relative gain (ratio of means, paired 95 % CI) and the Wilcoxon p; the paper's
    figures beside ours."""
    acc, st = res["accuracy"], res["stats"]
    n = len(res["cases"])
    lines = ["| quantity | this run | paper |", "|---|---|---|"]
    for k in ("overall", "closed", "open"):
        lines.append(f"| accuracy, {k} ({res['split']}, {res['n_questions']} questions) | {_acc_text(acc[k])} | "
                     f"{100 * PAPER['accuracy'][k]:.2f} % |")
    for m, rec in st["methods"].items():
        paper = {"relig": f"{PAPER['aopc_relig']:.4f} [{PAPER['aopc_relig_ci'][0]}, {PAPER['aopc_relig_ci'][1]}]",
                 "ig": f"{PAPER['aopc_ig']:.4f}"}.get(m, "-")
        label = "random order (control)" if m == "random" else m
        lines.append(f"| AOPC, {label} ({n} cases) | {rec['mean']:.4f} [{rec['ci_low']:.4f}, {rec['ci_high']:.4f}] | "
                     f"{paper} |")
    c = st.get("comparison")
    if c:
        lines.append(f"| relative gain {c['a']} / {c['b']} (ratio of mean AOPC, 95 % CI) | {c['ratio']:.2f}x "
                     f"[{c['ratio_ci_low']:.2f}, {c['ratio_ci_high']:.2f}] | {PAPER['ratio']:.2f}x |")
        lines.append(f"| p, Wilcoxon signed-rank (paired, two-sided) | {_p_text(c['p_wilcoxon'])} | "
                     f"{PAPER['p']} |")
    return "\n".join(lines) + "\n"


def _settings_text(res: dict[str, Any]) -> str:
    s, counts = res["settings"], res["counts"]
    fill = "the image mean" if s["fill"] == "mean" else f"{s['fill']:g} (black)"
    return (f"AOPC: {s['patch']} px patches ({res['model']['run_size']} px model image), L = {s['steps']} steps up "
            f"to {s['fraction']:.0%} of the patches ({counts[1]} patch(es) at step 1, {counts[-1]} at step L), "
            f"fill {fill}, ranked by the {s['rank']} patch sum of the attribution; f = softmax probability of the "
            f"answer given on the clean image. Cases: the first {len(res['cases'])} of a seeded permutation "
            f"(seed {res['seed']}) of the {res['split']} split, right and wrong answers alike. CIs: percentile "
            f"bootstrap, 10,000 resamples, seeded; the ratio's CI resamples cases in pairs. Explainer parameters: "
            f"{json.dumps(res['params'])}.")


def write_vqa_results(res: dict[str, Any], out_dir: str | Path, command: str = "") -> dict[str, Path]:
    """``per_case.csv``, ``curves.csv`` (one row per curve point), ``summary.json`` and ``report.md``
    under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"per_case": out / "per_case.csv", "curves": out / "curves.csv", "summary": out / "summary.json",
             "report": out / "report.md"}
    with open(paths["per_case"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(res["cases"][0]))
        w.writeheader()
        w.writerows(res["cases"])
    with open(paths["curves"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "qid", "method", "rank", "step", "deleted_patches", "f"])
        for c in res["curves"]:
            for k, v in enumerate(c["curve"]):
                w.writerow([c["case"], c["qid"], c["method"], c["rank"], k, res["counts"][k], f"{v:.6f}"])
    summary = {k: v for k, v in res.items() if k not in ("cases", "curves")}
    summary["command"] = command
    summary["paper"] = PAPER
    paths["summary"].write_text(json.dumps(summary, indent=2, default=float))
    paths["report"].write_text(report_markdown(res, command))
    return paths


def report_markdown(res: dict[str, Any], command: str = "") -> str:
    """A short report: the table, the settings, the other ranking and AOPC per question type."""
    st, rows = res["stats"], res["cases"]
    methods = res["methods"]
    lines = [f"# VQA faithfulness: {', '.join(methods)} on {res['model']['name']} {res['model']['version']}", ""]
    if command:
        lines += ["    " + command, ""]
    lines += [summary_table(res), _settings_text(res), ""]
    c2 = st.get("comparison_other_rank")
    if c2:
        cells = "; ".join(f"{m} {st['methods'][m][c2['rank'] + '_mean']:.4f} "
                          f"[{st['methods'][m][c2['rank'] + '_ci_low']:.4f}, "
                          f"{st['methods'][m][c2['rank'] + '_ci_high']:.4f}]" for m in methods)
        lines += [f"Ranked by the {c2['rank']} patch sum instead: {cells}; ratio {c2['ratio']:.2f}x "
                  f"[{c2['ratio_ci_low']:.2f}, {c2['ratio_ci_high']:.2f}], Wilcoxon p {_p_text(c2['p_wilcoxon'])}.", ""]
    c = st.get("comparison")
    if c:
        lines += [f"{c['a']} minus {c['b']}: mean difference {c['difference']:.4f} [{c['difference_ci_low']:.4f}, "
                  f"{c['difference_ci_high']:.4f}]; {c['a']} is higher on {100 * c['share_a_greater']:.0f} % of "
                  f"the cases.", ""]
    secs = ", ".join(f"{m} {st['methods'][m]['seconds_median']:.2f} s" for m in methods)
    lines += [f"Median seconds per explanation: {secs}; accuracy pass {res['accuracy_seconds']:.0f} s.", ""]
    types = sorted({r["question_type"] for r in rows})
    if len(types) > 1:
        head = " | ".join(f"AOPC {m}" for m in [*methods, *(["random"] if res["random_control"] else [])])
        lines += ["## By question type", "", f"| question type | cases | correct | {head} |",
                  "|---|---|---|" + "---|" * (len(methods) + res["random_control"])]
        for t in types:
            sel = [r for r in rows if r["question_type"] == t]
            vals = " | ".join(f"{np.mean([r[f'aopc_{m}'] for r in sel]):.4f}"
                              for m in [*methods, *(["random"] if res["random_control"] else [])])
            lines.append(f"| {t} | {len(sel)} | {sum(r['correct'] for r in sel)} | {vals} |")
        lines.append("")
    return "\n".join(lines)


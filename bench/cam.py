"""Benchmark the class-activation-map explainers against the model's own cost and other libraries.

In one process, on one ``BrainLesionNet`` (default channels ``(8, 16, 32, 64)``; trained weights from
``xai_core.models.load("brain-lesion-3d")`` when that works, else random weights) and one input
``(1, 1, S, S, S)``, times (median of ``--repeats`` after one warm-up):

* the reference: one forward of the model plus the backward of one class score to every weight;
* ours: gradcam, gradcam++ and scorecam, for one class and for all ``--classes`` classes per call;
* MONAI ``GradCAM`` / ``GradCAMpp`` (one class; all classes as a loop of calls);
* pytorch-grad-cam ``GradCAM`` / ``GradCAMPlusPlus`` / ``ScoreCAM`` where they run on 3-D input.

Each time is reported as a ratio to the reference, with the agreement (Pearson correlation over
the voxels, mean over classes) of the maps with ours. MONAI's maps are inverted by its default
post-processing (1 = least important): they are flipped back (``1 - map``) before comparing.
MONAI and pytorch-grad-cam keep hooks on the modules they wrap, so each gets its own copy of the
model (same weights) and cannot slow down the other rows.

Usage: ``python bench/cam.py [--device auto] [--size 64] [--repeats 3] [--classes 4] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xai_core.explain import get_explainer  # noqa: E402
from xai_core.models.brain_lesion_net import BrainLesionNet, ClassLogits  # noqa: E402
from xai_core.settings import resolve_device  # noqa: E402

LAYER = "encoder_out"  # CAM layer when no model card says otherwise


def build_model(classes: int, device: torch.device) -> tuple[nn.Module, str, str, int]:
    """``(network, where its weights came from, CAM layer, number of classes)``: the trained model
    when ``xai_core.models.load`` provides one, else random weights."""
    try:
        from xai_core.models import load

        lm = load("brain-lesion-3d", device=device)
        net, layer, n_cls = lm.net, lm.card.cam_layer, len(lm.classes)
        source = f"trained weights: xai_core.models.load('brain-lesion-3d') version {lm.card.version}"
    except Exception as exc:  # any failure falls back to random weights
        torch.manual_seed(0)
        net, layer, n_cls = BrainLesionNet(spatial_dims=3, num_classes=classes), LAYER, classes
        source = f"random weights (seed 0); load('brain-lesion-3d') unavailable: {type(exc).__name__}: {exc}"
    return net.to(device).eval(), source, layer, n_cls


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """Median wall time (s) of ``fn`` over ``repeats`` runs after one warm-up, and its last result."""
    result = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    pair = torch.stack([a.detach().flatten().double().cpu(), b.detach().flatten().double().cpu()])
    return float(torch.corrcoef(pair)[0, 1])


def mean_agreement(ours: torch.Tensor, other: torch.Tensor) -> float:
    """Mean Pearson correlation over classes: ``ours`` and ``other`` are ``(T, *spatial)``."""
    return statistics.fmean(pearson(ours[t], other[t]) for t in range(ours.shape[0]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda:0'")
    p.add_argument("--size", type=int, default=64, help="input side in voxels (cube)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row, after one warm-up")
    p.add_argument("--classes", type=int, default=4,
                   help="classes of the random-weight model (a trained model's card overrides)")
    p.add_argument("--out", type=Path, help="also write the Markdown report here")
    a = p.parse_args(argv)

    device = resolve_device(a.device)
    model, source, layer, n_cls = build_model(a.classes, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, a.size, a.size, a.size, generator=gen).to(device)
    classes = list(range(n_cls))
    rows: list[tuple[str, str, float | None, float | None, str]] = []

    # Reference: forward + backward of one class score through every weight.
    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.class_logits[:, 0].sum().backward()

    ref_t, _ = timed(fwd_bwd, a.repeats, device)
    model.zero_grad(set_to_none=True)
    rows.append(("forward+backward (reference)", "1", ref_t, None, ""))

    ours: dict[str, torch.Tensor] = {}
    for name, kwargs in [("gradcam", {}), ("gradcam++", {}), ("gradcam++", {"variant": "monai"}),
                         ("scorecam", {})]:
        explainer = get_explainer(name)(model, layer=layer, **kwargs)
        label = name + (" (variant=monai)" if kwargs else "")
        for tgt, tag in [(0, "1"), ("all", str(n_cls))]:
            t, maps = timed(lambda e=explainer, tg=tgt: e.attribute(x, target=tg), a.repeats, device)
            if tgt == "all":
                ours[label] = maps[0]
            rows.append((f"ours {label}", tag, t, None, ""))

    # MONAI: default post-processing (as users call it), flipped back for the comparison.
    from monai.visualize import GradCAM as MonaiGradCAM
    from monai.visualize import GradCAMpp as MonaiGradCAMpp

    for cls, mine in [(MonaiGradCAM, "gradcam"), (MonaiGradCAMpp, "gradcam++")]:
        m_model = copy.deepcopy(model)
        cam = cls(nn_module=ClassLogits(m_model), target_layers=f"model.{layer}")
        t1, _ = timed(lambda c=cam: c(x, class_idx=0), a.repeats, device)
        tn, maps = timed(lambda c=cam: torch.cat([c(x, class_idx=k) for k in classes], 1), a.repeats, device)
        monai_maps = 1.0 - maps[0]
        rows.append((f"MONAI {cls.__name__}", "1", t1, None, ""))
        agree = f"vs ours {mine}"
        extra = ""
        if mine == "gradcam++":
            same_form = mean_agreement(ours["gradcam++ (variant=monai)"], monai_maps)
            extra = f"; vs ours gradcam++ (variant=monai): {same_form:.4f}"
        rows.append((f"MONAI {cls.__name__}", f"{n_cls} (loop)", tn, mean_agreement(ours[mine], monai_maps),
                     agree + extra))

    # pytorch-grad-cam: report the error where it does not support 3-D.
    try:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except Exception as exc:
        rows.append(("pytorch-grad-cam", "-", None, None, f"not importable: {exc}"))
    else:
        pgc_rows = [("GradCAM", "gradcam"), ("GradCAMPlusPlus", "gradcam++"), ("ScoreCAM", "scorecam")]
        for cls_name, mine in pgc_rows:
            g_model = copy.deepcopy(model)
            cam = None
            try:
                target_layers = [g_model.get_submodule(layer)]
                cam = getattr(pgc, cls_name)(ClassLogits(g_model), target_layers=target_layers)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t1, _ = timed(lambda c=cam: c(x, targets=[ClassifierOutputTarget(0)]), a.repeats, device)
                    tn, maps = timed(lambda c=cam: [c(x, targets=[ClassifierOutputTarget(k)])[0]
                                                    for k in classes], a.repeats, device)
                pg = torch.stack([torch.as_tensor(m) for m in maps])
                rows.append((f"pytorch-grad-cam {cls_name}", "1", t1, None, ""))
                rows.append((f"pytorch-grad-cam {cls_name}", f"{n_cls} (loop)", tn,
                             mean_agreement(ours[mine], pg), f"vs ours {mine}"))
            except Exception as exc:  # reported, not fatal
                msg = " ".join(f"{type(exc).__name__}: {exc}".split())[:140]
                rows.append((f"pytorch-grad-cam {cls_name}", "1", None, None, f"unsupported: {msg}"))
            finally:
                if cam is not None:
                    cam.activations_and_grads.release()

    lines = [
        f"# CAM benchmark: BrainLesionNet 3-D, input 1x1x{a.size}^3, {n_cls} classes, layer `{layer}`",
        "",
        f"- device: {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
           f" ({torch.get_num_threads()} torch threads)"),
        f"- model: {source}",
        f"- torch {torch.__version__}; median of {a.repeats} runs after a warm-up; "
        "ratio = time / (one forward + backward of one class score to every weight)",
        "",
        "| method | classes | time (s) | ratio to fwd+bwd | agreement (Pearson) | note |",
        "|---|---|---|---|---|---|",
    ]
    for name, tag, t, agree, note in rows:
        ts = f"{t:.4f}" if t is not None else "-"
        rs = f"{t / ref_t:.2f}" if t is not None else "-"
        ag = f"{agree:.4f}" if agree is not None else ""
        lines.append(f"| {name} | {tag} | {ts} | {rs} | {ag} | {note} |")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

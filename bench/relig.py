"""Benchmark RE-LIG (``relig``) against captum's ``NoiseTunnel(LayerIntegratedGradients)``.

Same run, same model (``brain-lesion-3d``'s trained ``BrainLesionNet``; being fully convolutional
with global pooling, the same network and weights take a 128^3 input), same seeded random input
``(1, 1, S, S, S)`` (uniform 0..1, seed 1), same layer, target, samples, steps, Gauss-Legendre
quadrature, internal batch and noise (sigma = ``stdev_fraction`` x the input's range; captum gets
that absolute sigma and ``torch.manual_seed(seed)``, with ``nt_samples_batch_size=1`` so both
draw the same noise copy by copy). Each implementation runs in its own fresh subprocess, so that
the peak resident memory (``ru_maxrss``, the process high-water mark, model and libraries
included) of one cannot hide the other's; the ``base`` column is the RSS before the attribution
(imports, model, input). Reports:

* the relative L2 difference of the layer attributions ``(K, *s)`` (ours vs captum);
* wall time (best of ``--repeats``) and the speed ratio captum / ours;
* the floor: ``samples x steps x`` one forward+backward (to the layer's output, batch of one) of
  the layers after the attributed one, measured in its own subprocess (median of 5), and each
  implementation's ratio to it;
* peak RSS of each.

Usage: ``python bench/relig.py [--size 64] [--samples 4] [--steps 16] [--layer CARD] [--target 1]
[--internal-batch 8] [--repeats 1] [--threads 2] [--out FILE]``.

``--model brain-vqa [--weights-dir DIR] [--vqa-data DIR] [--record 0]``: the VQA model (issue 12,
item 5). The input is one question of a SLAKE-layout folder (the ``--record``-th of its test split;
a seeded random image and a fixed question when the folder is absent) at the model's run size; the
target is the answer the model gives. Ours is ``model.explainer("relig")``: layer IG at the image
embedding (the card's ``layers.relig``) and, along the same path, at the question embedding
(``layers.relig_tokens``), noise on the pixels only. Captum's composition is the loop that captum
issue 1281 leaves (``NoiseTunnel`` would noise the token ids): for each copy ``k``, one
``torch.randn(x.shape, generator=gen)`` from a CPU generator seeded with ``seed``, times sigma, and
``LayerIntegratedGradients(net, [image layer, token layer]).attribute((noisy, ids), baselines=(0,
reference ids), additional_forward_args=(mask,), n_steps, method="gausslegendre",
internal_batch_size)``, averaged over copies. Both see ``internal_batch_size`` rows per forward
(ours batches the copies, captum the steps of one copy). The floor is ``samples x steps x`` one
forward+backward of the whole network to the image embedding's output (batch 1), since with the
question embedding also attributed both implementations rerun every layer. Reported besides: the
max abs and relative L2 differences of both attributions (image tokens ``(K, s, s)`` and question
tokens ``(L, D)``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def setup(a: argparse.Namespace) -> tuple[Any, torch.Tensor, str, float]:
    """``(adapter, input, layer, sigma)``."""
    from xai_core.models import load

    model = load("brain-lesion-3d", device="cpu")
    layer = a.layer or model.card.layers.get("relig") or "down1"
    x = torch.rand((1, 1, a.size, a.size, a.size), generator=torch.Generator().manual_seed(1))
    sigma = a.stdev_fraction * float(x.max() - x.min())
    return model, x, layer, sigma


def setup_vqa(a: argparse.Namespace) -> tuple[Any, Any, int, float, str]:
    """``(adapter, model input, answer index, sigma, description of the input)`` for the VQA model."""
    import numpy as np

    from xai_core.models import load

    model = load(a.model, device="cpu", weights_dir=Path(a.weights_dir) if a.weights_dir else None)
    data = Path(a.vqa_data)
    if (data / "test.json").is_file():
        from PIL import Image as PILImage

        from xai_core.data.slake import read_split

        r = read_split(data, "test")[a.record]
        with PILImage.open(r.image_path) as im:
            png = np.asarray(im.convert("L"))
        what = f"{data}/test.json record {a.record} ({r.img_name}, \"{r.question}\")"
        question = r.question
    else:
        png = (np.random.default_rng(1).uniform(0, 1, (96, 96)) * 255).astype(np.uint8)
        question = "is there a lesion on this slice"
        what = f"seeded random 96 x 96 image, \"{question}\""
    x = model.prepare_slice(png, question)
    answer = model.predict(x)
    img = x.inputs[0]
    sigma = a.stdev_fraction * float(img.max() - img.min())
    return model, x, answer.answer_index, sigma, f"{what}, answer {answer.answer!r} (p {answer.confidence:.3f})"


def run_child_vqa(a: argparse.Namespace) -> dict[str, Any]:
    """One implementation on the VQA model, in this (fresh) process."""
    torch.set_num_threads(a.threads)
    model, x, target, sigma, what = setup_vqa(a)
    net = model.net.eval()
    layer, token_layer = model.layer_for("relig"), model.layer_for("relig_tokens")
    img = x.inputs[0]
    ids, mask = x.additional_forward_args
    base = current_rss_mb()
    result: dict[str, Any] = {"impl": a.impl, "layer": layer, "token_layer": token_layer, "base_rss_mb": base,
                              "input": what, "run_size": model.run_size,
                              "parameters": sum(p.numel() for p in net.parameters())}
    if a.impl == "floor":
        def fwd_bwd(rows: int) -> float:
            store: dict[str, torch.Tensor] = {}

            def hook(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor:
                store["h"] = out.detach().requires_grad_()
                return store["h"]

            h = net.get_submodule(layer).register_forward_hook(hook)
            c0 = time.process_time()
            out = net(img.expand(rows, -1, -1, -1), ids.expand(rows, -1), mask.expand(rows, -1))
            torch.autograd.grad(out[:, target].sum(), store["h"])
            h.remove()
            return time.process_time() - c0

        times, cpu = [], []
        for _ in range(6):
            t0 = time.perf_counter()
            cpu.append(fwd_bwd(1))
            times.append(time.perf_counter() - t0)
        one, one_cpu = statistics.median(times[1:]), statistics.median(cpu[1:])
        rows = min(a.internal_batch, a.samples * a.steps)
        batched = statistics.median([fwd_bwd(rows) for _ in range(3)][1:])
        result.update(one_fwd_bwd_s=one, floor_s=one * a.samples * a.steps, one_fwd_bwd_cpu_s=one_cpu,
                      floor_cpu_s=one_cpu * a.samples * a.steps, batch_rows=rows,
                      floor_batched_cpu_s=batched / rows * a.samples * a.steps)
    else:
        times, cpu = [], []
        for _ in range(a.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            if a.impl == "ours":
                explainer = model.explainer("relig", n_samples=a.samples, n_steps=a.steps,
                                            stdev_fraction=a.stdev_fraction, seed=a.seed,
                                            internal_batch_size=a.internal_batch)
                att = explainer.attribute(x.inputs, target=[[target]], additional_forward_args=(ids, mask))
                out_img, out_tok = att.layer_raw[0, 0], att.aux_raw[token_layer][0, 0]
                delta = float(att.delta.flatten()[0])
            else:
                from captum.attr import LayerIntegratedGradients

                lig = LayerIntegratedGradients(net, [net.get_submodule(layer), net.get_submodule(token_layer)])
                gen = torch.Generator().manual_seed(a.seed)
                ref_ids = model.reference_ids(ids)
                sums: list[torch.Tensor] = []
                deltas = []
                for _ in range(a.samples):
                    noisy = img + torch.randn(img.shape, generator=gen) * sigma
                    attrs, d = lig.attribute((noisy, ids), baselines=(torch.zeros_like(img), ref_ids),
                                             additional_forward_args=(mask,), target=target, n_steps=a.steps,
                                             method="gausslegendre", internal_batch_size=a.internal_batch,
                                             return_convergence_delta=True)
                    sums = [t.detach() for t in attrs] if not sums else [s + t.detach()
                                                                         for s, t in zip(sums, attrs, strict=True)]
                    deltas.append(float(d.flatten()[0]))
                out_img, out_tok = sums[0][0] / a.samples, sums[1][0] / a.samples
                delta = statistics.mean(deltas)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        torch.save({"image": out_img.detach().float().cpu(), "tokens": out_tok.detach().float().cpu()}, a.save)
        result.update(seconds=min(times), cpu_seconds=min(cpu), all_seconds=times, delta=delta)
    result["peak_rss_mb"] = rss_mb()
    return result


def run_child(a: argparse.Namespace) -> dict[str, Any]:
    """One implementation, in this (fresh) process."""
    if a.model != "brain-lesion-3d":
        return run_child_vqa(a)
    torch.set_num_threads(a.threads)
    model, x, layer, sigma = setup(a)
    net = model.net
    base = current_rss_mb()
    result: dict[str, Any] = {"impl": a.impl, "layer": layer, "base_rss_mb": base}
    if a.impl == "floor":
        import functools

        suffix = functools.partial(net.forward_from, layer)
        with torch.no_grad():
            acts = {}
            h = net.get_submodule(layer).register_forward_hook(lambda _m, _i, o: acts.setdefault("a", o))
            net.classify(x)
            h.remove()
        times, cpu = [], []
        for _ in range(6):
            t0, c0 = time.perf_counter(), time.process_time()
            hh = acts["a"].clone().requires_grad_()
            torch.autograd.grad(suffix(hh)[:, a.target].sum(), hh)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        one, one_cpu = statistics.median(times[1:]), statistics.median(cpu[1:])
        result.update(one_fwd_bwd_s=one, floor_s=one * a.samples * a.steps,
                      one_fwd_bwd_cpu_s=one_cpu, floor_cpu_s=one_cpu * a.samples * a.steps)
        # The same work in batches of internal_batch rows (what both implementations run): the CPU
        # does a row of a batch of 8 in about half the time of a batch of one.
        rows = min(a.internal_batch, a.samples * a.steps)
        cpu_b = []
        for _ in range(3):
            c0 = time.process_time()
            hh = acts["a"].expand(rows, *acts["a"].shape[1:]).clone().requires_grad_()
            torch.autograd.grad(suffix(hh)[:, a.target].sum(), hh)
            cpu_b.append(time.process_time() - c0)
        result.update(batch_rows=rows, floor_batched_cpu_s=statistics.median(cpu_b[1:]) / rows * a.samples * a.steps)
    else:
        times, cpu = [], []
        for _ in range(a.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            if a.impl == "ours":
                explainer = model.explainer("relig", layer=layer, n_samples=a.samples, n_steps=a.steps,
                                            stdev_fraction=a.stdev_fraction, seed=a.seed,
                                            internal_batch_size=a.internal_batch)
                att = explainer.attribute(x, target=a.target)
                out, delta = att.layer_raw[0, 0], att.delta.flatten()
                result["forward_from"] = explainer.explainer.forward_from is not None
            else:
                from captum.attr import LayerIntegratedGradients, NoiseTunnel

                torch.manual_seed(a.seed)
                nt = NoiseTunnel(LayerIntegratedGradients(net.classify, net.get_submodule(layer)))
                ref, delta = nt.attribute(x, nt_samples=a.samples, nt_samples_batch_size=1, stdevs=sigma,
                                          n_steps=a.steps, method="gausslegendre", target=a.target,
                                          internal_batch_size=a.internal_batch, return_convergence_delta=True)
                out, delta = ref[0], delta.mean().view(1)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        torch.save(out.detach().float().cpu(), a.save)
        result.update(seconds=min(times), cpu_seconds=min(cpu), all_seconds=times, delta=float(delta[0]))
    result["peak_rss_mb"] = rss_mb()
    return result


def child(impl: str, a: argparse.Namespace, save: Path) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", impl, "--save", str(save)]
    for k in ("size", "samples", "steps", "target", "internal_batch", "repeats", "threads", "seed",
              "stdev_fraction"):
        argv += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    if a.layer:
        argv += ["--layer", a.layer]
    argv += ["--model", a.model, "--vqa-data", str(a.vqa_data), "--record", str(a.record)]
    if a.weights_dir:
        argv += ["--weights-dir", str(a.weights_dir)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64, help="input side in voxels (cube)")
    p.add_argument("--samples", type=int, default=4, help="noisy copies (both implementations)")
    p.add_argument("--steps", type=int, default=16, help="Gauss-Legendre points (both)")
    p.add_argument("--layer", default=None, help="attributed layer (default: the card's layers.relig)")
    p.add_argument("--target", type=int, default=1, help="class index")
    p.add_argument("--internal-batch", type=int, default=8, help="rows per forward+backward (both)")
    p.add_argument("--stdev-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per implementation (best reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each subprocess")
    p.add_argument("--out", type=Path, help="also write the Markdown report here")
    p.add_argument("--model", default="brain-lesion-3d", help="brain-lesion-3d (3-D, default) or brain-vqa")
    p.add_argument("--weights-dir", default=None, help="folder of the model's card and weights (default: shipped)")
    p.add_argument("--vqa-data", default=str(ROOT / "data" / "vqa_r16"),
                   help="brain-vqa: SLAKE-layout folder whose test question is the input")
    p.add_argument("--record", type=int, default=0, help="brain-vqa: index of the test question")
    p.add_argument("--child", choices=["ours", "captum", "floor"], help=argparse.SUPPRESS)
    p.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        a.impl = a.child
        print(json.dumps(run_child(a)))
        return 0

    if a.model != "brain-lesion-3d":
        return main_vqa(a)
    with tempfile.TemporaryDirectory() as tmp:
        res = {impl: child(impl, a, Path(tmp) / f"{impl}.pt") for impl in ("floor", "ours", "captum")}
        ours, ref = torch.load(Path(tmp) / "ours.pt"), torch.load(Path(tmp) / "captum.pt")
    rel = float((ours.double() - ref.double()).norm() / ref.double().norm())
    fl, fl_cpu, fl_b = res["floor"]["floor_s"], res["floor"]["floor_cpu_s"], res["floor"]["floor_batched_cpu_s"]
    o, c = res["ours"], res["captum"]
    lines = [
        f"# RE-LIG benchmark: BrainLesionNet 3-D (brain-lesion-3d weights), input 1x1x{a.size}^3, "
        f"layer `{o['layer']}`",
        "",
        f"- {a.samples} samples x {a.steps} Gauss-Legendre steps, stdev_fraction {a.stdev_fraction} "
        f"(sigma {a.stdev_fraction:.2f} of the range), seed {a.seed}, target {a.target}, "
        f"internal_batch_size {a.internal_batch} rows for both; captum `nt_samples_batch_size=1`",
        f"- CPU, {a.threads} torch threads per subprocess, torch {torch.__version__}; best of {a.repeats} "
        f"timed run(s); ours uses forward_from: {o.get('forward_from')}",
        f"- floor: {a.samples} x {a.steps} x one forward+backward of the layers after `{o['layer']}` "
        f"(batch 1, median of 5): {res['floor']['one_fwd_bwd_cpu_s']:.4f} CPU s / "
        f"{res['floor']['one_fwd_bwd_s']:.4f} wall s, so {fl_cpu:.2f} CPU s / {fl:.2f} wall s",
        f"- batched floor: the same {a.samples * a.steps} forward+backward passes in batches of "
        f"{res['floor']['batch_rows']} rows: {fl_b:.2f} CPU s",
        f"- relative L2 difference (layer attribution, ours vs captum): {rel:.2e}",
        f"- convergence delta (mean over copies): ours {o['delta']:.4f}, captum {c['delta']:.4f}",
        "- CPU time = the process's user+system time (all its threads): the ratios that hold on a shared "
        "machine; wall time is what a user waits on an idle one",
        "",
        "| implementation | CPU time (s) | wall time (s) | speed vs captum (CPU / wall) | ratio to floor "
        "(CPU / wall) | ratio to batched floor (CPU) | peak RSS (MB) | RSS before (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in [("ours (relig)", o), ("captum NoiseTunnel(LayerIntegratedGradients)", c)]:
        lines.append(f"| {name} | {r['cpu_seconds']:.2f} | {r['seconds']:.2f} | "
                     f"{c['cpu_seconds'] / r['cpu_seconds']:.2f}x / {c['seconds'] / r['seconds']:.2f}x | "
                     f"{r['cpu_seconds'] / fl_cpu:.2f} / {r['seconds'] / fl:.2f} | {r['cpu_seconds'] / fl_b:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | "
                     f"{r['base_rss_mb']:.0f} |")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    print(json.dumps({"rel_l2": rel, **res}), file=sys.stderr)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(report)
    return 0


def main_vqa(a: argparse.Namespace) -> int:
    """The VQA row: ours vs captum's composition (see the module docstring), one run."""
    with tempfile.TemporaryDirectory() as tmp:
        res = {impl: child(impl, a, Path(tmp) / f"{impl}.pt") for impl in ("floor", "ours", "captum")}
        ours, ref = torch.load(Path(tmp) / "ours.pt"), torch.load(Path(tmp) / "captum.pt")
    diff = {}
    for k in ("image", "tokens"):
        o, r = ours[k].double(), ref[k].double()
        diff[k] = {"max_abs": float((o - r).abs().max()), "ref_max_abs": float(r.abs().max()),
                   "rel_l2": float((o - r).norm() / r.norm()), "shape": list(r.shape)}
    fl, fl_cpu, fl_b = res["floor"]["floor_s"], res["floor"]["floor_cpu_s"], res["floor"]["floor_batched_cpu_s"]
    o, c = res["ours"], res["captum"]
    lines = [
        f"# RE-LIG benchmark: {a.model} ({o['parameters'] / 1e6:.2f} M parameters), {o['run_size']} px image + "
        f"question, layers `{o['layer']}` and `{o['token_layer']}`",
        "",
        f"- input: {o['input']}",
        f"- {a.samples} samples x {a.steps} Gauss-Legendre steps, stdev_fraction {a.stdev_fraction} on the pixels "
        f"only, seed {a.seed} (the same noise copy by copy), target = the answer given, internal_batch_size "
        f"{a.internal_batch} rows for both",
        f"- CPU, {a.threads} torch threads per subprocess, torch {torch.__version__}; best of {a.repeats} timed "
        "run(s)",
        f"- floor: {a.samples} x {a.steps} x one forward+backward of the whole network to `{o['layer']}`'s output "
        f"(batch 1, median of 5): {res['floor']['one_fwd_bwd_cpu_s']:.4f} CPU s / {res['floor']['one_fwd_bwd_s']:.4f} "
        f"wall s, so {fl_cpu:.2f} CPU s / {fl:.2f} wall s; batched ({res['floor']['batch_rows']} rows): "
        f"{fl_b:.2f} CPU s",
        f"- ours vs captum, image-token attribution {tuple(diff['image']['shape'])}: max abs difference "
        f"{diff['image']['max_abs']:.2e} (largest value {diff['image']['ref_max_abs']:.2e}), relative L2 "
        f"{diff['image']['rel_l2']:.2e}; question-token attribution {tuple(diff['tokens']['shape'])}: max abs "
        f"{diff['tokens']['max_abs']:.2e} (largest {diff['tokens']['ref_max_abs']:.2e}), relative L2 "
        f"{diff['tokens']['rel_l2']:.2e}",
        f"- convergence delta (mean over copies, logit units): ours {o['delta']:.4f}, captum {c['delta']:.4f}",
        "",
        "| implementation | CPU time (s) | wall time (s) | speed vs captum (CPU / wall) | ratio to floor (CPU / wall) "
        "| ratio to batched floor (CPU) | peak RSS (MB) | RSS before (MB) | peak minus before (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in [("ours (relig)", o), ("captum LayerIntegratedGradients, noise loop", c)]:
        lines.append(f"| {name} | {r['cpu_seconds']:.2f} | {r['seconds']:.2f} | "
                     f"{c['cpu_seconds'] / r['cpu_seconds']:.2f}x / {c['seconds'] / r['seconds']:.2f}x | "
                     f"{r['cpu_seconds'] / fl_cpu:.2f} / {r['seconds'] / fl:.2f} | {r['cpu_seconds'] / fl_b:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['base_rss_mb']:.0f} | {r['peak_rss_mb'] - r['base_rss_mb']:.0f} |")
    mem = (c["peak_rss_mb"] - c["base_rss_mb"]) / max(o["peak_rss_mb"] - o["base_rss_mb"], 1e-6)
    lines += ["", f"Memory (peak minus before), captum / ours: {mem:.2f}x. Speed (CPU), captum / ours: "
              f"{c['cpu_seconds'] / o['cpu_seconds']:.2f}x."]
    report = "\n".join(lines) + "\n"
    print(report, end="")
    print(json.dumps({"diff": diff, **res}), file=sys.stderr)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

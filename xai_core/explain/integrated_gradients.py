"""Integrated gradients on the voxels (``ig``), at a layer (:class:`LayerIntegratedGradients`), and
RE-LIG (``relig``): layer integrated gradients at an early layer with noise tunnelling on the voxels.

Integrated gradients (Sundararajan et al., ICML 2017) of the class logit ``F_c`` from a baseline
``b`` to the input ``x``::

    IG_i(x) = (x_i - b_i) * integral_0^1 dF_c(b + a (x - b)) / dx_i  da
           ~= (x_i - b_i) * sum_k w_k * dF_c(b + a_k (x - b)) / dx_i

with Gauss-Legendre nodes ``a_k`` and weights ``w_k`` on [0, 1] (captum's
:func:`captum.attr._utils.approximation_methods.approximation_parameters`; its default, exact for
polynomials of degree ``2 n_steps - 1`` along the path; captum's ``riemann_trapezoid`` weights sum
to ``(n - 1) / n`` and shrink the attribution). Completeness, ``sum_i IG_i = F_c(x) - F_c(b)``,
holds for the exact integral; the convergence ``delta`` reports how far the quadrature is from it,
in logit units.

Layer integrated gradients run the same integral on a layer's output ``A(x)`` instead of the voxels,
from ``A(b)`` (the layer's output for the baseline input, captum's ``LayerIntegratedGradients``
semantics) to ``A(x)``, through the rest of the network ``g`` (``F = g o A``). Cost, per input row:
the layers before the attributed one run once (a forward that stops at the layer), then every
quadrature point costs one forward of ``g`` and, per target, one backward of ``g`` to the layer
(``torch.autograd.grad`` with respect to the interpolated activations only: no weight gradients).
With ``forward_from`` (a function ``(A, *additional_forward_args) -> logits``, e.g.
``functools.partial(BrainLesionNet.forward_from, "down1")``), the steps run ``g`` alone; without
it the layer's output is replaced by a forward hook (as captum does) and the layers before it are
rerun, without autograd, on every chunk of steps.

Why not captum's classes: ``LayerIntegratedGradients`` reruns the whole network with autograd for
every step and recomputes the layers before the attributed one each time (both for the input and,
again, for the baseline); ``NoiseTunnel`` adds noise with an absolute standard deviation. The
results here equal captum's at equal settings and noise (``tests/test_explain_ig.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from captum.attr._utils.approximation_methods import approximation_parameters
from torch import nn

from .base import (
    Attribution,
    Explainer,
    ForwardFunc,
    LayerSpec,
    Ticker,
    class_logits,
    eval_mode,
    layer_name_for,
    register,
    require_module,
    upsample,
)
from .noise_tunnel import NoiseTunnel, NoiseType, owner_eval_mode
from .targets import Target, resolve_targets

__all__ = ["IntegratedGradients", "LayerIntegratedGradients", "RELIG", "quadrature"]

# Baseline: a float for every voxel, a tensor broadcastable to one input, or one of those per input.
Baseline = float | torch.Tensor | Sequence[float | torch.Tensor]

PATH_MODEL_KINDS = frozenset({"volume-classifier", "slice-classifier", "vqa"})
METHODS = ("gausslegendre", "riemann_middle", "riemann_left", "riemann_right", "riemann_trapezoid")


def quadrature(method: str, n_steps: int) -> tuple[list[float], list[float]]:
    """``(alphas, weights)``: the ``n_steps`` points on [0, 1] and their weights (captum's rules)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if n_steps < 1 or (method == "riemann_trapezoid" and n_steps < 2):
        raise ValueError(f"n_steps must be at least {2 if method == 'riemann_trapezoid' else 1}, got {n_steps}")
    step_sizes, alphas = approximation_parameters(method)
    return [float(a) for a in alphas(n_steps)], [float(w) for w in step_sizes(n_steps)]


def _baselines(baseline: Baseline, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """One baseline per input, each ``(1 or B, *input.shape[1:])`` on the input's device and dtype."""
    per_input = (tuple(baseline) if isinstance(baseline, Sequence) and not isinstance(baseline, torch.Tensor)
                 else (baseline,) * len(inputs))
    if len(per_input) != len(inputs):
        raise ValueError(f"{len(per_input)} baselines for {len(inputs)} inputs")
    out = []
    for b, x in zip(per_input, inputs, strict=True):
        if isinstance(b, torch.Tensor):
            t = b.detach().to(device=x.device, dtype=x.dtype)
            if t.ndim == x.ndim - 1:
                t = t[None]
            if t.ndim != x.ndim or t.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"baseline of shape {tuple(b.shape)} does not fit inputs {tuple(x.shape)}: "
                                 "give (C, *spatial), (1, C, *spatial) or (B, C, *spatial)")
            t = t.expand(t.shape[0], *x.shape[1:])
        else:
            t = torch.full((1, *x.shape[1:]), float(b), device=x.device, dtype=x.dtype)
        out.append(t)
    return tuple(out)


def _repeat_steps(args: tuple[Any, ...], n: int) -> tuple[Any, ...]:
    """Additional forward args for ``n`` stacked steps: tensors repeated along dim 0 (step-major, as
    captum expands them), everything else passed as it is."""
    if n == 1:
        return args
    return tuple(a.repeat(n, *([1] * (a.ndim - 1))) if isinstance(a, torch.Tensor) and a.ndim else a for a in args)


def _chunks(n_steps: int, rows: int, internal_batch_size: int | None) -> Iterator[tuple[int, int]]:
    """``(start, end)`` step ranges with at most ``internal_batch_size`` rows (steps x items) each; at
    least one step per chunk (captum's rule)."""
    per = n_steps if internal_batch_size is None else max(1, int(internal_batch_size) // max(rows, 1))
    for start in range(0, n_steps, per):
        yield start, min(start + per, n_steps)


def _check_floating(inputs: tuple[torch.Tensor, ...], method: str) -> None:
    if not all(x.is_floating_point() for x in inputs):
        raise TypeError(f"{method} integrates along a path between baseline and input: every attributed input "
                        "must be floating point (pass token ids through additional_forward_args)")


def _scores(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(R, T)`` logits of each row's targets; ``targets`` is ``(R, T)``."""
    return out.gather(1, targets)


@register("ig")
class IntegratedGradients(Explainer):
    """Vanilla integrated gradients on the inputs (the voxels), signed.

    ``IntegratedGradients(forward_func, baseline=0.0, n_steps=32, method="gausslegendre",
    internal_batch_size=8, output_index=0)``; works on any differentiable function from
    ``(*inputs, *additional_forward_args)`` to class logits: no module, no hooks.

    baseline: the path's start. Default ``0.0``: the model's normalised intensity 0, i.e. MR
        background after :func:`xai_core.models.grid.normalise_intensity` (a black volume, the
        usual IG baseline for images). A float, a tensor ``(C, *spatial)`` / ``(1 or B, C, *spatial)``,
        or one of those per input.
    n_steps: quadrature points along the path (32; Gauss-Legendre converges fast on smooth paths,
        less so through the default model's max-pool and leaky ReLUs: mean |delta| 0.84 logit on 12
        validation studies, docs/benchmarks.md; raise it where the delta matters).
    method: captum's quadrature rule name (``gausslegendre``, ``riemann_middle``, ...).
    internal_batch_size: rows (steps x batch items) per forward+backward; bounds memory
        (about 80 MB per row for the default model at 64^3). None: every step at once.

    ``raw[i]`` is ``(B, T, C_i, *spatial_i)`` in logit units (summing over the voxels to
    ``F(x) - F(baseline) + delta``); ``delta`` ``(B, T)``. Per call: one forward on the input, one on
    the baseline, and per chunk of steps one forward and one backward per target.

    Display ``absolute`` (magnitude of either sign): AUPRC 0.68 against 0.59 for ``positive`` on the
    validation studies (docs/benchmarks.md).
    """

    title = "Integrated Gradients (Sundararajan et al. 2017)"
    model_kinds = PATH_MODEL_KINDS
    needs = "gradients"
    display = "absolute"
    param_bounds = {"n_steps": (2, 256)}

    def __init__(self, forward_func: nn.Module | ForwardFunc, *, baseline: Baseline = 0.0, n_steps: int = 32,
                 method: str = "gausslegendre", internal_batch_size: int | None = 8,
                 output_index: int | str = 0):
        super().__init__(forward_func, output_index=output_index)
        self.alphas, self.weights = quadrature(method, n_steps)
        self.baseline, self.n_steps, self.method = baseline, n_steps, method
        self.internal_batch_size = internal_batch_size

    def _attribute(self, inputs: tuple[torch.Tensor, ...], target: Target, args: tuple[Any, ...],
                   tick: Ticker) -> Attribution:
        _check_floating(inputs, type(self).__name__)
        x = tuple(t.detach() for t in inputs)
        b = x[0].shape[0]
        base = tuple(t.expand_as(xi) for t, xi in zip(_baselines(self.baseline, x), x, strict=True))
        diff = tuple(xi - bi for xi, bi in zip(x, base, strict=True))
        with owner_eval_mode(self.forward_func):
            with torch.no_grad():
                logits = self.logits(x, args)
                targets = resolve_targets(target, logits)
                base_logits = self.logits(base, args)
            n_t = targets.shape[1]
            # Per input: sum_k w_k dF_t/dx at the k-th point, (T, B, C, *spatial).
            total = [torch.zeros((n_t, *xi.shape), dtype=torch.float32, device=xi.device) for xi in x]
            with torch.enable_grad():
                for start, end in _chunks(self.n_steps, b, self.internal_batch_size):
                    s = end - start
                    alpha = torch.tensor(self.alphas[start:end], dtype=x[0].dtype, device=x[0].device)
                    w = torch.tensor(self.weights[start:end], dtype=torch.float32, device=x[0].device)
                    # Step-major rows: row k * B + i is item i at point k.
                    pts = tuple((bi[None] + alpha.view(s, *[1] * di.ndim) * di[None]).reshape(s * b, *di.shape[1:])
                                .requires_grad_() for bi, di in zip(base, diff, strict=True))
                    out = class_logits(self.forward_func(*pts, *_repeat_steps(args, s)), self.output_index)
                    scores = _scores(out, targets.repeat(s, 1))
                    for t in range(n_t):
                        grads = torch.autograd.grad(scores[:, t].sum(), pts, retain_graph=t < n_t - 1,
                                                    allow_unused=True)
                        for tot, g in zip(total, grads, strict=True):
                            if g is not None:
                                tot[t] += (g.float().view(s, b, *g.shape[1:]) * w.view(s, *[1] * (g.ndim))).sum(0)
                    del out, scores, pts
                    tick(end / self.n_steps)
        raw = tuple(d.float()[:, None] * tot.transpose(0, 1) for d, tot in zip(diff, total, strict=True))
        change = _scores(logits, targets) - _scores(base_logits, targets)
        delta = sum(r.flatten(2).sum(-1) for r in raw) - change.float()
        return self.finish(raw, targets, logits, layer=None, delta=delta,
                           extras={"n_steps": self.n_steps, "method": self.method,
                                   "baseline": _describe(self.baseline)})

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_steps={self.n_steps}, method={self.method!r}, "
                f"baseline={_describe(self.baseline)!r})")


def _describe(baseline: Baseline) -> Any:
    """A JSON-ready description of a baseline (the value, or 'tensor')."""
    if isinstance(baseline, torch.Tensor):
        return "tensor"
    if isinstance(baseline, Sequence):
        return [_describe(b) for b in baseline]
    return float(baseline)


def _rows_of(args: tuple[Any, ...], b: int) -> tuple[Any, ...]:
    """``args`` with one-row tensors expanded to ``b`` rows (a shared baseline argument)."""
    return tuple(a.expand(b, *a.shape[1:]) if isinstance(a, torch.Tensor) and a.ndim and a.shape[0] == 1 and b > 1
                 else a for a in args)


class _StopForward(Exception):
    """Raised by a forward hook to end a forward at the layer (the rest is not needed)."""


class LayerIntegratedGradients(Explainer):
    """Integrated gradients at a layer's output, from the layer's output for the baseline input.

    ``LayerIntegratedGradients(model, layer=None, baseline=0.0, n_steps=32, method="gausslegendre",
    internal_batch_size=8, forward_from=None, output_index=0)``; built on the module (its layer is
    hooked). Equals captum's ``LayerIntegratedGradients(model, layer).attribute(x, baselines=baseline,
    n_steps=n_steps, method=method)`` (attribution to the layer output).

    layer: a module of the model or its dotted name; default the model's ``default_cam_layer``. It
        must output one tensor ``(B, K, *s)`` with as many spatial dims as input 0, and run once per
        forward.
    baseline: the baseline *input* (see :class:`IntegratedGradients`; default 0.0, MR background);
        the path at the layer starts at the layer's output for it.
    forward_from: ``(layer output, *additional_forward_args) -> class logits``: the network after
        the layer. With it the steps skip the layers before the attributed one; without it they are
        rerun, without autograd, on every chunk (captum-style forward hooks). It must compute what
        the model computes after the layer; the adapter passes ``net.forward_from`` for
        ``BrainLesionNet``'s sequential stages.
    internal_batch_size: rows (steps x batch items) per forward+backward of the rest of the network.

    also: further layers (modules or dotted names) whose outputs are integrated along the same path,
        from their output on the baseline to their output on the input (captum's
        ``LayerIntegratedGradients`` with a list of layers). A VQA model's question-embedding layer
        goes here: its attribution (``aux_raw[name]``, ``(B, T, *layer_shape)``) gives one score per
        token, while the noise of a tunnel stays on input 0 (the image). Each must run once per
        forward; not with ``forward_from``.
    baseline_args: ``(*additional_forward_args) -> baseline additional_forward_args``: the extra
        arguments of the baseline forward (a VQA question's reference ids: ``[CLS] [PAD]... [SEP]``,
        the baseline of captum's BERT tutorial). Default: the same arguments.

    ``layer_raw`` is ``(B, T, K, *s)`` in logit units; ``raw[0]`` its channel sum, upsampled
    (trilinear, ``align_corners=False``) to input 0's grid, ``(B, T, 1, *spatial)`` (a per-voxel
    density: values are not rescaled, so the sum is not preserved across resolutions);
    ``delta`` ``(B, T)`` = ``sum(layer_raw) + sum(aux_raw) - (F(x) - F(baseline))``.
    """

    title = "Layer Integrated Gradients (Sundararajan et al. 2017, at a layer)"
    model_kinds = PATH_MODEL_KINDS
    needs = "gradients"
    display = "absolute"

    def __init__(self, model: nn.Module, *, layer: LayerSpec = None, baseline: Baseline = 0.0, n_steps: int = 32,
                 method: str = "gausslegendre", internal_batch_size: int | None = 8,
                 forward_from: Callable[..., Any] | None = None, output_index: int | str = 0,
                 also: Sequence[LayerSpec] = (), baseline_args: Callable[..., tuple[Any, ...]] | None = None):
        super().__init__(require_module(model, type(self).__name__), output_index=output_index)
        name = layer_name_for(model, layer)
        if name is None:
            raise ValueError("no layer given and the model declares no default_cam_layer: pass layer=")
        self.layer_name: str = name
        self.also: tuple[str, ...] = tuple(str(layer_name_for(model, a)) for a in also)
        if self.also and forward_from is not None:
            raise ValueError("also= needs the whole forward (hooks): it cannot be combined with forward_from")
        self.baseline_args = baseline_args
        self.alphas, self.weights = quadrature(method, n_steps)
        self.baseline, self.n_steps, self.method = baseline, n_steps, method
        self.internal_batch_size = internal_batch_size
        self.forward_from = forward_from

    # -- pieces of the network ------------------------------------------------------------------------------

    def _layer(self) -> nn.Module:
        return self.model.get_submodule(self.layer_name)

    def _prefix(self, inputs: tuple[torch.Tensor, ...], args: tuple[Any, ...],
                full: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The outputs of the layer and of the ``also`` layers, ``[(B, K, *s), ...]`` (no autograd),
        for ``inputs`` and, with ``full``, the class logits of the same forward; without ``full`` the
        forward stops once every layer has run. Runs in chunks of ``internal_batch_size`` rows: under a
        noise tunnel ``B`` counts every copy."""
        b, ibs = inputs[0].shape[0], self.internal_batch_size
        if ibs is None or b <= ibs:
            return self._prefix_rows(inputs, args, full)
        parts = []
        for start in range(0, b, ibs):
            rows = slice(start, min(start + ibs, b))
            parts.append(self._prefix_rows(
                tuple(t[rows] for t in inputs),
                tuple(v[rows] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == b else v for v in args),
                full))
        acts = [torch.cat([p[0][i] for p in parts]) for i in range(len(parts[0][0]))]
        return acts, (torch.cat([p[1] for p in parts]) if full else None)  # type: ignore[misc]

    def _prefix_rows(self, inputs: tuple[torch.Tensor, ...], args: tuple[Any, ...],
                     full: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        names = (self.layer_name, *self.also)
        store: dict[str, Any] = {}

        def hook_for(name: str):
            def hook(_m: nn.Module, _a: Any, out: Any) -> None:
                store[name] = out
                if not full and len(store) == len(names):
                    raise _StopForward
            return hook

        handles = [self.model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
        try:
            with torch.no_grad():
                try:
                    logits = self.logits(inputs, args)
                except _StopForward:
                    logits = None
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in names if n not in store]
        if missing:
            raise RuntimeError(f"layer {missing[0]!r} did not run in the forward pass")
        acts = store[self.layer_name]
        if not isinstance(acts, torch.Tensor) or acts.ndim != inputs[0].ndim:
            got = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
            raise ValueError(f"layer {self.layer_name!r} must output a (B, K, *spatial) tensor with "
                             f"{inputs[0].ndim - 2} spatial dims, got {got}")
        for n in self.also:
            if not isinstance(store[n], torch.Tensor) or not store[n].is_floating_point():
                raise ValueError(f"layer {n!r} must output one floating-point tensor")
        return [store[n].detach() for n in names], logits

    def _suffix(self, hs: list[torch.Tensor], inputs: tuple[torch.Tensor, ...],
                args: tuple[Any, ...]) -> torch.Tensor:
        """Class logits ``(R, N)`` with the layers' outputs set to ``hs`` (the layer's ``(R, K, *s)``
        first, then the ``also`` layers'); ``inputs`` and ``args`` already have ``R`` rows (only used
        without ``forward_from``)."""
        if self.forward_from is not None:
            return class_logits(self.forward_from(hs[0], *args), self.output_index)
        grad_mode = torch.is_grad_enabled()

        def replace_with(h: torch.Tensor):
            def replace(_m: nn.Module, _a: Any, _out: Any) -> torch.Tensor:
                # The layers before this one ran without autograd (nothing to differentiate there);
                # from here on the graph is recorded, back to h only.
                torch.set_grad_enabled(grad_mode)
                return h
            return replace

        names = (self.layer_name, *self.also)
        handles = [self.model.get_submodule(n).register_forward_hook(replace_with(h))
                   for n, h in zip(names, hs, strict=True)]
        try:
            with torch.no_grad():
                out = self.forward_func(*inputs, *args)
        finally:
            for handle in handles:
                handle.remove()
            torch.set_grad_enabled(grad_mode)
        return class_logits(out, self.output_index)

    # -- the call -------------------------------------------------------------------------------------------

    def _attribute(self, inputs: tuple[torch.Tensor, ...], target: Target, args: tuple[Any, ...],
                   tick: Ticker) -> Attribution:
        _check_floating(inputs[:1], type(self).__name__)
        x = tuple(t.detach() for t in inputs)
        b = x[0].shape[0]
        bargs = _rows_of(self.baseline_args(*args), b) if self.baseline_args is not None else args
        with eval_mode(self.model):
            acts, logits = self._prefix(x, args, full=self.forward_from is None)
            base = _baselines(self.baseline, x)
            # A baseline shared by every item (a constant, the default) needs the layers before the
            # attributed one once, on one row, unless the extra args carry per-item tensors.
            shared = all(t.shape[0] == 1 for t in base) and not any(isinstance(a, torch.Tensor) for a in bargs)
            base = base if shared else tuple(t.expand_as(xi) for t, xi in zip(base, x, strict=True))
            base_acts, base_logits = self._prefix(base, bargs, full=self.forward_from is None)
            with torch.no_grad():
                if self.forward_from is not None:
                    logits = self._suffix(acts, x, args)
                    base_logits = self._suffix(base_acts, base, bargs)
            targets = resolve_targets(target, logits)
            n_t = targets.shape[1]
            diffs = [a - ba for a, ba in zip(acts, base_acts, strict=True)]  # (B, K, *s) each
            totals = [torch.zeros((n_t, *a.shape), dtype=torch.float32, device=a.device) for a in acts]
            with torch.enable_grad():
                for start, end in _chunks(self.n_steps, b, self.internal_batch_size):
                    s = end - start
                    hs = []
                    for a, ba, d in zip(acts, base_acts, diffs, strict=True):
                        alpha = torch.tensor(self.alphas[start:end], dtype=a.dtype, device=a.device)
                        h = (ba[None] + alpha.view(s, *[1] * a.ndim) * d[None]).reshape(s * b, *a.shape[1:])
                        hs.append(h.requires_grad_())
                    w = torch.tensor(self.weights[start:end], dtype=torch.float32, device=acts[0].device)
                    rows = () if self.forward_from is not None else tuple(
                        xi.repeat(s, *[1] * (xi.ndim - 1)) for xi in x)
                    scores = _scores(self._suffix(hs, rows, _repeat_steps(args, s)), targets.repeat(s, 1))
                    for t in range(n_t):
                        grads = torch.autograd.grad(scores[:, t].sum(), hs, retain_graph=t < n_t - 1,
                                                    allow_unused=True)
                        if grads[0] is None:
                            raise ValueError(f"the class logits do not depend on layer {self.layer_name!r}")
                        for tot, g in zip(totals, grads, strict=True):
                            if g is not None:
                                tot[t] += (g.float().view(s, b, *g.shape[1:]) * w.view(s, *[1] * g.ndim)).sum(0)
                    del scores, hs
                    tick(end / self.n_steps)
        layer_raws = [d.float()[:, None] * tot.transpose(0, 1) for d, tot in zip(diffs, totals, strict=True)]
        layer_raw = layer_raws[0]  # (B, T, K, *s)
        change = _scores(logits, targets) - _scores(base_logits.expand_as(logits), targets)
        delta = sum(r.flatten(2).sum(-1) for r in layer_raws) - change.float()
        raw = upsample(layer_raw.sum(2), x[0].shape[2:])[:, :, None]
        return self.finish((raw,), targets, logits, layer=self.layer_name, layer_raw=layer_raw, delta=delta,
                           aux_raw=dict(zip(self.also, layer_raws[1:], strict=True)),
                           extras={"n_steps": self.n_steps, "method": self.method,
                                   "baseline": _describe(self.baseline)})

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={type(self.model).__name__}, layer={self.layer_name!r}, "
                f"n_steps={self.n_steps}, method={self.method!r}, forward_from={self.forward_from is not None})")


@register("relig")
class RELIG(NoiseTunnel):
    """RE-LIG: :class:`LayerIntegratedGradients` at an early layer, averaged over noisy copies of the
    voxels (:class:`~xai_core.explain.noise_tunnel.NoiseTunnel`, SmoothGrad).

    ``RELIG(model, layer=None, n_samples=8, stdev_fraction=0.1, seed=0, n_steps=16,
    method="gausslegendre", baseline=0.0, internal_batch_size=8, samples_batch_size=None,
    nt_type="smoothgrad", forward_from=None, output_index=0)``.

    layer: default the model's ``default_cam_layer``; the model card names the measured one
        (``layers.relig``; ``down1`` for ``brain-lesion-3d``: validation AUPRC 0.73 against 0.67 at
        ``stem`` and 0.55 at ``down2``, see ``docs/benchmarks.md``).
    display: ``absolute`` (AUPRC 0.73 against 0.71 for ``positive`` at ``down1``; same Dice).
    n_samples, stdev_fraction, seed, nt_type, samples_batch_size: the noise tunnel's; sigma is
        ``stdev_fraction`` of each input's intensity range (max - min) per item.
    n_steps, method, baseline, internal_batch_size, forward_from, also, baseline_args: the layer
        integral's (a VQA model attributes its question embedding with ``also``; the noise stays on
        the image, never on token ids).

    Equals captum's ``NoiseTunnel(LayerIntegratedGradients(model, layer)).attribute(x,
    nt_samples=n_samples, nt_samples_batch_size=1, stdevs=sigma, n_steps=n_steps)`` with
    ``torch.manual_seed(seed)`` before it (the same noise). ``raw[0]`` ``(B, T, 1, *spatial)``, ``layer_raw``
    ``(B, T, K, *s)`` and ``delta`` ``(B, T)`` are means over the copies.
    """

    title = ("RE-LIG: Layer Integrated Gradients (Sundararajan et al. 2017) with noise tunnelling "
             "(SmoothGrad, Smilkov et al. 2017)")
    model_kinds = PATH_MODEL_KINDS
    needs = "gradients"
    display = "absolute"
    param_bounds = {"n_samples": (1, 64), "n_steps": (2, 128), "stdev_fraction": (0.0, 0.5)}

    def __init__(self, model: nn.Module, *, layer: LayerSpec = None, n_samples: int = 8,
                 stdev_fraction: float = 0.1, seed: int = 0, n_steps: int = 16, method: str = "gausslegendre",
                 baseline: Baseline = 0.0, internal_batch_size: int | None = 8,
                 samples_batch_size: int | None = None, nt_type: NoiseType = "smoothgrad",
                 forward_from: Callable[..., Any] | None = None, output_index: int | str = 0,
                 also: Sequence[LayerSpec] = (), baseline_args: Callable[..., tuple[Any, ...]] | None = None):
        lig = LayerIntegratedGradients(model, layer=layer, baseline=baseline, n_steps=n_steps, method=method,
                                       internal_batch_size=internal_batch_size, forward_from=forward_from,
                                       output_index=output_index, also=also, baseline_args=baseline_args)
        super().__init__(lig, n_samples=n_samples, stdev_fraction=stdev_fraction, seed=seed, nt_type=nt_type,
                         samples_batch_size=samples_batch_size)

    @property
    def layer_name(self) -> str:
        return self.explainer.layer_name

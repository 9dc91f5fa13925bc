"""Noise tunnel (SmoothGrad, Smilkov et al. 2017): any :class:`Explainer`, averaged over noisy copies.

``NoiseTunnel(explainer, n_samples=8, stdev_fraction=0.1, seed=0)`` adds Gaussian noise to input 0
(the image) ``n_samples`` times and combines the inner explainer's raw attributions:

* ``smoothgrad``: their mean (``raw``, ``layer_raw``, ``aux_raw`` and ``delta`` are means over the copies);
* ``smoothgrad_sq``: the mean of their squares; ``vargrad``: their variance (no delta for either).

Noise: sigma is ``stdev_fraction`` times input 0's intensity range (max - min over the item's
voxels and channels), per batch item, so the same setting means the same relative noise for any
intensity scale (captum's ``NoiseTunnel`` takes an absolute sigma, 1.0 by default, which is twice
the whole range of a normalised MR volume). 0.1 is the low end of the 10-20 % that Smilkov et al.
found to sharpen gradient maps on images; more noise blurs a 3-D lesion map. Only input 0 is noised:
further inputs (and ``additional_forward_args``, e.g. token ids) are repeated unchanged, unlike
captum, which noises every input and breaks on integer ids (captum issue 1281).

Seeded: a CPU ``torch.Generator`` seeded with ``seed`` draws one standard normal tensor
``(B, *input.shape[1:])`` per copy, in copy order, so the noise (and the result) does not depend on
``samples_batch_size`` or the device. That is captum's draw with ``nt_samples_batch_size=1``: with
``torch.manual_seed(seed)`` before captum's ``NoiseTunnel.attribute(..., nt_samples_batch_size=1,
stdevs=sigma)`` both add the same noise (sigma equal for every item: captum has one per input).

Targets are resolved once on the clean input (the predicted class of the image, not of each copy).
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
from torch import nn

from .base import Attribution, Display, Explainer, Needs, Ticker, eval_mode
from .targets import Target, resolve_targets

__all__ = ["NoiseTunnel", "NoiseType", "NOISE_TYPES", "owner_eval_mode"]

NoiseType = Literal["smoothgrad", "smoothgrad_sq", "vargrad"]
NOISE_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def owner_eval_mode(forward_func: Any) -> contextlib.AbstractContextManager[Any]:
    """Eval mode for the module behind ``forward_func``: the module itself or, for a bound method
    such as ``net.classify``, its owner (dropout off, batch-norm running statistics); a plain
    function runs as it is."""
    owner = forward_func if isinstance(forward_func, nn.Module) else getattr(forward_func, "__self__", None)
    return eval_mode(owner) if isinstance(owner, nn.Module) else contextlib.nullcontext()


def _sub_ticker(tick: Ticker, lo: float, hi: float) -> Ticker:
    """A ticker for one part of the work that reports ``lo..hi`` of the whole (and still cancels)."""
    return Ticker(lambda f: tick(lo + (hi - lo) * f), None)


class _Sums:
    """Running sums over copies of one ``(B * m, ...)`` tensor, grouped per item."""

    def __init__(self) -> None:
        self.s: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None

    def add(self, value: torch.Tensor, b: int, m: int, squares: bool) -> None:
        v = value.float().view(b, m, *value.shape[1:])
        s = v.sum(1)
        self.s = s if self.s is None else self.s + s
        if squares:
            sq = (v * v).sum(1)
            self.sq = sq if self.sq is None else self.sq + sq

    def combine(self, n: int, nt_type: NoiseType) -> torch.Tensor:
        assert self.s is not None
        mean = self.s / n
        if nt_type == "smoothgrad":
            return mean
        assert self.sq is not None
        mean_sq = self.sq / n
        return mean_sq if nt_type == "smoothgrad_sq" else mean_sq - mean * mean


class NoiseTunnel(Explainer):
    """``explainer`` averaged over ``n_samples`` noisy copies of input 0 (see the module docstring).

    ``NoiseTunnel(explainer, n_samples=8, stdev_fraction=0.1, seed=0, nt_type="smoothgrad",
    samples_batch_size=None)``.

    samples_batch_size: copies per call of the inner explainer (None: all at once). Each call sees a
        batch of ``B * m`` rows, so the inner method batches the copies (for a path method: one
        forward to its layer for all copies, and its ``internal_batch_size`` still bounds the rows
        per step); smaller values bound the memory of methods that hold every row at once.

    The title, model kinds, needs and display are the inner explainer's unless a subclass declares
    its own. The result's ``extras`` holds the inner one's (first call) plus ``n_samples``,
    ``stdev_fraction``, ``stdev`` (sigma per item, input units), ``seed``, ``nt_type`` and, for
    ``smoothgrad``, ``delta_abs_max`` (largest absolute delta over the copies, per item and target).
    """

    def __init__(self, explainer: Explainer, *, n_samples: int = 8, stdev_fraction: float = 0.1, seed: int = 0,
                 nt_type: NoiseType = "smoothgrad", samples_batch_size: int | None = None):
        if not isinstance(explainer, Explainer):
            raise TypeError(f"NoiseTunnel wraps an Explainer, got {type(explainer).__name__}")
        super().__init__(explainer.forward_func, output_index=explainer.output_index)
        if n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}")
        if not stdev_fraction >= 0.0:
            raise ValueError(f"stdev_fraction must be >= 0, got {stdev_fraction}")
        if nt_type not in NOISE_TYPES:
            raise ValueError(f"nt_type must be one of {NOISE_TYPES}, got {nt_type!r}")
        if samples_batch_size is not None and samples_batch_size < 1:
            raise ValueError(f"samples_batch_size must be at least 1 or None, got {samples_batch_size}")
        self.explainer = explainer
        self.n_samples, self.stdev_fraction, self.seed = int(n_samples), float(stdev_fraction), int(seed)
        self.nt_type: NoiseType = nt_type
        self.samples_batch_size = samples_batch_size

    # The inner explainer's declarations, unless a (registered) subclass sets class attributes.
    @property  # type: ignore[override]
    def title(self) -> str:
        return f"{self.explainer.title} + noise tunnel"

    @property  # type: ignore[override]
    def model_kinds(self) -> frozenset[str]:
        return self.explainer.model_kinds

    @property  # type: ignore[override]
    def needs(self) -> Needs:
        return self.explainer.needs

    @property  # type: ignore[override]
    def display(self) -> Display:
        return self.explainer.display

    def _parts(self) -> list[int]:
        m = self.n_samples if self.samples_batch_size is None else min(self.samples_batch_size, self.n_samples)
        parts = [m] * (self.n_samples // m)
        return parts + ([self.n_samples % m] if self.n_samples % m else [])

    def _attribute(self, inputs: tuple[torch.Tensor, ...], target: Target, args: tuple[Any, ...],
                   tick: Ticker) -> Attribution:
        x = tuple(t.detach() for t in inputs)
        x0 = x[0]
        if not x0.is_floating_point():
            raise TypeError("the noise tunnel adds Gaussian noise to input 0, which must be floating point")
        b = x0.shape[0]
        with torch.no_grad():
            with owner_eval_mode(self.forward_func):
                logits = self.logits(x, args)
        targets = resolve_targets(target, logits)
        flat = x0.float().flatten(1)
        sigma = self.stdev_fraction * (flat.amax(1) - flat.amin(1))  # (B,) input units
        gen = torch.Generator().manual_seed(self.seed)
        squares = self.nt_type != "smoothgrad"
        raw_sums: list[_Sums] = []
        layer_sums, delta_sums = _Sums(), _Sums()
        aux_sums: dict[str, _Sums] = {}
        delta_abs_max: torch.Tensor | None = None
        first: Attribution | None = None
        done = 0
        for m in self._parts():
            # One draw (B, *shape) per copy, in copy order, on a CPU generator: the noise does not depend
            # on samples_batch_size nor on the device. Rows are item-major (row i * m + j: copy j of item i).
            noise = torch.stack([torch.randn((b, *x0.shape[1:]), generator=gen, dtype=torch.float32)
                                 for _ in range(m)], dim=1).reshape(b * m, *x0.shape[1:])
            noise = noise.to(device=x0.device, dtype=x0.dtype) * sigma.to(x0.dtype).repeat_interleave(m).view(
                -1, *[1] * (x0.ndim - 1))
            noisy = (x0.repeat_interleave(m, 0) + noise, *(xi.repeat_interleave(m, 0) for xi in x[1:]))
            del noise
            rep_args = tuple(a.repeat_interleave(m, 0) if isinstance(a, torch.Tensor) and a.ndim else a for a in args)
            sub = _sub_ticker(tick, done / self.n_samples, (done + m) / self.n_samples)
            att = self.explainer._attribute(noisy, targets.repeat_interleave(m, 0), rep_args, sub)
            del noisy
            if first is None:
                first = att
            if not raw_sums:
                raw_sums = [_Sums() for _ in att.raw]
            for acc, r in zip(raw_sums, att.raw, strict=True):
                acc.add(r, b, m, squares)
            if att.layer_raw is not None:
                layer_sums.add(att.layer_raw, b, m, squares)
            for name, value in att.aux_raw.items():
                aux_sums.setdefault(name, _Sums()).add(value, b, m, squares)
            if att.delta is not None and not squares:
                delta_sums.add(att.delta, b, m, False)
                worst = att.delta.abs().view(b, m, -1).amax(1)
                delta_abs_max = worst if delta_abs_max is None else torch.maximum(delta_abs_max, worst)
            done += m
            tick(done / self.n_samples)
        assert first is not None
        raw = tuple(acc.combine(self.n_samples, self.nt_type) for acc in raw_sums)
        extras = {**first.extras, "n_samples": self.n_samples, "stdev_fraction": self.stdev_fraction,
                  "stdev": [float(v) for v in sigma.tolist()], "seed": self.seed, "nt_type": self.nt_type}
        if delta_abs_max is not None:
            extras["delta_abs_max"] = delta_abs_max.tolist()
        return self.finish(raw, targets, logits, layer=first.layer,
                           layer_raw=layer_sums.combine(self.n_samples, self.nt_type) if layer_sums.s is not None
                           else None,
                           delta=delta_sums.combine(self.n_samples, "smoothgrad") if delta_sums.s is not None
                           else None,
                           extras=extras,
                           aux_raw={k: v.combine(self.n_samples, self.nt_type) for k, v in aux_sums.items()})

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.explainer!r}, n_samples={self.n_samples}, "
                f"stdev_fraction={self.stdev_fraction}, seed={self.seed}, nt_type={self.nt_type!r})")

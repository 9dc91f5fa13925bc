"""Score-CAM (Wang et al. 2020) for 2-D and 3-D CNNs, without gradients.

Each activation channel ``A_k`` of the CAM layer (``(K, *s)`` per item) is upsampled to the input
grid, min-max scaled to a 0..1 mask ``M_k`` and used to mask the input; the masked inputs
``x * M_k`` run through the model in chunks of ``batch_size`` and give the softmax probability of
each target class, ``p_k``. Then::

    map = ReLU(sum_k w_k A_k),   w_k = p_k            (subtract_baseline=False, the paper's code)
                                 w_k = p_k - p_0      (subtract_baseline=True; p_0 = probability for
                                                       the all-zero input x * 0, the paper's eq. 4)

Cost: about ``K`` forward passes per item (``K`` = layer channels), under ``torch.no_grad``.
Channels that are constant on the layer give an all-zero mask; they share one forward of ``x * 0``.
pytorch-grad-cam's ScoreCAM is 2-D only (and applies the softmax across channels, not classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import CAMExplainer, LayerSpec, Ticker, register, upsample


@register("scorecam")
class ScoreCAM(CAMExplainer):
    """``ScoreCAM(model, layer=None, output_index=0, batch_size=16, subtract_baseline=False)``.

    ``batch_size``: masked inputs per forward (bounds memory: ``batch_size`` copies of one input).
    Extra inputs and ``additional_forward_args`` are passed unmasked (only input 0 is masked).
    """

    title = "Score-CAM (Wang et al. 2020)"
    needs = "activations"

    def __init__(self, model: nn.Module, *, layer: LayerSpec = None, output_index: int | str = 0,
                 batch_size: int = 16, subtract_baseline: bool = False):
        super().__init__(model, layer=layer, output_index=output_index)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = int(batch_size)
        self.subtract_baseline = bool(subtract_baseline)

    def _probs(self, x: torch.Tensor, rest: tuple[torch.Tensor, ...], args: tuple) -> torch.Tensor:
        n = x.shape[0]
        rest = tuple(r.expand(n, *r.shape[1:]) for r in rest)
        return F.softmax(self.logits((x, *rest), args).float(), dim=1)

    @torch.no_grad()
    def _raw_maps(self, inputs: tuple[torch.Tensor, ...], args: tuple, acts: torch.Tensor, logits: torch.Tensor,
                  targets: torch.Tensor, tick: Ticker) -> torch.Tensor:
        size = inputs[0].shape[2:]
        a_all = acts.detach().float()
        maps = []
        n_items = inputs[0].shape[0]
        for b in range(n_items):
            x = inputs[0][b:b + 1].detach()
            rest = tuple(t[b:b + 1].detach() for t in inputs[1:])
            a = a_all[b]  # (K, *s)
            k = a.shape[0]
            flat_a = a.flatten(1)
            live = (flat_a.amax(1) > flat_a.amin(1)).nonzero().flatten()
            probs = torch.empty(k, logits.shape[1], device=a.device)
            p0 = None
            if self.subtract_baseline or live.numel() < k:
                p0 = self._probs(x * 0, rest, args)[0]
                probs[:] = p0
            for start in range(0, live.numel(), self.batch_size):
                idx = live[start:start + self.batch_size]
                m = upsample(a[idx][None], size)[0]  # (n, *S)
                mf = m.flatten(1)
                lo, hi = mf.amin(1, keepdim=True), mf.amax(1, keepdim=True)
                rng = hi - lo
                mf = torch.where(rng > 0, (mf - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)),
                                 torch.zeros_like(mf))
                masked = x * mf.view(-1, 1, *size).to(x.dtype)  # (n, C, *S)
                probs[idx] = self._probs(masked, rest, args)
                tick((b + (start + len(idx)) / max(1, live.numel())) / n_items)
            w = probs[:, targets[b]]  # (K, T)
            if self.subtract_baseline:
                w = w - p0[targets[b]][None, :]
            maps.append(F.relu(torch.einsum("kt,k...->t...", w, a)))
        return torch.stack(maps, dim=0)  # (B, T, *s)

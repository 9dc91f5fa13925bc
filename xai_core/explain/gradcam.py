"""Grad-CAM and Grad-CAM++ for 2-D and 3-D CNNs, batched, any number of target classes per call.

Cost: one forward with a single forward hook on the CAM layer, then for each target ``t`` one
``torch.autograd.grad(score_t, activations)``. That backward stops at the layer and computes no
weight gradients, so one class costs less than the model's forward+backward, and every further
class adds only the backward from the logits to the layer (for ``BrainLesionNet``: the pooling
and the linear classifier).

Why not MONAI's ``GradCAM`` / ``GradCAMpp`` (``monai.visualize``): their default post-processing
inverts the map (maximum becomes 0), each class needs a new forward and a full backward (weight
gradients included), they keep hooks registered on the model for the object's lifetime, and their
Grad-CAM++ denominator sums ``A * g^3`` over space instead of the paper's ``sum(A) * g^3`` (eq. 19
of Chattopadhyay et al.; the two agree when the gradient is constant over space, e.g. a layer
followed only by global average pooling). pytorch-grad-cam's Grad-CAM++ fails on 3-D activations.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import CAMExplainer, LayerSpec, Ticker, register


def _spatial_dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.ndim))


def layer_gradients(logits: torch.Tensor, acts: torch.Tensor, targets: torch.Tensor,
                    layer: str | None = None) -> Iterator[torch.Tensor]:
    """Yield ``d logits[b, targets[b, t]] / d acts`` as ``(B, K, *s)`` for each ``t`` in turn.

    Items of a batch are independent in eval mode, so the gradient of the batch sum of the scores
    is each item's own gradient. The graph is kept until the last target.
    """
    n_t = targets.shape[1]
    for t in range(n_t):
        score = logits.gather(1, targets[:, t:t + 1]).sum()
        (grad,) = torch.autograd.grad(score, acts, retain_graph=t < n_t - 1, allow_unused=True)
        if grad is None:
            raise ValueError(f"the class logits do not depend on layer {layer!r}; choose a layer on the "
                             "classification path")
        yield grad


@register("gradcam")
class GradCAM(CAMExplainer):
    """Grad-CAM: ``ReLU(sum_k w_k A_k)``, ``w_k`` = spatial mean of ``dS/dA_k``.

    ``GradCAM(model, layer=None, output_index=0)``; ``attribute(x (B, C, *spatial), target)``.
    Layer and target rules: :mod:`xai_core.explain.base`.
    """

    title = "Grad-CAM (Selvaraju et al. 2017)"

    def _weights(self, acts: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad.mean(dim=_spatial_dims(grad))  # (B, K)

    def _raw_maps(self, inputs: tuple[torch.Tensor, ...], args: tuple, acts: torch.Tensor, logits: torch.Tensor,
                  targets: torch.Tensor, tick: Ticker) -> torch.Tensor:
        a = acts.detach()
        maps = []
        for t, grad in enumerate(layer_gradients(logits, acts, targets, self._layer_name)):
            tick(t / targets.shape[1])
            w = self._weights(a, grad.detach())
            maps.append(torch.einsum("bk,bk...->b...", w, a))
        return F.relu(torch.stack(maps, dim=1))  # (B, T, *s)


@register("gradcam++")
class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++ with the closed-form weights of eq. 19 of Chattopadhyay et al.

    With ``g = dS/dA`` of the class logit ``S`` and ``Y = exp(S)``, the higher derivatives of ``Y``
    are ``exp(S) g^2`` and ``exp(S) g^3`` (exact for a piecewise-linear network), giving::

        alpha = g^2 / (2 g^2 + sum_space(A) g^3)        (0 where the denominator is 0)
        w_k   = exp(S) * sum_space(alpha * ReLU(g))
        map   = ReLU(sum_k w_k A_k)

    ``exp(S)`` is a positive constant per (item, class) map, removed by the min-max scaling, so it
    is left out: it would overflow float32 for logits above ~88 and turn the map into NaNs.

    ``variant="monai"`` uses MONAI's denominator ``2 g^2 + sum_space(A g^3)`` instead, to reproduce
    ``monai.visualize.GradCAMpp``; both agree when ``g`` is constant over space.
    ``GradCAMPlusPlus(model, layer=None, output_index=0, variant="paper")``.
    """

    title = "Grad-CAM++ (Chattopadhyay et al. 2018)"

    def __init__(self, model: nn.Module, *, layer: LayerSpec = None, output_index: int | str = 0,
                 variant: Literal["paper", "monai"] = "paper"):
        super().__init__(model, layer=layer, output_index=output_index)
        if variant not in ("paper", "monai"):
            raise ValueError(f"variant must be 'paper' or 'monai', got {variant!r}")
        self.variant = variant

    def _weights(self, acts: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        dims = _spatial_dims(grad)
        g2 = grad * grad
        g3 = g2 * grad
        if self.variant == "paper":
            denom = 2.0 * g2 + acts.sum(dim=dims, keepdim=True) * g3
        else:
            denom = 2.0 * g2 + (acts * g3).sum(dim=dims, keepdim=True)
        alpha = g2 / torch.where(denom != 0.0, denom, torch.ones_like(denom))
        return (alpha * F.relu(grad)).sum(dim=dims)  # (B, K)

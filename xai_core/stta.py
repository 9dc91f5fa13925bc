"""Supervised test-time adaptation (STTA): a photometric transform learnt on one input, model frozen.

MedLIME explains the model on ``f_phi(x)`` instead of ``x``, where ``f_phi`` undoes some of the
scanner's appearance (contrast, brightness, sharpness) that the model did not see in training, so
that the perturbation samples are drawn around an input the model reads confidently.

Transform (geometry-preserving: every voxel stays where it is), on a normalised intensity ``x >= 0``::

    g(x)    = scale * x ** gamma + shift                  (intensity scale, gamma, shift)
    f_phi(x) = (1 - beta) * g(x) + beta * blur_2(g(x))    (blur: a blend with a Gaussian of 2 voxels)

with ``phi = (log scale, shift, log gamma, logit beta)``, started at the identity (``beta`` starts at
``sigmoid(-6) = 0.0025``: the identity up to 0.25 % of a blur). Only background voxels (at the input's
minimum) are kept as they are, so the shift does not light up the air around the head.

Objective: the mean cross-entropy of the frozen model over ``S`` views of ``f_phi(x)`` for the label
``y``; the views are small random rotations (up to ``max_angle_deg`` about each axis) and crops
(zoom ``1..1 + max_zoom``), made by one affine resampling each, fixed per call (seeded). ``phi`` is
learnt by Adam (``lr`` 0.05) for ``steps`` (20) steps; gradients flow through the model to ``phi``
only (the weights are untouched and get no ``.grad``). Which label: **the label given by the caller;
MedLIME passes the explained target class, which is the model's own prediction unless the user asked
for a class** (so by default STTA sharpens the model's confidence in what it predicted).

Cost: ``steps * S`` forward and backward passes of the class path (default 20 x 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .explain.fills import gaussian_blur

__all__ = ["STTA", "STTAResult", "photometric", "random_views"]


def photometric(x: torch.Tensor, phi: torch.Tensor, blur_sigma: float = 2.0) -> torch.Tensor:
    """``f_phi(x)`` for ``x (B, C, *S)`` and ``phi (4,)`` (module docstring); background kept."""
    scale, shift, gamma, beta = phi[0].exp(), phi[1], phi[2].exp(), torch.sigmoid(phi[3])
    g = scale * x.clamp(min=0).pow(gamma) + shift
    out = (1 - beta) * g + beta * gaussian_blur(g, blur_sigma)
    background = x <= x.flatten(2).amin(2).view(*x.shape[:2], *([1] * (x.ndim - 2)))
    return torch.where(background, x, out)


def random_views(x: torch.Tensor, n_views: int, generator: torch.Generator, max_angle_deg: float = 8.0,
                 max_zoom: float = 0.1) -> list[torch.Tensor]:
    """``n_views`` affine-resampled copies of ``x (1, C, *S)`` (2-D or 3-D): random rotation and crop (zoom)."""
    nd = x.ndim - 2
    views = []
    for _ in range(n_views):
        ang = (torch.rand(3 if nd == 3 else 1, generator=generator) * 2 - 1) * math.radians(max_angle_deg)
        zoom = 1.0 + float(torch.rand((), generator=generator)) * max_zoom
        if nd == 3:
            cx, cy, cz = (torch.cos(a) for a in ang)
            sx, sy, sz = (torch.sin(a) for a in ang)
            rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
            ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
            rot = rz @ ry @ rx
        else:
            c, s = torch.cos(ang[0]), torch.sin(ang[0])
            rot = torch.tensor([[c, -s], [s, c]])
        theta = torch.cat([rot / zoom, torch.zeros(nd, 1)], dim=1)[None].to(x.dtype).to(x.device)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        views.append(grid)
    return views


@dataclass
class STTAResult:
    """``x_adapted`` (detached, like ``x``), ``phi`` as named values, and the loss before and after."""

    x_adapted: torch.Tensor
    params: dict[str, float]
    loss_before: float
    loss_after: float
    history: list[float] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"params": self.params, "loss_before": round(self.loss_before, 5),
                "loss_after": round(self.loss_after, 5), "steps": len(self.history)}


class STTA:
    """``STTA(forward, steps=20, n_views=2, lr=0.05, seed=0)``: learn ``phi`` for one input and label.

    ``forward``: differentiable ``(x, *args) -> class logits (B, N)`` (the model's class path).
    """

    def __init__(self, forward: Callable[..., torch.Tensor], *, steps: int = 20, n_views: int = 2, lr: float = 0.05,
                 seed: int = 0, max_angle_deg: float = 8.0, max_zoom: float = 0.1):
        self.forward, self.steps, self.n_views, self.lr = forward, int(steps), int(n_views), float(lr)
        self.seed, self.max_angle_deg, self.max_zoom = int(seed), float(max_angle_deg), float(max_zoom)

    def _loss(self, x: torch.Tensor, phi: torch.Tensor, grids: list[torch.Tensor], label: torch.Tensor,
              args: tuple[Any, ...]) -> torch.Tensor:
        fx = photometric(x, phi)
        batch = torch.cat([F.grid_sample(fx, g, mode="bilinear", padding_mode="zeros", align_corners=False)
                           for g in grids])
        logits = self.forward(batch, *args)
        return F.cross_entropy(logits.float(), label.expand(batch.shape[0]))

    def adapt(self, x: torch.Tensor, label: int, args: tuple[Any, ...] = (),
              tick: Callable[[float], None] | None = None) -> STTAResult:
        """Learn ``phi`` on ``x (1, C, *S)`` for class ``label``; returns the adapted input and the losses."""
        g = torch.Generator().manual_seed(self.seed)
        grids = random_views(x, self.n_views, g, self.max_angle_deg, self.max_zoom)
        x = x.detach()
        phi = torch.tensor([0.0, 0.0, 0.0, -6.0], dtype=x.dtype, device=x.device, requires_grad=True)
        y = torch.tensor([int(label)], device=x.device)
        opt = torch.optim.Adam([phi], lr=self.lr)
        history = []
        with torch.enable_grad():
            for step in range(self.steps):
                loss = self._loss(x, phi, grids, y, args)
                (grad,) = torch.autograd.grad(loss, [phi])  # only phi: no .grad on the model's weights
                phi.grad = grad
                opt.step()
                history.append(float(loss.detach()))
                if tick is not None:
                    tick((step + 1) / max(1, self.steps))
            with torch.no_grad():
                final = float(self._loss(x, phi, grids, y, args)) if self.steps else float("nan")
        before = history[0] if history else final
        if history and final > before:  # never hand back an input the model reads worse than the original
            phi = torch.tensor([0.0, 0.0, 0.0, -1e4], dtype=x.dtype, device=x.device)
            final = before
        with torch.no_grad():
            x_adapted = photometric(x, phi.detach()).detach()
        p = phi.detach().cpu()
        params = {"scale": round(float(p[0].exp()), 5), "shift": round(float(p[1]), 5),
                  "gamma": round(float(p[2].exp()), 5), "blur_weight": round(float(torch.sigmoid(p[3])), 5)}
        return STTAResult(x_adapted=x_adapted, params=params, loss_before=before, loss_after=final, history=history)

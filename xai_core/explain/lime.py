"""LIME on fixed cubes (``lime``): perturbation units, masks, proximity kernel, fills and the surrogate.

The black box is any function from inputs to class logits (``needs = "forward"``); only input 0 is
perturbed. One explanation of an item ``x (1, C, *S)`` (2-D or 3-D spatial):

1. **Units** (:func:`patch_units`): the grid is cut into fixed squares (2-D) or cubes (3-D) of
   ``patch`` voxels a side (edge units are smaller when ``patch`` does not divide the size). Units
   whose voxels all lie at the background level (below 10 % of the input's range above its minimum)
   are not features: they hold no anatomy, and would only add unknowns to the fit (on a brain about
   half of the 512 cubes of the model grid are features).
2. **Masks** (:func:`sample_masks`): ``N`` binary vectors ``z in {0, 1}^d`` over the ``d`` feature
   units (1 = kept), sample ``i`` hiding exactly ``round(r_i d)`` units chosen at random, with
   ``r_i`` cycling through ``ratios`` (several masking ratios: small ones probe single units, large
   ones their interactions). The unperturbed input (``z = 1``) is row 0 of the fit.
3. **Fill** (:mod:`xai_core.explain.fills`): hidden voxels get a value: ``zero``, ``mean`` (the mean
   of the foreground), ``blur`` (a Gaussian-blurred copy) or ``mae`` (the masked autoencoder's
   reconstruction; MedLIME's generative masking). Samples are built and run through the forward in
   batches of ``batch_size``.
4. **Proximity** (:func:`proximity`): ``pi(z) = exp(-D(z, 1)^2 / sigma^2)`` with ``D`` the cosine
   distance between ``z`` and the all-ones vector, ``D = 1 - sqrt(|z| / d)`` (LIME's image kernel).
5. **Surrogate** (:func:`fit_surrogate`): per target, the weighted linear fit

       min_{w, b}  sum_i pi_i (y_i - b - z_i . w)^2 / sum_i pi_i  +  lambda1 |w|_1  +  lambda2 |w - w0|^2

   with ``y_i`` the target's logit on sample ``i`` and ``w0`` a prior (0 for LIME, the evidence
   map ``w_NW`` for MedLIME). The intercept is unpenalised and removed by weighted centring. Solver:
   with ``lambda1 = 0`` the closed form ``(A + lambda2 I) w = c + lambda2 w0`` (Cholesky, float64,
   ``A = Zc' Pi Zc / sum pi``, ``c = Zc' Pi yc / sum pi``); with ``lambda1 > 0`` FISTA (accelerated
   proximal gradient, Beck & Teboulle 2009) on the same float64 normal equations, step ``1 / L`` with
   ``L = 2 (lambda_max(A) + lambda2)``, soft-thresholding at ``lambda1 / L``, started from the closed
   form, stopped when the largest change of ``w`` is below ``tol`` times its largest entry.
6. **Paint back**: unit ``u``'s weight on each of its voxels: ``raw[0]`` is ``(B, T, 1, *S)`` in logit
   units per unit kept (the logit the unit adds when visible rather than filled). Display:
   ``positive`` (evidence for the target).

Cost: ``N + 1`` forwards per item (plus the fill: one MAE reconstruction per sample for ``mae``), all
targets from the same samples; the fit is milliseconds. captum's ``Lime`` computes the same kind of
explanation (``bench/medlime.py`` compares them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import Attribution, Explainer, ForwardFunc, Ticker, _check_image_input, register
from .fills import Fill, make_fill
from .targets import Target, resolve_targets

__all__ = ["LIME", "PatchUnits", "patch_units", "sample_masks", "proximity", "fit_surrogate", "Surrogate",
           "LIME_MODEL_KINDS"]

LIME_MODEL_KINDS = frozenset({"volume-classifier", "slice-classifier"})
# Background level, as a fraction of the input's range above its minimum: on the normalised model grid
# (bright tissue near 1, clipped at 2) 0.1-0.2, above MR air noise (about 0.01-0.05) and below tissue.
BACKGROUND = 0.1


# ----------------------------------------------------------------------------------------------------------
# Units, masks, kernel
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchUnits:
    """Fixed square / cube perturbation units of one spatial grid.

    labels:   ``(*S)`` int64, the unit index of each voxel (row-major over the unit grid).
    grid:     units per spatial axis.
    patch:    unit side in voxels per axis.
    features: ``(d,)`` int64 indices of the units that are features (the others never hide).
    """

    labels: torch.Tensor
    grid: tuple[int, ...]
    patch: tuple[int, ...]
    features: torch.Tensor

    @property
    def n_units(self) -> int:
        return int(math.prod(self.grid))

    @property
    def d(self) -> int:
        return int(self.features.numel())

    def hidden_voxels(self, keep: torch.Tensor) -> torch.Tensor:
        """Feature masks ``keep (n, d)`` bool (True = kept) -> hidden voxels ``(n, *S)`` bool."""
        hide_units = torch.zeros(keep.shape[0], self.n_units, dtype=torch.bool, device=keep.device)
        hide_units[:, self.features.to(keep.device)] = ~keep
        return hide_units[:, self.labels.to(keep.device)]

    def paint(self, w: torch.Tensor) -> torch.Tensor:
        """Feature weights ``(..., d)`` -> voxel maps ``(..., *S)`` (non-feature units get 0)."""
        full = torch.zeros(*w.shape[:-1], self.n_units, dtype=w.dtype, device=w.device)
        full[..., self.features.to(w.device)] = w
        return full[..., self.labels.to(w.device)]

    def unit_means(self, volume: torch.Tensor) -> torch.Tensor:
        """The mean of ``volume (*S)`` over each feature unit: ``(d,)`` (e.g. the lesion fraction per unit)."""
        lab = self.labels.to(volume.device).flatten()
        sums = torch.zeros(self.n_units, dtype=torch.float64, device=volume.device).index_add_(
            0, lab, volume.flatten().double())
        counts = torch.bincount(lab, minlength=self.n_units).clamp(min=1).double()
        return (sums / counts)[self.features.to(volume.device)]


def patch_units(spatial: Sequence[int], patch: int | Sequence[int], x: torch.Tensor | None = None,
                background: float = BACKGROUND) -> PatchUnits:
    """Units of side ``patch`` voxels on a grid of ``spatial`` size (1 to 3 dims).

    With ``x`` (``(C, *S)`` or ``(*S)``), units whose every voxel lies at or below ``min + background *
    (max - min)`` of ``x`` in every channel are left out of the features (empty background: MR air has
    noise, so "equal to the minimum" would keep every unit); without ``x`` every unit is a feature.
    """
    spatial = tuple(int(s) for s in spatial)
    p = (int(patch),) * len(spatial) if isinstance(patch, int) else tuple(int(v) for v in patch)
    if len(p) != len(spatial) or min(p) < 1:
        raise ValueError(f"patch {patch!r} does not fit a grid of {spatial}")
    grid = tuple(math.ceil(s / q) for s, q in zip(spatial, p, strict=True))
    labels = torch.zeros(spatial, dtype=torch.long)
    stride = 1
    for axis in reversed(range(len(spatial))):
        idx = torch.arange(spatial[axis]) // p[axis]
        shape = [1] * len(spatial)
        shape[axis] = spatial[axis]
        labels = labels + idx.view(shape) * stride
        stride *= grid[axis]
    n_units = math.prod(grid)
    if x is None:
        features = torch.arange(n_units)
    else:
        v = x.detach().float().cpu()
        v = v.reshape(-1, *spatial) if v.ndim > len(spatial) else v[None]
        lo = v.flatten(1).amin(1).view(-1, *([1] * len(spatial)))
        hi = v.flatten(1).amax(1).view(-1, *([1] * len(spatial)))
        above = (v > lo + background * (hi - lo)).any(0).flatten()  # a voxel above the background level
        live = torch.zeros(n_units, dtype=torch.bool).index_put_((labels.flatten()[above],), torch.tensor(True))
        features = live.nonzero().flatten()
        if features.numel() == 0:  # a constant input: keep every unit so the fit is defined (all zeros)
            features = torch.arange(n_units)
    return PatchUnits(labels=labels, grid=grid, patch=p, features=features)


def sample_masks(n_samples: int, d: int, ratios: Sequence[float], generator: torch.Generator) -> torch.Tensor:
    """``(n_samples, d)`` bool keep-masks; row ``i`` hides ``max(1, round(r d))`` units, ``r = ratios[i % len]``."""
    if n_samples < 1 or d < 1:
        raise ValueError(f"need at least one sample and one unit, got n_samples={n_samples}, d={d}")
    if not ratios or not all(0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"masking ratios must lie in (0, 1), got {list(ratios)}")
    order = torch.rand(n_samples, d, generator=generator).argsort(1)
    n_hide = torch.tensor([max(1, min(d, round(ratios[i % len(ratios)] * d))) for i in range(n_samples)])
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(d).expand(n_samples, d))
    return rank >= n_hide[:, None]


def proximity(keep: torch.Tensor, sigma: float) -> torch.Tensor:
    """``pi (n,) = exp(-D^2 / sigma^2)``, ``D = 1 - sqrt(|z| / d)``: cosine distance of ``z`` to all-ones."""
    frac = keep.double().mean(1)
    dist = 1.0 - frac.sqrt()
    return torch.exp(-(dist ** 2) / float(sigma) ** 2)


# ----------------------------------------------------------------------------------------------------------
# Surrogate
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Surrogate:
    """A fitted surrogate: ``w (T, d)`` per-unit weights, ``b (T,)`` intercepts, weighted ``r2 (T,)``,
    and how it was solved (``solver``, ``iterations``)."""

    w: torch.Tensor
    b: torch.Tensor
    r2: torch.Tensor
    solver: str
    iterations: int
    prior_scale: torch.Tensor | None = None


def fit_surrogate(z: torch.Tensor, y: torch.Tensor, pi: torch.Tensor, *, lambda1: float = 0.0,
                  lambda2: float = 0.0, prior: torch.Tensor | None = None, scale_prior: bool = False,
                  max_iter: int = 500, tol: float = 1e-6) -> Surrogate:
    """Weighted linear surrogate with an L1 term and a pull towards ``prior`` (module docstring, step 5).

    Args:
        z: ``(N, d)`` features of the samples (0/1; any real values work).
        y: ``(N, T)`` black-box outputs (or ``(N,)``).
        pi: ``(N,)`` sample weights (proximity), non-negative.
        lambda1: L1 weight (sparsity); 0 gives the closed form.
        lambda2: weight of ``|w - prior|^2``; with ``prior=None`` it is a ridge towards 0.
        prior: ``(T, d)`` or ``(d,)`` the weights the fit is pulled towards.
        scale_prior: pull towards ``alpha_t prior_t`` with ``alpha_t >= 0`` the least-squares scale of the
            prior on the samples, ``alpha_t = max(0, m' c / m' A m)`` (a prior map from other cases has
            a shape but not this case's logit scale); reported as ``prior_scale``.
    """
    y2 = y[:, None] if y.ndim == 1 else y
    zd, yd, p = z.double(), y2.double(), pi.double().clamp(min=0)
    n, d = zd.shape
    t = yd.shape[1]
    if p.sum() <= 0:
        raise ValueError("the proximity weights are all zero")
    p = p / p.sum()
    zm, ym = p @ zd, p @ yd
    zc, yc = zd - zm, yd - ym
    a = zc.T @ (p[:, None] * zc)  # (d, d)
    c = zc.T @ (p[:, None] * yc)  # (d, T)
    w0 = torch.zeros(d, t, dtype=torch.float64, device=z.device) if prior is None else \
        (prior.double().reshape(-1, d).T.expand(d, t) if prior.ndim == 1 or prior.shape[0] == 1 else prior.double().T)
    alpha = None
    if prior is not None and scale_prior:
        alpha = ((w0 * c).sum(0) / (w0 * (a @ w0)).sum(0).clamp(min=1e-300)).clamp(min=0.0)  # (T,)
        w0 = w0 * alpha
    # A tiny ridge keeps the system solvable when d > N or a unit never hides; it is 1e-9 of A's scale.
    eps = 1e-9 * float(torch.diagonal(a).mean().clamp(min=1e-12))
    lhs = a + (lambda2 + eps) * torch.eye(d, dtype=torch.float64, device=z.device)
    rhs = c + lambda2 * w0
    chol, info = torch.linalg.cholesky_ex(lhs)
    w = torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.lstsq(lhs, rhs).solution
    solver, it = "closed-form (Cholesky)", 0
    if lambda1 > 0:
        lip = 2.0 * (float(torch.linalg.eigvalsh(a)[-1]) + lambda2)
        step = 1.0 / max(lip, 1e-12)
        v, w_prev, tk = w.clone(), w.clone(), 1.0
        for it in range(1, max_iter + 1):  # noqa: B007 (the count is reported)
            grad = 2.0 * (a @ v - c) + 2.0 * lambda2 * (v - w0)
            u = v - step * grad
            w = torch.sign(u) * (u.abs() - lambda1 * step).clamp(min=0)
            t_next = (1.0 + math.sqrt(1.0 + 4.0 * tk * tk)) / 2.0
            v = w + ((tk - 1.0) / t_next) * (w - w_prev)
            change = float((w - w_prev).abs().max())
            scale = float(w.abs().max().clamp(min=1e-12))
            w_prev, tk = w, t_next
            if change <= tol * scale:
                break
        solver = "FISTA (proximal gradient, L1)"
    b = (ym - zm @ w)
    resid = yc - zc @ w
    ss_res = (p[:, None] * resid ** 2).sum(0)
    ss_tot = (p[:, None] * yc ** 2).sum(0)
    r2 = torch.where(ss_tot > 0, 1.0 - ss_res / ss_tot.clamp(min=1e-300), torch.ones_like(ss_tot))
    return Surrogate(w=w.T.float(), b=b.float(), r2=r2.float(), solver=solver, iterations=it,
                     prior_scale=None if alpha is None else alpha.float())


# ----------------------------------------------------------------------------------------------------------
# The explainer
# ----------------------------------------------------------------------------------------------------------


@register("lime")
class LIME(Explainer):
    """``LIME(forward_func, patch=8, n_samples=512, ratios=(0.1, 0.3, 0.5), sigma=0.25, fill="mean",
    alpha=1e-3, lambda1=0.0, batch_size=16, seed=0, output_index=0)``: plain LIME on fixed cubes.

    ``patch``: unit side in voxels (8 on the 64^3 model grid: 24 mm cubes, 512 units, about half of them
    brain). ``n_samples``: perturbed samples per item (plus the original). ``alpha``: ridge weight
    towards 0 (``lambda2`` with a zero prior; lime's ``Ridge`` does the same). ``fill``: ``zero``,
    ``mean``, ``blur`` or a :class:`~xai_core.explain.fills.Fill`. ``seed``: the masks are a function
    of it alone (the same explanation twice).
    """

    title = "LIME on fixed cubes, mean fill (Ribeiro et al. 2016)"
    model_kinds = LIME_MODEL_KINDS
    needs = "forward"
    display = "positive"
    param_bounds = {"n_samples": (16, 4096), "patch": (2, 32), "sigma": (0.01, 10.0), "batch_size": (1, 64),
                    "seed": (0, 2 ** 31 - 1)}

    def __init__(self, forward_func: nn.Module | ForwardFunc, *, patch: int | Sequence[int] = 8,
                 n_samples: int = 512, ratios: Sequence[float] = (0.1, 0.3, 0.5), sigma: float = 0.25,
                 fill: str | Fill = "mean", alpha: float = 1e-3, lambda1: float = 0.0, batch_size: int = 16,
                 seed: int = 0, output_index: int | str = 0):
        super().__init__(forward_func, output_index=output_index)
        if n_samples < 1 or batch_size < 1:
            raise ValueError("n_samples and batch_size must be >= 1")
        self.patch = patch
        self.n_samples = int(n_samples)
        self.ratios = tuple(float(r) for r in ratios)
        self.sigma = float(sigma)
        self.fill = fill
        self.alpha = float(alpha)
        self.lambda1 = float(lambda1)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    # Hooks MedLIME overrides -------------------------------------------------------------------------------

    def _adapt(self, x: torch.Tensor, rest: tuple[torch.Tensor, ...], args: tuple[Any, ...],
               targets: torch.Tensor, tick: Ticker) -> tuple[torch.Tensor, dict[str, Any]]:
        """The input the samples are drawn from (LIME: ``x`` itself) and diagnostics."""
        return x, {}

    def _prior(self, x: torch.Tensor, units: PatchUnits, targets: torch.Tensor,
               logits: torch.Tensor) -> tuple[torch.Tensor | None, float, dict[str, Any]]:
        """``(prior (T, d) or None, lambda2, diagnostics)`` for the surrogate (LIME: ridge towards 0). A
        prior is scaled to the samples (``fit_surrogate(scale_prior=True)``)."""
        return None, self.alpha, {}

    def _make_fill(self, x: torch.Tensor) -> Fill:
        return make_fill(self.fill, x)

    # The call ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _outputs(self, samples: torch.Tensor, rest: tuple[torch.Tensor, ...], args: tuple[Any, ...]) -> torch.Tensor:
        n = samples.shape[0]
        rest_n = tuple(r.expand(n, *r.shape[1:]) for r in rest)
        return self.logits((samples, *rest_n), args).float()

    def _explain_item(self, x: torch.Tensor, rest: tuple[torch.Tensor, ...], args: tuple[Any, ...],
                      targets: torch.Tensor, logits0: torch.Tensor, tick: Ticker, item: int,
                      n_items: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Weights painted on the grid ``(T, *S)`` and diagnostics for one item ``x (1, C, *S)``."""
        x_used, extras = self._adapt(x, rest, args, targets, tick)
        logits_used = self._outputs(x_used, rest, args)[0] if x_used is not x else logits0
        units = patch_units(x.shape[2:], self.patch, x_used[0])
        g = torch.Generator().manual_seed(self.seed + item)
        keep = sample_masks(self.n_samples, units.d, self.ratios, g)
        fill = self._make_fill(x_used)
        ys = [logits_used[None]]
        for s in range(0, self.n_samples, self.batch_size):
            hidden = units.hidden_voxels(keep[s:s + self.batch_size]).to(x.device)
            ys.append(self._outputs(fill(x_used, hidden), rest, args))
            tick((item + 0.1 + 0.85 * min(1.0, (s + self.batch_size) / self.n_samples)) / n_items)
        y = torch.cat(ys)[:, targets]  # (N + 1, T)
        z = torch.cat([torch.ones(1, units.d, dtype=torch.bool), keep]).float()
        pi = proximity(z.bool(), self.sigma)
        prior, lambda2, prior_info = self._prior(x_used, units, targets, logits_used)
        fit = fit_surrogate(z, y.cpu(), pi, lambda1=self.lambda1, lambda2=lambda2, prior=prior,
                            scale_prior=prior is not None)
        extras.update(prior_info)
        if fit.prior_scale is not None:
            extras["prior_scale"] = [round(float(v), 6) for v in fit.prior_scale]
        extras.update({"units": units.d, "unit_grid": list(units.grid), "patch_voxels": list(units.patch),
                       "n_samples": self.n_samples, "ratios": list(self.ratios), "sigma": self.sigma,
                       "fill": fill.describe(), "solver": fit.solver, "solver_iterations": fit.iterations,
                       "lambda1": self.lambda1, "lambda2": lambda2,
                       "surrogate_r2": [round(float(v), 4) for v in fit.r2],
                       "intercept": [round(float(v), 4) for v in fit.b]})
        return units.paint(fit.w).to(x.device), extras

    def _attribute(self, inputs: tuple[torch.Tensor, ...], target: Target, args: tuple[Any, ...],
                   tick: Ticker) -> Attribution:
        _check_image_input(inputs[0])
        x_all = inputs[0].detach()
        logits = self._outputs(x_all, tuple(t.detach() for t in inputs[1:]), args)
        targets = resolve_targets(target, logits)
        maps, extras = [], []
        for b in range(x_all.shape[0]):
            rest = tuple(t[b:b + 1].detach() for t in inputs[1:])
            m, e = self._explain_item(x_all[b:b + 1], rest, args, targets[b], logits[b], tick, b, x_all.shape[0])
            maps.append(m)
            extras.append(e)
        raw = torch.stack(maps)[:, :, None].float()  # (B, T, 1, *S)
        raw_rest = tuple(torch.zeros(t.shape[0], targets.shape[1], *t.shape[1:]) for t in inputs[1:])
        return self.finish((raw, *raw_rest), targets, logits,
                           extras=extras[0] if len(extras) == 1 else {"items": extras})

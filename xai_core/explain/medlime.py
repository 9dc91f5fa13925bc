"""MedLIME (``medlime``): LIME with generative masking, test-time adaptation and evidence from similar cases.

Seed paper 004 (MedLIME, CVPR 2026; no public code), built on :mod:`.lime` (same units, masks,
kernel and surrogate), with three changes, each of which can be switched off for the ablations:

1. **Generative masking** (``fill="mae"``): hidden cubes are filled by the masked autoencoder of
   :mod:`xai_core.mae`, so the samples stay near the data (``docs/medlime.md`` measures it).
2. **STTA** (``stta_steps > 0``): the samples are drawn around ``f_phi(x)``, the input after a
   photometric transform learnt on the model's cross-entropy for the explained target (the given
   class, or the prediction when none is given) over rotated and cropped views
   (:mod:`xai_core.stta`). The explanation is of the model on ``f_phi(x)``; ``phi`` and the losses
   are in ``extras["stta"]``.
3. **EBR** (``ebr="knn"``): the surrogate is pulled towards ``alpha w_NW``, the Nadaraya-Watson
   average of the patch-weight maps of the ``k`` nearest abnormal cases of an evidence library
   (:mod:`xai_core.evidence`), with weight ``lambda2``; ``ebr="random"`` uses random abnormal cases
   (ablation); ``ebr="off"`` a ridge towards 0. The cases and their weights are in
   ``extras["evidence"]``. The library: ``evidence=`` (a path or a library), else the process's
   default (:func:`xai_core.evidence.set_default_library`, the server's ``--conf evidence``); with
   none, EBR is off and ``extras["evidence"]`` says so.

The surrogate has the L1 term ``lambda1`` (FISTA; :func:`xai_core.explain.lime.fit_surrogate`).
Only a forward function is needed (STTA differentiates through it; the weights are never read).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import ForwardFunc, Ticker, register
from .fills import Fill, make_fill
from .lime import LIME, LIME_MODEL_KINDS, PatchUnits

__all__ = ["MedLIME"]

EBR_MODES = ("knn", "random", "off")


@register("medlime")
class MedLIME(LIME):
    """``MedLIME(forward_func, patch=8, n_samples=512, fill="mae", stta_steps=20, stta_views=2,
    evidence=None, ebr="knn", k=5, bandwidth=None, lambda1=1e-3, lambda2=0.05, ...)``.

    Other parameters as :class:`~xai_core.explain.lime.LIME`. ``mae``: the MAE for the fill and the
    evidence features (default: the shipped ``mae-3d``, loaded once per process).
    """

    title = "MedLIME: generative masking, test-time adaptation, evidence-regularised surrogate"
    model_kinds = LIME_MODEL_KINDS
    needs = "forward"
    display = "positive"
    param_bounds = {**LIME.param_bounds, "stta_steps": (0, 100), "stta_views": (1, 8), "k": (1, 50),
                    "lambda1": (0.0, 10.0), "lambda2": (0.0, 100.0)}

    def __init__(self, forward_func: nn.Module | ForwardFunc, *, patch: int | Sequence[int] = 8,
                 n_samples: int = 512, ratios: Sequence[float] = (0.1, 0.3, 0.5), sigma: float = 0.25,
                 fill: str | Fill = "mae", stta_steps: int = 20, stta_views: int = 2, stta_lr: float = 0.05,
                 evidence: Any = None, ebr: str = "knn", k: int = 5, bandwidth: float | None = None,
                 lambda1: float = 1e-3, lambda2: float = 0.05, batch_size: int = 16, seed: int = 0,
                 mae: Any = None, output_index: int | str = 0):
        super().__init__(forward_func, patch=patch, n_samples=n_samples, ratios=ratios, sigma=sigma, fill=fill,
                         alpha=lambda2, lambda1=lambda1, batch_size=batch_size, seed=seed,
                         output_index=output_index)
        if ebr not in EBR_MODES:
            raise ValueError(f"ebr must be one of {EBR_MODES}, got {ebr!r}")
        self.stta_steps, self.stta_views, self.stta_lr = int(stta_steps), int(stta_views), float(stta_lr)
        self.ebr, self.k, self.bandwidth = ebr, int(k), bandwidth
        self.lambda2 = float(lambda2)
        self._mae = mae
        self._evidence = evidence

    # -- shared resources -----------------------------------------------------------------------------------

    @property
    def mae(self) -> Any:
        if self._mae is None:
            from ..mae import load_mae

            self._mae = load_mae()
        return self._mae

    def library(self) -> Any:
        from ..evidence import EvidenceLibrary, default_library, load_library

        if isinstance(self._evidence, EvidenceLibrary):
            return self._evidence
        if isinstance(self._evidence, str | Path) and str(self._evidence):
            return load_library(self._evidence)
        return default_library()

    # -- the three changes ----------------------------------------------------------------------------------

    def _make_fill(self, x: torch.Tensor) -> Fill:
        if isinstance(self.fill, str) and self.fill == "mae":
            from .fills import MAEFill

            return MAEFill(self.mae, batch_size=max(self.batch_size, 16))
        return make_fill(self.fill, x)

    def _adapt(self, x: torch.Tensor, rest: tuple[torch.Tensor, ...], args: tuple[Any, ...],
               targets: torch.Tensor, tick: Ticker) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.stta_steps <= 0:
            return x, {"stta": None}
        from ..stta import STTA

        def forward(v: torch.Tensor, *a: Any) -> torch.Tensor:
            rest_n = tuple(r.expand(v.shape[0], *r.shape[1:]) for r in rest)
            return self.logits((v, *rest_n), a)

        res = STTA(forward, steps=self.stta_steps, n_views=self.stta_views, lr=self.stta_lr,
                   seed=self.seed).adapt(x, int(targets[0]), args, tick=lambda f: tick(0.1 * f))
        return res.x_adapted, {"stta": {**res.describe(), "label": "the explained target (the prediction "
                                                                   "unless a class was asked for)"}}

    def _prior(self, x: torch.Tensor, units: PatchUnits, targets: torch.Tensor,
               logits: torch.Tensor) -> tuple[torch.Tensor | None, float, dict[str, Any]]:
        if self.ebr == "off":
            return None, self.lambda2, {"evidence": {"mode": "off"}}
        lib = self.library()
        if lib is None:
            return None, self.lambda2, {"evidence": {"mode": "off", "reason": "no evidence library loaded"}}
        if tuple(lib.grid) != tuple(units.grid):  # another model's grid or patch: the maps do not align
            return None, self.lambda2, {"evidence": {
                "mode": "off", "reason": f"the evidence library's units {list(lib.grid)} (patch {lib.patch}) do "
                                         f"not match this explanation's {list(units.grid)}"}}
        mae = self.mae
        v = x.to(next(mae.parameters()).device).float()
        if tuple(v.shape[2:]) != tuple(mae.img):
            v = torch.nn.functional.interpolate(v, size=mae.img, mode="trilinear", align_corners=False)
        f = mae.embed(v)[0].cpu().numpy()
        nb = lib.neighbours(f, self.k, self.bandwidth, mode=self.ebr, seed=self.seed)
        w_nw = torch.from_numpy(nb.w_nw)[units.features]
        prior = w_nw[None].expand(targets.numel(), -1)
        return prior, self.lambda2, {"evidence": {**nb.describe(), "library": lib.path, "k": self.k}}

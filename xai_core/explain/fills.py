"""Fills for perturbation methods: what hidden voxels of a LIME-family sample become.

A :class:`Fill` takes the input ``x (1, C, *S)`` and a batch of hidden-voxel masks ``hidden (n, *S)``
bool and returns the ``n`` samples ``(n, C, *S)``; visible voxels keep ``x``'s values exactly. All of a
batch is made in one call (the masked autoencoder reconstructs the whole batch at once).

=========  =====================================================================================
``zero``   0 (the background of a normalised MR volume)
``mean``   per channel, the mean of the foreground (voxels above 10 % of the range above the minimum)
``blur``   a Gaussian-blurred copy of ``x`` (``sigma`` voxels, 4 by default: 12 mm on the model grid)
``mae``    the masked autoencoder's reconstruction from the visible cubes (:mod:`xai_core.mae`):
           generative masking of 3-D single-channel volumes (another grid size is resampled to the
           MAE's and back, hidden voxels only)
=========  =====================================================================================
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = ["Fill", "ConstantFill", "MeanFill", "BlurFill", "MAEFill", "make_fill", "FILLS", "gaussian_blur"]

FILLS = ("zero", "mean", "blur", "mae")


@runtime_checkable
class Fill(Protocol):
    """``fill(x (1, C, *S), hidden (n, *S) bool) -> (n, C, *S)``; ``describe()`` for provenance."""

    name: str

    def __call__(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


def _where(hidden: torch.Tensor, fill: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(n, C, *S)``: ``fill`` (broadcastable) where hidden, ``x`` elsewhere."""
    return torch.where(hidden[:, None], fill.to(x.dtype), x)


class ConstantFill:
    """Hidden voxels become ``value`` (``zero``: 0)."""

    def __init__(self, value: float = 0.0):
        self.value = float(value)
        self.name = "zero" if self.value == 0.0 else "constant"

    def __call__(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return _where(hidden, torch.tensor(self.value, device=x.device), x)

    def describe(self) -> dict[str, Any]:
        return {"fill": self.name, "value": self.value}


class MeanFill:
    """Hidden voxels become the channel's foreground mean of ``x`` (computed on the first call's ``x``;
    foreground: above ``min + 0.1 (max - min)``, the background rule of the LIME units)."""

    name = "mean"

    def __init__(self, x: torch.Tensor | None = None):
        self.means: torch.Tensor | None = None if x is None else self._means(x)

    @staticmethod
    def _means(x: torch.Tensor) -> torch.Tensor:
        from .lime import BACKGROUND

        v = x[0].flatten(1).float()  # (C, V)
        lo, hi = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
        fg = v > lo + BACKGROUND * (hi - lo)  # the units' background rule: MR air (noise) is not averaged in
        fg = torch.where(fg.any(1, keepdim=True), fg, torch.ones_like(fg))
        return (v * fg).sum(1) / fg.sum(1)

    def __call__(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if self.means is None:
            self.means = self._means(x)
        return _where(hidden, self.means.view(1, -1, *([1] * (x.ndim - 2))), x)

    def describe(self) -> dict[str, Any]:
        return {"fill": "mean", "values": [round(float(m), 6) for m in self.means] if self.means is not None else None}


def gaussian_blur(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``x (B, C, *S)`` (1 to 3 spatial dims), ``sigma`` in voxels (a float, or
    a 0-d tensor to differentiate through), replicate padding, kernel radius ``ceil(3 sigma_max)``."""
    sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).clamp(min=1e-3)
    radius = max(1, int(torch.ceil(3 * sig.detach().max()).item()))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sig) ** 2)
    k = k / k.sum()
    nd, c = x.ndim - 2, x.shape[1]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    out = x
    for axis in range(nd):
        shape = [1] * nd
        shape[axis] = k.numel()
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), k.view(1, 1, *shape).expand(c, 1, *shape), groups=c)
    return out


class BlurFill:
    """Hidden voxels become a Gaussian-blurred copy of ``x`` (``sigma`` voxels)."""

    name = "blur"

    def __init__(self, sigma: float = 4.0):
        self.sigma = float(sigma)
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if self._cache is None or self._cache[0] is not x:
            self._cache = (x, gaussian_blur(x.float(), self.sigma))
        return _where(hidden, self._cache[1], x)

    def describe(self) -> dict[str, Any]:
        return {"fill": "blur", "sigma_voxels": self.sigma}


class MAEFill:
    """Generative masking: hidden voxels become the masked autoencoder's reconstruction from the visible
    cubes (a cube with any hidden voxel is unseen by the encoder; only hidden voxels are replaced)."""

    name = "mae"

    def __init__(self, mae: Any = None, batch_size: int = 32):
        if mae is None:
            from ..mae import load_mae

            mae = load_mae()
        self.mae = mae
        self.batch_size = int(batch_size)

    def __call__(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1 or x.ndim != 5:
            raise ValueError(f"the MAE fill takes single-channel volumes (1, 1, K, J, I), got {tuple(x.shape)}")
        mae = self.mae.to(x.device)
        size = tuple(x.shape[2:])
        if size == tuple(mae.img):
            return mae.fill(x, hidden, batch_size=self.batch_size)
        # Another grid (a smaller model's): reconstruct on the MAE's grid and resample back; only the
        # hidden voxels take the result, so the visible ones still keep their exact values.
        xs = F.interpolate(x.float(), size=mae.img, mode="trilinear", align_corners=False)
        hs = F.interpolate(hidden[:, None].float(), size=mae.img, mode="nearest")[:, 0] > 0
        rec = mae.fill(xs, hs, batch_size=self.batch_size)
        back = F.interpolate(rec, size=size, mode="trilinear", align_corners=False).to(x.dtype)
        return torch.where(hidden[:, None], back, x)

    def describe(self) -> dict[str, Any]:
        card = getattr(self.mae, "card", None) or {}
        return {"fill": "mae", "model": card.get("name", "mae-3d"), "version": card.get("version"),
                "patch_voxels": list(self.mae.patch)}


def make_fill(spec: str | Fill, x: torch.Tensor | None = None, **kwargs: Any) -> Fill:
    """A :class:`Fill` from its name (:data:`FILLS`) or the object itself."""
    if not isinstance(spec, str):
        if not isinstance(spec, Fill):
            raise TypeError(f"{type(spec).__name__} is not a Fill (name, __call__(x, hidden), describe())")
        return spec
    name = spec.lower()
    if name == "zero":
        return ConstantFill(0.0)
    if name == "mean":
        return MeanFill(x)
    if name == "blur":
        return BlurFill(**kwargs)
    if name == "mae":
        return MAEFill(**kwargs)
    raise ValueError(f"unknown fill {spec!r}; use one of {list(FILLS)}")

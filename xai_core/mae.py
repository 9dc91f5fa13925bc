"""Generative masking: a small 3-D masked autoencoder that fills hidden cubes of a model-grid volume.

MedLIME's samples hide some perturbation units (cubes) of the input. Zero, mean or blur fills put
content there that no study ever has, so the black box is asked about inputs off the data. The
masked autoencoder (He et al., CVPR 2022) is trained to predict hidden cubes from the visible rest,
on the project's generated studies at the model grid, so its fills look like brain.

Network: MONAI's :class:`~monai.networks.nets.MaskedAutoEncoderViT` (3-D, sin-cos positions), used
with masks chosen by the caller instead of its own random ones (:meth:`MAE3D.reconstruct`).
Defaults: input ``(n, 1, 64, 64, 64)`` on the 3 mm model grid, cubes of ``8^3`` voxels (24 mm),
so a ``64^3`` volume has ``L = 512`` tokens; encoder 2 layers of width 96, decoder 1 layer of width 48
(widths divisible by 6 for the 3-D sin-cos embedding).

Filling never changes visible voxels: :meth:`MAE3D.fill` pastes the reconstruction into the hidden
voxels only (``tests/test_medlime.py`` checks it bit for bit).

Training (``xai train mae-3d --data DIR``, :func:`train_mae`): studies are resampled onto the model
grid and normalised as the classifier sees them (:mod:`xai_core.models.grid`); each step hides a
random fraction of the cubes (drawn from the LIME masking ratios) and minimises the mean squared
error on the hidden cubes only. Random flips along each axis and a random intensity gain augment
the few studies. Weights and a JSON card are written to ``--out`` (``mae-3d.pt`` / ``mae-3d.card.json``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import MaskedAutoEncoderViT
from torch import nn

__all__ = ["MAE3D", "MAECard", "MAEInFiller", "load_mae", "train_mae", "prepare_volumes", "MAE_NAME",
           "DEFAULT_MAE_KWARGS"]

MAE_NAME = "mae-3d"
WEIGHTS_DIR = Path(__file__).resolve().parent / "models" / "weights"
DEFAULT_MAE_KWARGS: dict[str, Any] = {
    "img_size": 64, "patch_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_layers": 2, "num_heads": 4,
    "decoder_hidden_size": 48, "decoder_mlp_dim": 96, "decoder_num_layers": 1, "decoder_num_heads": 4,
}


class MAE3D(nn.Module):
    """MONAI's ``MaskedAutoEncoderViT`` with caller-given masks.

    ``kwargs`` go to ``MaskedAutoEncoderViT`` (``in_channels`` 1, ``spatial_dims`` 3, sin-cos positions).
    Token ``t`` is cube ``(t // (g g), (t // g) % g, t % g)`` of the ``g^3`` cube grid in ``[k, j, i]``
    order (the order of MONAI's patch embedding, and of :func:`xai_core.explain.lime.patch_units`).
    """

    def __init__(self, **kwargs: Any):
        super().__init__()
        self.kwargs = {**DEFAULT_MAE_KWARGS, **kwargs}
        self.net = MaskedAutoEncoderViT(in_channels=1, spatial_dims=3, **self.kwargs)
        self.patch = tuple(int(p) for p in self.net.patch_size)
        self.img = tuple(int(s) for s in self.net.img_size)
        self.grid = tuple(s // p for s, p in zip(self.img, self.patch, strict=True))
        self.n_tokens = int(np.prod(self.grid))

    # -- cubes <-> tokens ---------------------------------------------------------------------------------

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, 1, K, J, I)`` -> ``(n, L, p^3)`` voxels of each cube, row-major inside the cube."""
        n = x.shape[0]
        (gk, gj, gi), (pk, pj, pi) = self.grid, self.patch
        v = x.reshape(n, gk, pk, gj, pj, gi, pi).permute(0, 1, 3, 5, 2, 4, 6)
        return v.reshape(n, self.n_tokens, pk * pj * pi)

    def unpatchify(self, t: torch.Tensor) -> torch.Tensor:
        """``(n, L, p^3)`` -> ``(n, 1, K, J, I)`` (inverse of :meth:`patchify`)."""
        n = t.shape[0]
        (gk, gj, gi), (pk, pj, pi) = self.grid, self.patch
        v = t.reshape(n, gk, gj, gi, pk, pj, pi).permute(0, 1, 4, 2, 5, 3, 6)
        return v.reshape(n, 1, gk * pk, gj * pj, gi * pi)

    def tokens_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Voxel mask ``(n, K, J, I)`` bool -> token mask ``(n, L)``: a cube is hidden when any of its voxels is."""
        return self.patchify(hidden[:, None].float()).amax(-1) > 0

    # -- the network with given masks ---------------------------------------------------------------------

    def _decode(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Predicted cube voxels ``(n, L, p^3)`` for volumes ``x (n, 1, *img)`` with tokens ``hidden (n, L)``
        unseen by the encoder. Every row must hide the same number of tokens (one batch of a ratio)."""
        net = self.net
        n, L = hidden.shape
        n_keep = int((~hidden[0]).sum())
        if bool(((~hidden).sum(1) != n_keep).any()):
            raise ValueError("every row of a batch must hide the same number of tokens")
        tokens = net.patch_embedding(x)  # (n, L, H), positions added
        # Indices of the visible tokens, in token order (stable sort of the hidden flag).
        keep_idx = torch.argsort(hidden.to(torch.int8), dim=1, stable=True)[:, :n_keep]
        rows = torch.arange(n, device=x.device)[:, None]
        h = torch.cat([net.cls_token.expand(n, -1, -1), tokens[rows, keep_idx]], dim=1)
        h = net.decoder_embed(net.blocks(h))
        full = net.mask_tokens.to(h.dtype).repeat(n, L, 1)
        full[rows, keep_idx] = h[:, 1:]
        full = full + net.decoder_pos_embedding.to(h.dtype)
        out = net.decoder_pred(net.decoder_blocks(torch.cat([h[:, :1], full], dim=1)))
        return out[:, 1:]

    def reconstruct(self, x: torch.Tensor, hidden_tokens: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``(n, 1, *img)`` of ``x (n or 1, 1, *img)`` with ``hidden_tokens (n, L)`` bool
        unseen; rows are grouped by their number of hidden tokens so any mix of masks works."""
        n = hidden_tokens.shape[0]
        x = x.expand(n, *x.shape[1:]) if x.shape[0] == 1 else x
        out = torch.empty(n, self.n_tokens, int(np.prod(self.patch)), dtype=x.dtype, device=x.device)
        counts = hidden_tokens.sum(1)
        for c in torch.unique(counts).tolist():
            rows = (counts == c).nonzero().flatten()
            if c == 0:
                out[rows] = self.patchify(x[rows])
            else:
                out[rows] = self._decode(x[rows], hidden_tokens[rows]).to(x.dtype)
        return self.unpatchify(out)

    @torch.no_grad()
    def fill(self, x: torch.Tensor, hidden: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Volumes ``(n, 1, *img)``: ``x (1, 1, *img)`` with the voxels ``hidden (n, *img)`` bool replaced by the
        reconstruction from the visible cubes; visible voxels are returned unchanged (same bits)."""
        if tuple(x.shape[2:]) != self.img or x.shape[1] != 1:
            raise ValueError(f"the MAE fills (.., 1, {self.img}) volumes, got {tuple(x.shape)}")
        out = torch.empty(hidden.shape[0], 1, *self.img, dtype=x.dtype, device=x.device)
        for s in range(0, hidden.shape[0], batch_size):
            h = hidden[s:s + batch_size]
            rec = self.reconstruct(x, self.tokens_hidden(h))
            out[s:s + batch_size] = torch.where(h[:, None], rec.clamp(0.0, 2.0), x)
        return out

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, 1, *img)`` -> ``(n, H)``: the encoder's mean token with every cube visible (a feature
        vector that needs nothing of the explained model)."""
        net = self.net
        h = net.patch_embedding(x)
        h = net.blocks(torch.cat([net.cls_token.expand(x.shape[0], -1, -1), h], dim=1))
        return h[:, 1:].mean(1)


# ----------------------------------------------------------------------------------------------------------
# Card, loading
# ----------------------------------------------------------------------------------------------------------


@dataclass
class MAECard:
    """What the committed MAE is and how it was made (``weights/mae-3d.json``)."""

    name: str
    version: str
    arch_kwargs: dict[str, Any]
    grid_size: int
    grid_spacing_mm: float
    training: dict[str, Any]
    metrics: dict[str, Any]
    weights_sha256: str = ""
    intended_use: str = ("fills hidden cubes of normalised model-grid brain MR volumes for MedLIME's "
                         "generative masking; not a diagnostic model")


_CACHE: dict[str, MAE3D] = {}


def card_path_for(weights: str | Path) -> Path:
    """The card beside MAE weights ``X.pt``: ``X.card.json`` (not ``X.json``, which would make the MAE look
    like a classifier to :func:`xai_core.models.available_models`)."""
    w = Path(weights)
    return w.with_name(w.stem + ".card.json")


def load_mae(path: str | Path | None = None, device: str | torch.device = "cpu") -> MAE3D:
    """The MAE whose weights are ``path`` (default: the shipped ``weights/mae-3d.pt``), loaded once per
    process and path (the server and every explainer share it)."""
    p = Path(path) if path is not None else WEIGHTS_DIR / f"{MAE_NAME}.pt"
    key = f"{p.resolve()}@{device}"
    if key not in _CACHE:
        card_path = card_path_for(p)
        if not p.exists() or not card_path.exists():
            raise FileNotFoundError(f"no MAE weights at {p} (train one: xai train mae-3d --data DIR)")
        card = json.loads(card_path.read_text())
        mae = MAE3D(**card["arch_kwargs"])
        mae.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
        mae.card = {k: card.get(k) for k in ("name", "version", "weights_sha256")}
        _CACHE[key] = mae.to(device).eval().requires_grad_(False)
    return _CACHE[key]


class MAEInFiller:
    """The MAE as an :class:`~xai_core.counterfactual.InFiller` on images of any geometry (batch protocol).

    The image goes onto its model grid (:class:`~xai_core.models.grid.ModelGrid`, 64^3 at 3 mm) and is
    normalised as the classifier sees it; the regions go there too (a model-grid voxel is hidden when
    the linearly resampled region is at least 0.5 there, and every grid voxel a region voxel falls in
    is hidden); the MAE reconstructs all regions in one batch; each reconstruction is scaled back
    to the image's intensities, resampled onto the image grid, and pasted into its region only.
    """

    name = "masked-autoencoder"

    def __init__(self, mae: MAE3D | None = None, batch_size: int = 16, **_: Any):
        self.mae = mae if mae is not None else load_mae()
        self.batch_size = int(batch_size)

    def describe(self) -> dict[str, Any]:
        card = getattr(self.mae, "card", None) or {}
        return {"infiller": self.name, "model": card.get("name", MAE_NAME), "version": card.get("version")}

    def fill(self, image: Any, region: np.ndarray) -> Any:
        return self.fill_batch(image, np.asarray(region, dtype=bool)[None])[0]

    def fill_batch(self, image: Any, regions: np.ndarray) -> list[Any]:
        from .models.grid import ModelGrid, normalise_intensity

        regions = np.asarray(regions, dtype=bool)
        if regions.shape[1:] != image.array.shape:
            raise ValueError(f"region shape {regions.shape[1:]} does not match image shape {image.array.shape}")
        grid = ModelGrid(self.mae.img[0], 3.0)
        arr, ref = grid.to_model(image)
        norm = normalise_intensity(arr)
        # The normalisation is a scale (after a shift for negative images): invert it from the two arrays.
        fg = norm > 0.05
        shift = min(0.0, float(arr.min()))
        scale = float(np.median((arr[fg] - shift) / norm[fg])) if fg.any() else 1.0
        hidden = np.stack([(grid.to_model(image.with_array(r.astype(np.float32)))[0] >= 0.5) |
                           self._touched(r, image, ref) for r in regions])
        x = torch.from_numpy(norm)[None, None]
        rec = self.mae.fill(x, torch.from_numpy(hidden), batch_size=self.batch_size)[:, 0].numpy()
        out = []
        for r, vol in zip(regions, rec, strict=True):
            back = grid.to_input(vol * scale + shift, ref, image)
            a = np.asarray(image.array, np.float32)
            out.append(image.with_array(np.where(r, back, a).astype(np.float32)))
        return out

    @staticmethod
    def _touched(region: np.ndarray, image: Any, ref: Any) -> np.ndarray:
        """Model-grid voxels that hold a region voxel's centre (small regions never vanish on the grid)."""
        size = ref.GetSize()[::-1]
        hit = np.zeros(size, bool)
        idx = np.argwhere(region)[:, ::-1].astype(float)  # (n, 3) i, j, k
        if idx.size == 0:
            return hit
        pts = image.index_to_physical(idx) if hasattr(image, "index_to_physical") else idx
        pts = np.atleast_2d(pts)
        origin, spacing = np.asarray(ref.GetOrigin()), np.asarray(ref.GetSpacing())
        ijk = np.rint((pts - origin) / spacing).astype(int)
        ok = np.all((ijk >= 0) & (ijk < np.asarray(ref.GetSize())), axis=1)
        k, j, i = ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]
        hit[k, j, i] = True
        return hit


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def prepare_volumes(data: str | Path, limit: int | None = None, grid_size: int = 64,
                    spacing: float = 3.0) -> tuple[np.ndarray, list[str]]:
    """Studies of ``data`` (a folder with ``manifest.csv``) on the model grid, normalised as the
    classifier sees them: float32 ``(n, K, J, I)`` and their study ids."""
    from .data.brain import read_manifest
    from .io import read_image
    from .models.grid import ModelGrid, normalise_intensity

    grid = ModelGrid(grid_size, spacing)
    rows = read_manifest(data)[:limit]
    vols = [normalise_intensity(grid.to_model(read_image(r["image"]))[0]) for r in rows]
    return np.stack(vols).astype(np.float32), [r["study_id"] for r in rows]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random flips along each spatial axis and a gain in [0.85, 1.15] (per batch)."""
    for axis in (2, 3, 4):
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(axis)
    return (x * (0.85 + 0.3 * torch.rand((), generator=g))).clamp(0.0, 2.0)


def train_mae(data: str | Path, out: str | Path, *, val: str | Path | None = None, minutes: float = 12.0,
              max_steps: int = 100_000, batch_size: int = 8, lr: float = 1e-3,
              ratios: Sequence[float] = (0.1, 0.3, 0.5), seed: int = 0, limit: int | None = None,
              log_every: int = 50, version: str = "1.0.0", command: str = "", init: str | Path | None = None) -> Path:
    """Train the MAE on the studies of ``data`` for ``minutes`` of wall time (or ``max_steps``).

    Each step hides a ratio drawn from ``ratios`` of the cubes of each volume (same count in a batch)
    and minimises the MSE on the hidden voxels. A checkpoint (``last.pt``) and ``train.log`` are
    written to ``out`` every ``log_every`` steps (``init``: start from these weights); at the end
    ``mae-3d.pt`` and ``mae-3d.card.json`` (the
    card: data, steps, losses, the validation MSE of the MAE and of a mean fill on hidden cubes).
    Returns the weights' path.
    """
    import hashlib

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vols, ids = prepare_volumes(data, limit)
    x_all = torch.from_numpy(vols)[:, None]
    mae = MAE3D()
    steps_before = 0
    if init is not None:  # continue an earlier run (its card, when there is one, gives the steps done)
        mae.load_state_dict(torch.load(init, map_location="cpu", weights_only=True))
        card_path = card_path_for(init)
        if card_path.exists():
            steps_before = int(json.loads(card_path.read_text())["training"].get("steps_total", 0))
    opt = torch.optim.AdamW(mae.parameters(), lr=lr, weight_decay=0.05)
    log = (out / "train.log").open("a")
    t0, step, hist = time.time(), 0, []
    running = None
    while step < max_steps and time.time() - t0 < minutes * 60:
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=g)
        x = _augment(x_all[idx], g)
        r = float(ratios[int(torch.randint(0, len(ratios), (), generator=g))])
        n_hide = max(1, round(r * mae.n_tokens))
        order = torch.rand(batch_size, mae.n_tokens, generator=g).argsort(1)
        hidden = torch.zeros(batch_size, mae.n_tokens, dtype=torch.bool)
        hidden.scatter_(1, order[:, :n_hide], True)
        pred = mae._decode(x, hidden)
        target = mae.patchify(x)
        loss = ((pred - target) ** 2).mean(-1)[hidden].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running = float(loss) if running is None else 0.98 * running + 0.02 * float(loss)
        if step % log_every == 0:
            hist.append({"step": step, "loss": round(running, 6), "seconds": round(time.time() - t0, 1)})
            log.write(json.dumps(hist[-1]) + "\n")
            log.flush()
            torch.save(mae.state_dict(), out / "last.pt")
    log.close()
    metrics = evaluate_mae(mae, val if val is not None else data, ratios=ratios, seed=seed + 1) if val else {}
    weights = out / f"{MAE_NAME}.pt"
    torch.save(mae.state_dict(), weights)
    card = MAECard(name=MAE_NAME, version=version, arch_kwargs=mae.kwargs, grid_size=64, grid_spacing_mm=3.0,
                   training={"data": str(data), "n_studies": len(ids), "steps": step,
                             "steps_total": steps_before + step, "init": str(init) if init else None,
                             "batch_size": batch_size,
                             "lr": lr, "ratios": list(ratios), "seed": seed,
                             "seconds": round(time.time() - t0, 1), "command": command,
                             "loss_history": hist[-20:]},
                   metrics=metrics, weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    card_path_for(weights).write_text(json.dumps(card.__dict__, indent=2) + "\n")
    return weights


@torch.no_grad()
def evaluate_mae(mae: MAE3D, data: str | Path, *, ratios: Sequence[float] = (0.1, 0.3, 0.5), seed: int = 1,
                 limit: int | None = 16) -> dict[str, Any]:
    """MSE on hidden cubes of the studies in ``data``: the MAE against a mean fill (normalised units)."""
    vols, ids = prepare_volumes(data, limit)
    x = torch.from_numpy(vols)[:, None]
    g = torch.Generator().manual_seed(seed)
    mae.eval()
    res: dict[str, Any] = {"data": str(data), "n_studies": len(ids)}
    for r in ratios:
        n_hide = max(1, round(r * mae.n_tokens))
        hidden = torch.zeros(x.shape[0], mae.n_tokens, dtype=torch.bool)
        hidden.scatter_(1, torch.rand(x.shape[0], mae.n_tokens, generator=g).argsort(1)[:, :n_hide], True)
        target = mae.patchify(x)
        pred = mae._decode(x, hidden).clamp(0.0, 2.0)
        fg = x.flatten(1) > 0.0
        means = torch.stack([x.flatten(1)[i][fg[i]].mean() for i in range(x.shape[0])])
        res[f"mse_mae_r{r}"] = round(float(((pred - target) ** 2).mean(-1)[hidden].mean()), 6)
        res[f"mse_mean_fill_r{r}"] = round(float(((means[:, None, None] - target) ** 2).mean(-1)[hidden].mean()), 6)
    return res

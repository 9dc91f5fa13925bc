"""Fine-tuning of a model's segmentation head on stored (corrected) labels.

Only the decoder (``dec2``, ``dec1``, ``seg_head``) learns; the encoder and the classifier keep
their weights, and the whole network stays in eval mode so batch-norm statistics do not drift on
a handful of volumes. Classification is therefore unchanged by construction, and a few dozen
iterations on the 64^3 model grid run in seconds on a CPU.

New weights go to the user weights folder under a new, versioned name; the shipped weights are
never written (:func:`save_finetuned` refuses any path inside the shipped folder).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss

from xai_core.io import Image
from xai_core.models import LesionModel, sha256
from xai_core.settings import Settings

DECODER_PREFIXES = ("dec2.", "dec1.", "seg_head.")


def trainable_names(net: torch.nn.Module) -> list[str]:
    return [n for n, _ in net.named_parameters() if n.startswith(DECODER_PREFIXES)]


def to_grid(model: LesionModel, image: Image, label: Image) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input (1, 1, K, J, I), target (1, 1, K, J, I) int64)`` on the model grid of ``image``."""
    if not image.same_geometry(label, tol=1e-3):
        raise ValueError("label and image grids differ")
    inputs = model.prepare(image)
    fg = label.with_array((np.asarray(label.array) > 0).astype(np.float32))
    on_grid, _ = model.grid.to_model(fg)
    target = torch.from_numpy((on_grid >= 0.5).astype(np.int64))[None, None].to(model.device)
    return inputs.tensor, target


def finetune_segmentation_head(model: LesionModel, pairs: Sequence[tuple[Image, Image]], *, iterations: int = 20,
                               lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Train ``model.net``'s decoder in place on ``(image, label)`` pairs; returns the loss per iteration."""
    if not pairs:
        raise ValueError("no (image, label) pairs to fine-tune on")
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    torch.manual_seed(seed)
    net = model.net
    train = set(trainable_names(net))
    for name, p in net.named_parameters():
        p.requires_grad_(name in train)
    net.eval()
    data = [to_grid(model, image, label) for image, label in pairs]
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    losses = []
    with torch.enable_grad():
        for it in range(iterations):
            x, y = data[it % len(data)]
            loss = loss_fn(net(x).seg_logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(round(float(loss.detach()), 6))
    for p in net.parameters():
        p.requires_grad_(True)
    return losses


def save_finetuned(model: LesionModel, out_dir: Path, training: dict[str, Any],
                   settings: Settings | None = None) -> Path:
    """Write ``<name>-ft-<timestamp>.pt`` and its card into ``out_dir``; returns the card path."""
    out_dir = Path(out_dir).resolve()
    shipped = Path((settings or Settings()).weights_dir).resolve()
    if out_dir == shipped or shipped in out_dir.parents:
        raise ValueError(f"refusing to write fine-tuned weights into the shipped weights folder {shipped}")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = model.card
    stamp = time.strftime("%Y%m%dT%H%M%S")
    name = f"{base.name}-ft-{stamp}"
    n = 1
    while (out_dir / f"{name}.pt").exists() or (out_dir / f"{name}.json").exists():
        n += 1
        name = f"{base.name}-ft-{stamp}-{n}"
    pt = out_dir / f"{name}.pt"
    tmp = pt.with_suffix(".pt.tmp")
    torch.save({k: v.detach().cpu() for k, v in model.net.state_dict().items()}, tmp)
    tmp.replace(pt)
    card = base.model_copy(deep=True, update={
        "name": name,
        "version": f"{base.version}+ft.{stamp}",
        "weights_sha256": sha256(pt),
        "training": {**training, "finetuned_from": {"name": base.name, "version": base.version,
                                                     "weights_sha256": base.weights_sha256}},
        # The base model's figures describe other weights; classification is unchanged (frozen encoder).
        "metrics": {"base_model_metrics": base.metrics},
    })
    card_path = out_dir / f"{name}.json"
    card_path.write_text(card.model_dump_json(indent=2))
    return card_path

"""Training of the default ``brain-lesion-3d`` model on generated studies.

``xai train brain-lesion-3d --data DIR --val DIR`` resamples every study once onto the model grid
(cached in ``--out``), trains classification and segmentation jointly with cheap on-grid
augmentation, checkpoints every epoch (``--resume`` continues), then fits a softmax temperature on
the validation set and writes the weights and model card into ``--out`` (the shipped weights under
``xai_core/models/weights`` are only replaced by a deliberate copy).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from .data.brain import CLASSES, read_manifest
from .io import Image, read_image
from .metrics import dice, expected_calibration_error, per_class_auroc
from .models import ModelCard, build_network, sha256
from .models.grid import ModelGrid, normalise_intensity
from .settings import Settings, resolve_device

log = logging.getLogger("xai.train")

MODEL_SPECS = {
    "brain-lesion-3d": dict(
        architecture="BrainLesionNet",
        arch_kwargs=dict(spatial_dims=3, in_channels=1, num_classes=len(CLASSES), seg_channels=2,
                         channels=[8, 16, 32, 64], lesion_gate=True),
        cam_layer="encoder_out",
        # RE-LIG's layer, chosen on validation (docs/benchmarks.md); the card carries it to the adapter.
        layers={"relig": "down1"},
    ),
}


# ------------------------------------------------------------------------------------ caching

def _grid_sample(args) -> tuple[np.ndarray, np.ndarray]:
    image_path, mask_path, size, spacing = args
    grid = ModelGrid(size, spacing)
    image = read_image(image_path)
    arr, ref = grid.to_model(image)
    # Masks of lesion-free studies are all zero, which read_image rightly refuses for an image.
    mask = Image.from_sitk(sitk.Cast(sitk.ReadImage(str(mask_path)), sitk.sitkFloat32))
    m, _ = grid.to_model(mask)
    return normalise_intensity(arr), (m >= 0.5).astype(np.uint8)


def load_on_grid(data_dir: Path, cache: Path, grid: ModelGrid, workers: int = 2):
    """All studies of ``data_dir`` on the model grid: images ``(N, K, J, I)`` float32, masks uint8,
    labels int64. Cached as ``cache`` (an .npz) so that a resumed run skips the resampling."""
    if cache.exists():
        z = np.load(cache)
        return z["images"], z["masks"], z["labels"]
    rows = read_manifest(data_dir)
    jobs = [(r["image"], r["mask"], grid.size, grid.spacing) for r in rows]
    with ProcessPoolExecutor(workers) as pool:
        out = list(pool.map(_grid_sample, jobs, chunksize=4))
    images = np.stack([o[0] for o in out])
    masks = np.stack([o[1] for o in out])
    labels = np.array([r["label_index"] for r in rows], dtype=np.int64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, images=images, masks=masks, labels=labels)
    return images, masks, labels


# -------------------------------------------------------------------------------- augmentation

def augment(x: torch.Tensor, m: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """On-grid augmentation of a batch ``x (B, 1, K, J, I)`` and masks ``m (B, K, J, I)``:
    left-right flip, shift up to 4 voxels, intensity scale and gamma, Gaussian noise."""
    out_x, out_m = [], []
    for b in range(x.shape[0]):
        xb, mb = x[b], m[b]
        if torch.rand(1, generator=g).item() < 0.5:
            xb, mb = xb.flip(-1), mb.flip(-1)
        shifts = [int(v) for v in torch.randint(-4, 5, (3,), generator=g)]
        xb, mb = xb.roll(shifts, dims=(-3, -2, -1)), mb.roll(shifts, dims=(-3, -2, -1))
        gamma = math.exp(float(torch.empty(1).uniform_(-0.2, 0.2, generator=g)))
        scale = float(torch.empty(1).uniform_(0.9, 1.1, generator=g))
        xb = xb.clamp(min=0) ** gamma * scale
        xb = xb + 0.02 * torch.randn(xb.shape, generator=g)
        out_x.append(xb)
        out_m.append(mb)
    return torch.stack(out_x), torch.stack(out_m)


# -------------------------------------------------------------------------------- calibration

def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising validation NLL (1-D search over log T in 0.25..8; robust, no optimiser
    state). When every validation study is classified right the NLL keeps falling as T -> 0 and the
    search ends on its lower edge: that would sharpen every probability towards 0 or 1 on the word of
    a set with no errors, so the temperature stays 1 (uncalibrated) instead."""
    lt = torch.from_numpy(logits).double()
    y = torch.from_numpy(labels)
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 200))
    nll = [F.cross_entropy(lt / t, y).item() for t in grid]
    best = int(np.argmin(nll))
    return 1.0 if best == 0 else float(grid[best])


# ------------------------------------------------------------------------------------ training

def _coarse(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Lesion labels ``(B, K, J, I)`` reduced to the grid of ``like`` ``(B, C, k, j, i)``: a cell is
    lesion when any voxel in it is, so that 5 mm metastases are not lost. Returns ``(B, 1, k, j, i)``."""
    return F.adaptive_max_pool3d(m[:, None].float(), like.shape[2:]).long()


def _evaluate_grid(net, images, masks, labels, device, batch: int = 8):
    net.eval()
    logits, dices = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch])[:, None].to(device)
            out = net(x)
            logits.append(out.class_logits.float().cpu().numpy())
            seg = out.seg_logits.argmax(1).cpu().numpy()
            for s, m, y in zip(seg, masks[i:i + batch], labels[i:i + batch], strict=True):
                if y > 0:
                    dices.append(dice(s, m))
    return np.concatenate(logits), float(np.mean(dices)) if dices else float("nan")


def train(model: str, data_dir: Path, val_dir: Path | None = None, out_dir: Path = Path("runs/train"),
          epochs: int = 30, seed: int = 0, batch_size: int = 4, lr: float = 3e-3, resume: bool = False,
          workers: int = 2, init: Path | None = None, version: str = "1.0.0",
          deep_supervision_weight: float = 0.5, *, settings: Settings | None = None) -> Path:
    """Train ``model`` and write ``<name>.pt`` and ``<name>.json`` into ``out_dir``.

    ``init`` starts from the weights of an earlier run (a ``<name>.pt``) with a fresh optimiser and
    schedule: a second, lower-``lr`` stage. ``deep_supervision_weight`` weighs the coarse lesion loss
    on the last encoder stage (architectures built with ``lesion_gate=True``). ``settings`` gives
    the threads, the device and the model grid (default ``Settings()``). Returns the path of the
    model card written.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if model not in MODEL_SPECS:
        raise KeyError(f"unknown model {model!r}; trainable: {sorted(MODEL_SPECS)}")
    s = settings or Settings()
    if s.num_threads:
        torch.set_num_threads(s.num_threads)
    device = resolve_device(s.device)
    spec = MODEL_SPECS[model]
    grid = ModelGrid(s.model_grid_size, s.model_grid_spacing_mm)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    images, masks, labels = load_on_grid(data_dir, out_dir / "cache_train.npz", grid, workers)
    log.info("training set: %d studies on the %d^3 grid (%.0f s)", len(images), grid.size, time.time() - t0)
    val = load_on_grid(val_dir, out_dir / "cache_val.npz", grid, workers) if val_dir else None

    torch.manual_seed(seed)
    card = ModelCard(name=model, version=version, classes=list(CLASSES), grid_size=grid.size,
                     grid_spacing_mm=grid.spacing, **spec)
    # channels-last roughly halves the CPU cost of 3-D convolutions (oneDNN's preferred layout).
    fmt = torch.channels_last_3d
    net = build_network(card)
    if init is not None:
        net.load_state_dict(torch.load(init, map_location="cpu", weights_only=True))
        log.info("initialised from %s", init)
    net = net.to(device, memory_format=fmt)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.1)
    seg_loss = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True)
    # Classes are drawn uniformly by the generator; weights keep that balance on any data set.
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(float)
    cls_w = torch.tensor(counts.sum() / (len(CLASSES) * np.maximum(counts, 1)), dtype=torch.float32,
                         device=device)
    g = torch.Generator().manual_seed(seed)
    start_epoch, ckpt = 0, out_dir / "last.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["gen"])
        start_epoch = state["epoch"] + 1
        log.info("resumed from epoch %d", start_epoch)

    history = []
    for epoch in range(start_epoch, epochs):
        net.train()
        te = time.time()
        perm = torch.randperm(len(images), generator=g).numpy()
        tot = {"cls": 0.0, "seg": 0.0}
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size:(step + 1) * batch_size]
            x = torch.from_numpy(images[idx])[:, None]
            m = torch.from_numpy(masks[idx].astype(np.int64))
            x, m = augment(x, m, g)
            x, m = x.to(device, memory_format=fmt), m.to(device)
            y = torch.from_numpy(labels[idx]).to(device)
            out = net(x)
            l_cls = F.cross_entropy(out.class_logits, y, weight=cls_w)
            l_seg = seg_loss(out.seg_logits, m[:, None])
            loss = l_cls + l_seg
            if out.encoder_seg_logits is not None:
                aux = out.encoder_seg_logits
                loss = loss + deep_supervision_weight * seg_loss(aux, _coarse(m, aux))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot["cls"] += l_cls.item()
            tot["seg"] += l_seg.item()
            if (step + 1) % 20 == 0:
                el = time.time() - te
                print(f"\repoch {epoch + 1}/{epochs} step {step + 1}/{steps_per_epoch} "
                      f"cls {tot['cls'] / (step + 1):.3f} seg {tot['seg'] / (step + 1):.3f} "
                      f"{el / (step + 1):.2f}s/step", end="", flush=True)
        print(flush=True)
        rec = {"epoch": epoch + 1, "cls_loss": tot["cls"] / steps_per_epoch,
               "seg_loss": tot["seg"] / steps_per_epoch, "seconds": time.time() - te}
        if val is not None:
            vlogits, vdice = _evaluate_grid(net, *val, device)
            rec["val_acc"] = float((vlogits.argmax(1) == val[2]).mean())
            rec["val_dice_grid"] = vdice
        history.append(rec)
        log.info("epoch %s", json.dumps(rec))
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "gen": g.get_state(), "epoch": epoch, "history": history}, tmp)
        os.replace(tmp, ckpt)

    metrics: dict = {}
    if val is not None:
        vlogits, vdice = _evaluate_grid(net, *val, device)
        t = fit_temperature(vlogits, val[2])
        card.temperature = t
        p_raw = torch.softmax(torch.from_numpy(vlogits), 1).numpy()
        p_cal = torch.softmax(torch.from_numpy(vlogits) / t, 1).numpy()
        metrics["validation"] = {
            "n": int(len(val[2])),
            "accuracy": float((vlogits.argmax(1) == val[2]).mean()),
            "auroc": per_class_auroc(p_cal, val[2], CLASSES),
            "dice_model_grid": vdice,
            "ece_before_calibration": expected_calibration_error(p_raw, val[2]),
            "ece_after_calibration": expected_calibration_error(p_cal, val[2]),
            "temperature": t,
        }
    card.metrics = metrics
    card.training = {"data": str(data_dir), "n_studies": int(len(images)), "epochs": epochs, "seed": seed,
                     "batch_size": batch_size, "lr": lr, "device": str(device),
                     "init": str(init) if init else None, "deep_supervision_weight": deep_supervision_weight,
                     "seconds": round(time.time() - t0, 1), "history": history}
    # Written next to the checkpoints, not into a weights folder that load() searches: a local run
    # must not shadow the shipped model. Shipping it is a deliberate copy (see docs/model_card.md).
    wpath = out_dir / f"{model}.pt"
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, wpath)
    card.weights_sha256 = sha256(wpath)
    card_path = wpath.with_suffix(".json")
    card_path.write_text(card.model_dump_json(indent=2))
    log.info("wrote %s and %s", wpath, card_path)
    return card_path

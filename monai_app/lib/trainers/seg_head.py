"""``seg_head_finetune``: MONAI Label train task over the labels stored in the datastore.

``POST /train/seg_head_finetune`` (params ``tag``, ``iterations``, ``lr``) runs it in a separate
process (MONAI Label's background task), so the server keeps answering while it trains.
"""

from __future__ import annotations

import glob
import json
import logging
import time
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from xai_core.io import Image, read_image
from xai_core.models import load
from xai_core.settings import get_settings, resolve_device

from .finetune import DECODER_PREFIXES, finetune_segmentation_head, save_finetuned

log = logging.getLogger("xai.train")


class SegHeadFinetuneTask(TrainTask):
    def __init__(self, model: str, device: str):
        super().__init__("Fine-tune the segmentation head (encoder frozen) on stored labels; "
                         "writes <model>-ft-<timestamp> weights into the user weights folder")
        self.model = model
        self.device = device

    def config(self) -> dict[str, Any]:
        return {"tag": "final", "iterations": 20, "lr": 0.001, "max_images": 50}

    def stats(self) -> dict[str, Any]:
        """The newest fine-tuned model of this base (cheap: file names only)."""
        out = Path(get_settings().user_weights_dir)
        cards = sorted(glob.glob(str(out / f"{glob.escape(self.model)}-ft-*.json")))
        return {"latest": Path(cards[-1]).stem if cards else None, "count": len(cards)}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        cfg = {**self.config(), **{k: v for k, v in request.items() if k in self.config()}}
        tag, iterations, lr = str(cfg["tag"]), int(cfg["iterations"]), float(cfg["lr"])
        t0 = time.time()
        pairs, used = [], []
        for image_id in datastore.list_images():
            label_uri = datastore.get_label_uri(image_id, tag)
            if not label_uri:
                continue
            image = read_image(datastore.get_image_uri(image_id))
            # A corrected label may be all zero (no lesion): read it as a label, not as an image.
            label = Image.from_sitk(sitk.ReadImage(label_uri))
            if not image.same_geometry(label, tol=1e-3):
                log.warning("skipping %s: label grid differs from the image grid", image_id)
                continue
            pairs.append((image, label))
            info = datastore.get_label_info(image_id, tag)
            used.append({"image": image_id, "tag": tag, "label_version": info.get("version"),
                         "source": info.get("source"), "result_id": info.get("result_id")})
            if len(pairs) >= int(cfg["max_images"]):
                break
        if not pairs:
            raise ValueError(f"no stored labels with tag {tag!r} to fine-tune on")
        model = load(self.model, device=resolve_device(self.device))
        log.info("fine-tuning %s on %d labelled images, %d iterations", self.model, len(pairs), iterations)
        losses = finetune_segmentation_head(model, pairs, iterations=iterations, lr=lr)
        card = save_finetuned(model, Path(get_settings().user_weights_dir), {
            "kind": "segmentation-head fine-tune", "trainable_prefixes": list(DECODER_PREFIXES),
            "labels": used, "iterations": iterations, "lr": lr, "losses": losses,
            "device": str(model.device), "seconds": round(time.time() - t0, 2)})
        log.info("wrote %s", card)
        return {"model": json.loads(card.read_text())["name"], "card": str(card), "losses": losses,
                "images": len(pairs)}

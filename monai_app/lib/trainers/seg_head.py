"""``seg_head_finetune``: MONAI Label train task over the labels stored in the datastore.

``POST /train/seg_head_finetune`` (params ``tag``, ``iterations``, ``lr``) runs it in a separate
process (MONAI Label's background task), so the server keeps answering while it trains.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from xai_core.io import Image, read_image
from xai_core.models import load
from xai_core.settings import Settings, resolve_device

from ..errors import BadInput
from .finetune import DECODER_PREFIXES, finetune_segmentation_head, save_finetuned

log = logging.getLogger("xai.train")


class SegHeadFinetuneTask(TrainTask):
    def __init__(self, model: str, device: str, settings: Settings | None = None):
        super().__init__("Fine-tune the segmentation head (encoder frozen) on stored labels; "
                         "writes <model>-ft-<timestamp> weights into the user weights folder")
        self.model = model
        self.device = device
        self.settings = settings or Settings()

    def config(self) -> dict[str, Any]:
        return {"tag": "final", "iterations": 20, "lr": 0.001, "max_images": 50}

    def stats(self) -> dict[str, Any]:
        """The newest fine-tuned model of this base (cheap: file names only)."""
        out = Path(self.settings.user_weights_dir)
        cards = sorted(glob.glob(str(out / f"{glob.escape(self.model)}-ft-*.json")))
        return {"latest": Path(cards[-1]).stem if cards else None, "count": len(cards)}

    def settings_of(self, request: dict[str, Any] | None) -> tuple[str, int, float, int]:
        """``(tag, iterations, lr, max_images)`` of a request; :class:`BadInput` (422) for bad values."""
        request = dict(request or {})
        cfg = {**self.config(), **{k: v for k, v in request.items() if k in self.config()}}
        try:
            tag, iterations, lr, max_images = (str(cfg["tag"]), int(cfg["iterations"]), float(cfg["lr"]),
                                               int(cfg["max_images"]))
        except (TypeError, ValueError):
            raise BadInput(f"bad training parameters {({k: cfg[k] for k in self.config()})!r}: tag is a name, "
                           "iterations and max_images are integers, lr a number") from None
        if not 1 <= iterations <= 100_000 or not 0 < lr <= 1 or max_images < 1 or not math.isfinite(lr):
            raise BadInput(f"bad training parameters: iterations {iterations} (1-100000), lr {lr} (0-1], "
                           f"max_images {max_images} (>= 1)")
        return tag, iterations, lr, max_images

    @staticmethod
    def labelled(datastore: Datastore, tag: str) -> list[str]:
        """Ids of the images that have a label with ``tag``."""
        return [i for i in datastore.list_images() if datastore.get_label_uri(i, tag)]

    def check_request(self, request: dict[str, Any] | None, datastore: Datastore) -> None:
        """Called by the HTTP route before the background process starts: client errors become a 4xx
        there instead of an ERROR state later."""
        tag, *_ = self.settings_of(request)
        if not self.labelled(datastore, tag):
            raise BadInput(f"no stored labels with tag {tag!r} to fine-tune on: save labels with "
                           f"PUT /datastore/label?image=ID&tag={tag} first")

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        tag, iterations, lr, max_images = self.settings_of(request)
        t0 = time.time()
        pairs, used = [], []
        for image_id in self.labelled(datastore, tag):
            label_uri = datastore.get_label_uri(image_id, tag)
            image = read_image(datastore.get_image_uri(image_id))
            # A corrected label may be all zero (no lesion): read it as a label, not as an image.
            label = self._read_label(datastore, image_id, tag, label_uri)
            if label is None:
                continue
            if not image.same_geometry(label, tol=1e-3):
                log.warning("skipping %s: label grid differs from the image grid", image_id)
                continue
            pairs.append((image, label))
            info = datastore.get_label_info(image_id, tag)
            used.append({"image": image_id, "tag": tag, "label_version": info.get("version"),
                         "source": info.get("source"), "result_id": info.get("result_id")})
            if len(pairs) >= max_images:
                break
        if not pairs:
            raise BadInput(f"no usable stored labels with tag {tag!r} to fine-tune on")
        model = load(self.model, device=resolve_device(self.device), settings=self.settings)
        log.info("fine-tuning %s on %d labelled images, %d iterations", self.model, len(pairs), iterations)
        losses = finetune_segmentation_head(model, pairs, iterations=iterations, lr=lr)
        card = save_finetuned(model, Path(self.settings.user_weights_dir), settings=self.settings, training={
            "kind": "segmentation-head fine-tune", "trainable_prefixes": list(DECODER_PREFIXES),
            "labels": used, "iterations": iterations, "lr": lr, "losses": losses,
            "device": str(model.device), "seconds": round(time.time() - t0, 2)})
        log.info("wrote %s", card)
        return {"model": json.loads(card.read_text())["name"], "card": str(card), "losses": losses,
                "images": len(pairs)}

    @staticmethod
    def _read_label(datastore: Datastore, image_id: str, tag: str, label_uri: str) -> Image | None:
        """The label as an image, its bytes verified against the stored sha256 when the datastore can
        (``read_label``); a label that fails the check is skipped with a warning, never trained on."""
        read = getattr(datastore, "read_label", None)
        if read is None:
            return Image.from_sitk(sitk.ReadImage(label_uri))
        try:
            data, name, _ = read(image_id, tag)
        except Exception as e:  # LabelIntegrityError (imported as lib.datastore in MONAI Label's process)
            log.warning("skipping label %r of %s: %s", tag, image_id, e)
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            return Image.from_sitk(sitk.ReadImage(str(path)))

"""``seg_head_finetune``: MONAI Label train task over the labels stored in the datastore.

``POST /train/seg_head_finetune`` runs it in a separate process (MONAI Label's background task), so
the server keeps answering while it trains. The run:

1. reads the labels with ``tag`` (bytes verified against their stored sha256) and the studies,
2. loads the model version that serves now (the active published version, else the model's own
   weights) as the base,
3. fine-tunes and validates (:func:`lib.trainers.finetune.finetune`), writing its progress and
   validation curve to ``<datastore>/.xai/train/latest.json`` after every epoch (``GET /train/``
   shows it),
4. publishes the new weights as the next version of the lineage (``lib.versions``) only when their
   validation Dice beats the base's on the same labels AND their Dice on held-out studies of the
   original condition drops by no more than ``max_original_drop``; otherwise the run ends
   ``not_better`` with the figures. ``activate: true`` makes a published version active at once.

Rehearsal: studies of the original condition (skull-stripped T1 of the project's own generator,
``xai_core.data.brain``, the data the release was trained on) join every mini-batch so that labels
of one condition do not make the model forget the other; a second set, never trained on, is the
guard's check. Both are generated once with fixed seeds and cached in
``<state dir>/replay/original-s<seed>/`` (nothing is downloaded).

The name is kept from when only the segmentation head learned (clients call it); ``parts`` chooses
what learns now.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from xai_core.io import Image, read_image
from xai_core.models import LesionModel, load_card_file
from xai_core.settings import Settings, resolve_device

from ..errors import BadInput
from ..versions import VersionStore, display_name
from .finetune import PARTS, SPLITS, FinetuneSettings, Sample, finetune, to_sample

log = logging.getLogger("xai.train")

STATUS_DIR = "train"
LATEST = "latest.json"
# Request keys and their types; FinetuneSettings checks the ranges.
SETTING_KEYS: dict[str, type] = {"parts": str, "lr": float, "batch_size": int, "max_epochs": int, "patience": int,
                                 "split": str, "val_fraction": float, "folds": int, "min_improvement": float,
                                 "seed": int, "max_steps": int, "replay_per_batch": int, "replay_weight": float,
                                 "l2sp_weight": float, "replay_distill_weight": float, "max_original_drop": float,
                                 "interpolation_steps": int, "select_from": float, "keep": str, "replay_studies": int,
                                 "replay_check_studies": int, "replay_seed": int}
REPLAY_DIR = "replay"
# The original condition: the historic generator's defaults (MNI152 anatomy, skull-stripped T1).
REPLAY_CONDITION = "generated, mni152, skull off, t1 (xai_core.data.brain defaults)"


def replay_folder(state_dir: Path | str, cfg: FinetuneSettings) -> Path:
    """Where the original-condition studies of ``cfg.replay_seed`` are cached: a folder as
    ``xai data make-brain`` writes it (``manifest.csv`` with ``study_id``, ``image``, ``mask``)."""
    return Path(state_dir) / REPLAY_DIR / f"original-s{cfg.replay_seed}"


def replay_sets(model: LesionModel, state_dir: Path | str, cfg: FinetuneSettings,
                progress: Any = None) -> tuple[list[Sample], list[Sample], dict[str, Any]]:
    """``(replay, check, info)``: the first ``replay_studies`` cached studies (rehearsed; none when
    ``replay_per_batch`` is 0) and the next ``replay_check_studies`` (the guard's held-out check), on
    the model grid. Generated (deterministic seed) when the cache holds fewer."""
    import csv

    from xai_core.data.brain import BrainOptions, make_brain_studies

    n_train = cfg.replay_studies if cfg.replay_per_batch else 0
    n = n_train + cfg.replay_check_studies
    folder = replay_folder(state_dir, cfg)
    info = {"condition": REPLAY_CONDITION, "seed": cfg.replay_seed, "folder": str(folder), "n_replay": 0,
            "n_check": 0}
    if n == 0:
        return [], [], info

    def rows() -> list[dict[str, str]]:
        try:
            with open(folder / "manifest.csv", newline="") as f:
                return list(csv.DictReader(f))
        except OSError:
            return []

    have = rows()
    if len(have) < cfg.replay_studies + cfg.replay_check_studies:
        if progress:
            progress(n)
        t = time.time()
        # The generator is deterministic per (seed, index): a larger set starts with the smaller one.
        # Two workers at most: a fine-tune shares the machine with the server's model worker.
        make_brain_studies(cfg.replay_studies + cfg.replay_check_studies, cfg.replay_seed, folder,
                           workers=min(2, os.cpu_count() or 1), options=BrainOptions())
        log.info("generated %d original-condition studies in %s (%.0f s)", n, folder, time.time() - t)
        have = rows()
    # The check set is the same studies whether or not the run rehearses: the studies after the first
    # ``replay_studies``.
    picked = have[:n_train] + have[cfg.replay_studies:cfg.replay_studies + cfg.replay_check_studies]
    out = []
    for r in picked:
        image = read_image(str(folder / r["image"]))
        mask = Image.from_sitk(sitk.ReadImage(str(folder / r["mask"])))  # lesion-free masks are all zero
        out.append(to_sample(model, image, mask, key=r.get("study_id") or Path(r["image"]).name))
    info.update(n_replay=n_train, n_check=len(out) - n_train)
    return out[:n_train], out[n_train:], info


def status_path(state_dir: Path | str) -> Path:
    """Where the newest run's status lives (``GET /train/`` reads it)."""
    return Path(state_dir) / STATUS_DIR / LATEST


def read_status(state_dir: Path | str) -> dict[str, Any] | None:
    try:
        return json.loads(status_path(state_dir).read_text())
    except (OSError, ValueError):
        return None


def _write_json(dest: Path, doc: dict[str, Any]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, dest)  # the server reads it while the run writes: never a torn file


class SegHeadFinetuneTask(TrainTask):
    def __init__(self, model: str, device: str, settings: Settings | None = None,
                 state_dir: Path | str | None = None):
        super().__init__("Fine-tune on stored labels (decoder, last encoder stages or all), validated against "
                         "the base model; publishes the next version of the lineage only when it is better")
        self.model = model
        self.device = device
        self.settings = settings or Settings()
        self.state_dir = Path(state_dir) if state_dir is not None else None

    def config(self) -> dict[str, Any]:
        d = FinetuneSettings().as_dict()
        return {"tag": "final", **{k: d[k] for k in SETTING_KEYS}, "max_images": 50, "activate": False}

    def last_run(self) -> dict[str, Any] | None:
        """The newest run's status doc (``GET /train/`` shows it), or None before any run."""
        return read_status(self.state_dir) if self.state_dir else None

    def versions(self) -> VersionStore:
        return VersionStore(self.settings.user_weights_dir, self.model)

    def stats(self) -> dict[str, Any]:
        """Published versions of this model and the newest run's outcome (cheap: small files only).
        Published versions keep the served model's name, so this is the same whichever is active."""
        store = self.versions()
        published = store.versions()
        last = self.last_run()
        return {"latest": display_name(self.model, published[-1]) if published else None, "count": len(published),
                "active": store.active(),
                "last_run": {k: (last or {}).get(k) for k in ("run_id", "state", "validation", "version")}
                if last else None}

    def settings_of(self, request: dict[str, Any] | None) -> tuple[str, FinetuneSettings, int, bool]:
        """``(tag, settings, max_images, activate)`` of a request; :class:`BadInput` (422) for bad values."""
        request = dict(request or {})
        cfg = {**self.config(), **{k: v for k, v in request.items() if k in self.config()}}
        # ``iterations`` (the earlier API) bounds the optimiser steps.
        if request.get("iterations") not in (None, ""):
            cfg["max_steps"] = request["iterations"]
        try:
            values = {k: t(cfg[k]) for k, t in SETTING_KEYS.items()}
            if any(isinstance(cfg[k], bool) or (t is not str and isinstance(cfg[k], str) and not cfg[k].strip())
                   for k, t in SETTING_KEYS.items()):
                raise ValueError
            tag, max_images = str(cfg["tag"]), int(cfg["max_images"])
            activate = cfg["activate"]
            if not isinstance(activate, bool):
                activate = str(activate).lower() in ("1", "true", "yes")
            settings = FinetuneSettings(**values)
        except (TypeError, ValueError) as e:
            shown = {k: cfg.get(k) for k in [*SETTING_KEYS, "max_images"]}
            raise BadInput(f"bad training parameters {shown!r}: {e if str(e) else 'wrong types'} "
                           f"(parts {sorted(PARTS)}, split {list(SPLITS)}, iterations/max_steps, batch_size, "
                           "max_epochs, patience, folds, seed, max_images integers; lr, val_fraction numbers)"
                           ) from None
        if max_images < 2 or not tag or any(not math.isfinite(v) for v in values.values() if isinstance(v, float)):
            raise BadInput(f"bad training parameters: max_images {max_images} (>= 2), tag {tag!r}")
        return tag, settings, max_images, activate

    @staticmethod
    def labelled(datastore: Datastore, tag: str) -> list[str]:
        """Ids of the images that have a label with ``tag``."""
        return [i for i in datastore.list_images() if datastore.get_label_uri(i, tag)]

    def check_request(self, request: dict[str, Any] | None, datastore: Datastore) -> None:
        """Called by the HTTP route before the background process starts: client errors become a 4xx
        there instead of an ERROR state later."""
        tag, *_ = self.settings_of(request)
        ids = self.labelled(datastore, tag)
        if not ids:
            raise BadInput(f"no stored labels with tag {tag!r} to fine-tune on: save labels with "
                           f"PUT /datastore/label?image=ID&tag={tag} first")
        if len(ids) < 2:
            raise BadInput(f"only 1 stored label with tag {tag!r}: a validated fine-tune needs at least 2 "
                           "(one is held out to check the new weights against the current ones)")

    # -- the run ----------------------------------------------------------------------------------

    def _status(self, doc: dict[str, Any]) -> None:
        if self.state_dir is None:
            return
        doc["updated_at"] = time.time()
        try:
            _write_json(status_path(self.state_dir), doc)
        except OSError as e:  # progress reporting must not end a run
            log.warning("cannot write the train status: %s", e)

    def base_files(self) -> tuple[Path, Path]:
        """``(card, weights)`` of the version that serves now: the lineage continues from it."""
        from ..models import ModelCache

        files = ModelCache(self.model, self.device, self.settings).files()
        if files is None:
            raise BadInput(f"model {self.model!r} has no weights to fine-tune")
        return files

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        tag, cfg, max_images, activate = self.settings_of(request)
        t0 = time.time()
        doc: dict[str, Any] = {"run_id": uuid.uuid4().hex, "trainer": "seg_head_finetune", "state": "running",
                               "stage": "reading labels", "progress": 0.0, "started_at": t0, "curve": [],
                               "settings": {"tag": tag, **cfg.as_dict(), "max_images": max_images,
                                            "activate": activate}}
        self._status(doc)
        try:
            result = self._run(doc, datastore, tag, cfg, max_images, activate)
        except BaseException as e:
            doc.update(state="failed", stage="failed", error=str(e) or type(e).__name__, finished_at=time.time())
            self._status(doc)
            raise
        return result

    def _run(self, doc: dict[str, Any], datastore: Datastore, tag: str, cfg: FinetuneSettings, max_images: int,
             activate: bool) -> dict[str, Any]:
        card_path, pt = self.base_files()
        # A copy of its own: the server's cached model may be hooked by an explanation meanwhile.
        model = load_card_file(card_path, device=resolve_device(self.device), weights=pt)
        samples, used = [], []
        for image_id in self.labelled(datastore, tag):
            label_uri = datastore.get_label_uri(image_id, tag)
            label = self._read_label(datastore, image_id, tag, label_uri)
            if label is None:
                continue
            image = read_image(datastore.get_image_uri(image_id))
            if not image.same_geometry(label, tol=1e-3):
                log.warning("skipping %s: label grid differs from the image grid", image_id)
                continue
            samples.append(to_sample(model, image, label, key=image_id))
            info = datastore.get_label_info(image_id, tag)
            used.append({"image": image_id, "tag": tag, "label_version": info.get("version"),
                         "sha256": info.get("sha256"), "source": info.get("source"),
                         "result_id": info.get("result_id"), "saved_at": info.get("saved_at")})
            if len(samples) >= max_images:
                break
        if len(samples) < 2:
            raise BadInput(f"{len(samples)} usable stored label(s) with tag {tag!r}: a validated fine-tune needs 2")
        base = {"name": model.card.name, "version": model.card.version, "weights_sha256": model.card.weights_sha256,
                "display_name": display_name(model.card.name, model.card.version)}
        replay, check, replay_info = [], [], None
        if self.state_dir is not None:
            def generating(k: int) -> None:
                doc.update(stage=f"generating {k} original-condition studies for rehearsal (once)")
                self._status(doc)

            replay, check, replay_info = replay_sets(model, self.state_dir, cfg, progress=generating)
        doc.update(stage="training", base=base, labels=used, replay=replay_info)
        self._status(doc)
        log.info("fine-tuning %s on %d labels (%s)", base["display_name"], len(samples), cfg.as_dict())

        def progress(rec: dict[str, Any]) -> None:
            doc.update({k: v for k, v in rec.items() if k != "curve"})
            # The run going on now (a fold, the hold-out run, the refit), and every run so far by stage.
            doc["curve"] = rec["curve"]
            doc.setdefault("curves", {})[rec["stage"]] = rec["curve"]
            last = rec["curve"][-1] if rec["curve"] else {}
            # One line per epoch: MONAI Label keeps the last lines of the process in GET /train/ details.
            print(f"[finetune] {rec['stage']} epoch {rec['epoch']}/{rec['epochs']} "
                  f"loss {last.get('train_loss')} val_dice {last.get('val_dice')}", flush=True)
            self._status(doc)

        outcome = finetune(model, samples, cfg, progress=progress, replay=replay, replay_check=check)
        validation = outcome.validation()
        original = validation["original_condition"]
        doc.update(validation=validation, original_condition=original, progress=1.0, finished_at=time.time())
        settings = {"tag": tag, **cfg.as_dict(), "max_images": max_images, "device": str(model.device)}
        kept = "" if original is None else (f"; original condition {original['after']:.4f} vs "
                                            f"{original['before']:.4f} (at most {original['max_drop']} lower)")
        if not outcome.better:
            why = ("forgets the original condition" if outcome.reason == "forgets the original condition"
                   else "not better")
            doc.update(state="not_better", stage="done", version=None,
                       message=f"{why}: validation Dice {outcome.after:.4f} after fine-tuning vs "
                               f"{outcome.before:.4f} for {base['display_name']} on the same {validation['scheme']} "
                               f"labels{kept}; nothing published")
            self._status(doc)
            log.info(doc["message"])
            return {"outcome": "not_better", "before": outcome.before, "after": outcome.after, "version": None,
                    "validation": validation, "original_condition": original}
        model.net.load_state_dict(outcome.state)
        store = self.versions()
        card = store.publish(model.net, model.card, training={
            "kind": "fine-tune on stored labels", "trainer": "seg_head_finetune", "base": base, "labels": used,
            "settings": settings, "trainable_prefixes": list(PARTS[cfg.parts]), "curve": outcome.curve,
            "replay": replay_info, "seconds": round(time.time() - doc["started_at"], 2)},
            metrics={"validation": validation, "original_condition": original})
        if activate:
            store.activate(card.version)
        name = display_name(card.name, card.version)
        doc.update(state="published", stage="done", version=card.version, display_name=name, activated=activate,
                   message=f"published {name}: validation Dice {outcome.after:.4f} vs {outcome.before:.4f} for "
                           f"{base['display_name']}{kept}"
                           + ("" if outcome.alpha == 1.0 else f"; {outcome.reason}"))
        self._status(doc)
        log.info(doc["message"])
        return {"outcome": "published", "before": outcome.before, "after": outcome.after, "version": card.version,
                "display_name": name, "activated": activate, "validation": validation,
                "original_condition": original}

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

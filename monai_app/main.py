"""MONAI Label app: explanations of the ``brain-lesion-3d`` model (``xai_core``) over HTTP.

MONAI Label loads this file and instantiates the one class whose *direct* base is
``MONAILabelApp``; keep it that way (an intermediate base class breaks discovery).

``--conf`` keys (all optional): ``models`` (comma-separated model names, the first is the default
whose tasks keep their plain names; the others' tasks are named ``<model>.<task>``) or ``model``
(one model; default ``brain-lesion-3d``), ``device`` (``auto``,
``cpu``, ``cuda:0``; default ``XAI_DEVICE``), ``vqa_model`` (the model behind the ``vqa`` task, default
``brain-vqa``; ``none`` turns it off; served whenever its weights exist, without being named in
``models``), ``token`` (default ``XAI_TOKEN``), ``max_upload_mb`` (default ``XAI_MAX_UPLOAD_MB``),
``results_dir``, ``results_keep``, ``jobs_keep``, ``evidence`` (MedLIME's
evidence library file from ``xai evidence build``, loaded once at start and used by every ``medlime`` task;
without it MedLIME runs without evidence regularisation and says so in its result).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from lib.activelearning import LeastSure
from lib.configs import CONFIGS
from lib.datastore import VersionedLocalDatastore
from lib.options import AppOptions
from lib.runtime import XAIRuntime
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.random import Random

import xai_core

log = logging.getLogger("xai.app")


def _refuse_unguarded_server(token: str) -> None:
    """With a token, refuse to serve HTTP without the ``monai_app.asgi`` wrapper (auth, upload and id
    checks, the route allow-list). MONAI Label's own processes that build the app without a server
    (training, batch inference) do not import ``monailabel.app`` and are not affected."""
    if not token or "monailabel.app" not in sys.modules:
        return
    asgi = sys.modules.get("monai_app.asgi")
    if asgi is None or not getattr(asgi, "WRAPPED", False):
        raise RuntimeError(
            "a token is configured but the auth layer is not installed: this server would answer without "
            "auth or upload checks. Start it with `xai serve` (or make serve), or add "
            "`--uvicorn_app monai_app.asgi:app` to `monailabel start_server` with the repository on PYTHONPATH "
            "(docs/server.md)")


def _load_medlime_resources(evidence: str | None) -> None:
    """Shared resources of the MedLIME tasks, loaded once at start: the evidence library (``--conf evidence``)
    and the masked autoencoder (when its weights ship); a missing library file stops the start."""
    from xai_core.evidence import set_default_library
    from xai_core.mae import load_mae

    if evidence:
        lib = set_default_library(evidence)
        log.info("evidence library %s: %d cases", evidence, len(lib))
    try:
        load_mae()
    except FileNotFoundError as exc:  # MedLIME tasks then fail with this message; the others are unaffected
        log.warning("%s", exc)


class XAIApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        # The runtime exists before MONAI Label's constructor, which calls init_datastore/init_infers.
        self.xai = XAIRuntime(AppOptions.from_conf(conf, studies))
        _refuse_unguarded_server(self.xai.options.token)
        _load_medlime_resources(conf.get("evidence"))
        self.task_configs = []
        options = self.xai.options
        for name in options.served_models:
            # The vqa model's task exists from the start, its weights may land later (a card-less model
            # would otherwise read as a volume classifier).
            kind = "vqa" if name == options.vqa_model else self.xai.cache(name).kind()
            if kind not in CONFIGS:
                raise ValueError(f"model {name!r} has kind {kind!r}, which the app does not serve ({sorted(CONFIGS)})")
            config = CONFIGS[kind]()
            config.init(name, str(self.xai.settings.user_weights_dir), conf, None, runtime=self.xai, model=name)
            self.task_configs.append(config)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="xai-brain-lesion",
                         description="Explanations (Grad-CAM, Grad-CAM++, Score-CAM, RE-LIG, IG, ...) of a 3-D brain "
                                     "lesion classifier, saliency masks, and corrected-label fine-tuning",
                         version=xai_core.__version__)
        self.xai.bind(self.infer)
        for name, cache in self.xai.caches.items():
            if name not in options.models and not cache.available():
                log.info("vqa model %r has no weights yet: /info/ lists no vqa task until they appear", name)
            elif not cache.available():
                log.warning("model %r has no weights yet: /info/ lists no tasks until its .json/.pt appear", name)

    def init_datastore(self) -> Datastore:
        return VersionedLocalDatastore(self.studies)

    def init_infers(self) -> dict[str, InferTask]:
        tasks: dict[str, InferTask] = {}
        for config in self.task_configs:
            tasks.update(config.infer())
        return tasks

    def init_strategies(self) -> dict[str, Strategy]:
        # least_sure first: MONAI Label's Slicer plugin preselects the first strategy /info/ lists.
        return {"least_sure": LeastSure(self.xai.models, self.xai.options.state_dir, settings=self.xai.settings),
                "random": Random()}

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers = [t for t in (c.trainer() for c in self.task_configs) if t is not None]
        return {"seg_head_finetune": trainers[0]} if trainers else {}

    def info(self) -> dict[str, Any]:
        meta = super().info()
        card = self.xai.models.card()
        models = {}
        for name, cache in self.xai.caches.items():
            if name not in self.xai.options.models and not cache.available():
                continue  # the vqa model is listed once its weights are there, as its task is
            c = cache.card()
            versions = cache.versions().summary(cache.own_card())
            models[name] = {"kind": cache.kind(), **{k: c.get(k) for k in ("version", "classes", "weights_sha256")},
                            "default": name == self.xai.options.model,
                            # Published fine-tunes: which serves (POST /xai/models/{model}/activate) and
                            # the chain from the release to it.
                            "active_version": versions["active_version"],
                            "display_name": versions["active_display_name"],
                            "lineage": versions["lineage"], "published_versions": len(versions["versions"]),
                            "tasks": sorted(t for t, task in self._infers.items()
                                            if getattr(task, "model_name", None) == name)}
        default = models.get(self.xai.options.model, {})
        meta["xai"] = {"model": {**{k: card.get(k) for k in ("name", "version", "classes", "weights_sha256")},
                                 **{k: default.get(k) for k in ("active_version", "display_name", "lineage")}},
                       "models": models,
                       "device": str(self.xai.models.device), "auth": bool(self.xai.options.token),
                       "max_upload_mb": round(self.xai.options.max_upload_bytes / 2**20, 3)}
        return meta

"""MONAI Label app: explanations of the ``brain-lesion-3d`` model (``xai_core``) over HTTP.

MONAI Label loads this file and instantiates the one class whose *direct* base is
``MONAILabelApp``; keep it that way (an intermediate base class breaks discovery).

``--conf`` keys (all optional): ``model`` (default ``brain-lesion-3d``), ``device`` (``auto``,
``cpu``, ``cuda:0``; default ``XAI_DEVICE``), ``token`` (default ``XAI_TOKEN``), ``max_upload_mb``
(default ``XAI_MAX_UPLOAD_MB``), ``results_dir``, ``results_keep``, ``jobs_keep``.
"""

from __future__ import annotations

import logging
from typing import Any

from lib.configs import BrainLesionConfig
from lib.datastore import VersionedLocalDatastore
from lib.options import AppOptions
from lib.runtime import XAIRuntime
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

import xai_core
from xai_core.settings import get_settings

log = logging.getLogger("xai.app")


class XAIApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        # The runtime exists before MONAI Label's constructor, which calls init_datastore/init_infers.
        self.xai = XAIRuntime(AppOptions.from_conf(conf, studies))
        self.task_config = BrainLesionConfig()
        self.task_config.init("brain_lesion", str(get_settings().user_weights_dir), conf, None, runtime=self.xai)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="xai-brain-lesion",
                         description="Explanations (Grad-CAM, Grad-CAM++, Score-CAM, ...) of a 3-D brain "
                                     "lesion classifier, saliency masks, and corrected-label fine-tuning",
                         version=xai_core.__version__)
        self.xai.bind(self.infer)
        if not self.xai.models.available():
            log.warning("model %r has no weights yet: /info/ lists no tasks until its .json/.pt appear",
                        self.xai.options.model)

    def init_datastore(self) -> Datastore:
        return VersionedLocalDatastore(self.studies)

    def init_infers(self) -> dict[str, InferTask]:
        return self.task_config.infer()

    def init_trainers(self) -> dict[str, TrainTask]:
        trainer = self.task_config.trainer()
        return {"seg_head_finetune": trainer} if trainer else {}

    def info(self) -> dict[str, Any]:
        meta = super().info()
        card = self.xai.models.card()
        meta["xai"] = {"model": {k: card.get(k) for k in ("name", "version", "classes", "weights_sha256")},
                       "device": str(self.xai.models.device), "auth": bool(self.xai.options.token),
                       "max_upload_mb": round(self.xai.options.max_upload_bytes / 2**20, 3)}
        return meta

"""Common base of the app's infer tasks: MONAI Label's request path around ``xai_core``.

:class:`XAIInferTask` keeps :class:`~monailabel.tasks.infer.basic_infer.BasicInferTask`'s
``__call__`` (request merging, latencies, label names in the JSON) and replaces its stages:

* pre-transform: read the image with ``xai_core.io.read_image`` (NIfTI, NRRD, DICOM series; keeps
  the geometry exactly and rejects bad images with a clear message),
* inferer: the task's :meth:`compute`, under ``torch.enable_grad`` because ``BasicInferTask``
  runs its inferer under ``torch.no_grad`` and gradient-based explainers need the graph,
* writer: the task's own files (written by ``xai_core``; MONAI Label's writer would resample).

The model is the runtime's cached adapter of the task's model (``runtime.cache(model)``); the
network argument of ``BasicInferTask`` stays None.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from xai_core.explain import parse_target
from xai_core.io import read_image

from ..errors import BadInput
from ..jobs import IMAGE_ID_KEY, PROGRESS_KEY, WANTS_FILE_KEY
from ..runtime import XAIRuntime

IMAGE_KEY = "xai_image"
RESULT_FILE_KEY = "xai_result_file"
RESULT_JSON_KEY = "xai_result_json"

Progress = Callable[[str, float], None]


def _no_progress(stage: str, fraction: float) -> None:
    return None


class ReadImage:
    """Pre-transform: ``data["image"]`` (a path) -> ``data[IMAGE_KEY]`` (an ``xai_core.io.Image``)."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        path = data.get("image")
        if not isinstance(path, str) or not path:
            raise BadInput("no image: give a datastore image id (image=...) or upload a file")
        # An upload (no datastore id) is a client's file: read it under the untrusted rules and the
        # shared memory budget. Datastore images passed those checks when they were stored.
        data[IMAGE_KEY] = read_image(path, untrusted=data.get(IMAGE_ID_KEY) is None)
        return data


class XAIInferTask(BasicInferTask):
    """An infer task whose work is :meth:`compute`; subclasses set ``data[RESULT_JSON_KEY]`` and
    optionally ``data[RESULT_FILE_KEY]`` (the one file of the HTTP response)."""

    def __init__(self, runtime: XAIRuntime, name: str, type: InferType | str, labels: Any, description: str,
                 config: dict[str, Any] | None = None, model: str | None = None):
        super().__init__(path=None, network=None, type=type, labels=labels, dimension=3,
                         description=description, config=config)
        self.runtime = runtime
        self.name = name
        self.model_name = model or runtime.options.model

    @property
    def cache(self):
        """The :class:`~lib.models.ModelCache` of this task's model."""
        return self.runtime.cache(self.model_name)

    def is_valid(self) -> bool:
        # MONAI Label lists only valid tasks in /info/: without weights there is nothing to serve.
        return self.cache.available()

    def pre_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        return [ReadImage()]

    def post_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        return []

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda"):
        # The device is the runtime's (XAI_DEVICE / --conf device), not MONAI Label's per-request one:
        # one model instance serves every request.
        with torch.enable_grad():
            self.compute(data, self.progress(data))
        return data

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[Any, Any]:
        return data.get(RESULT_FILE_KEY), data[RESULT_JSON_KEY]

    def check_params(self, params: dict[str, Any]) -> None:
        """Reject bad parameters before any work is queued (the HTTP layer calls this)."""
        classes = self.cache.card().get("classes")
        if classes and "target" in params:
            parse_target(params["target"], classes)

    # -- for subclasses ---------------------------------------------------------------------------

    def compute(self, data: dict[str, Any], progress: Progress) -> None:
        raise NotImplementedError

    @staticmethod
    def progress(data: dict[str, Any]) -> Progress:
        fn = data.get(PROGRESS_KEY)
        return fn if callable(fn) else _no_progress

    def base_json(self, data: dict[str, Any], result_id: str) -> dict[str, Any]:
        """Fields every result starts with: task, image id, result id (:meth:`finish` adds the artifact URLs)."""
        return {"task": self.name, "image_id": data.get(IMAGE_ID_KEY), "result_id": result_id}

    def finish(self, data: dict[str, Any], result_id: str, result: dict[str, Any],
               response_file: str | None) -> None:
        """Store ``result`` (with its artifact URLs) as ``result.json`` and hand it, and a copy of the
        artifact ``response_file`` when the reply carries a file, to MONAI Label's writer stage."""
        result["artifacts"] = self.runtime.results.urls(result_id)
        self.runtime.results.write_json(result_id, result)
        data[RESULT_JSON_KEY] = result
        if response_file and data.get(WANTS_FILE_KEY, True):
            data[RESULT_FILE_KEY] = self.runtime.results.outgoing_copy(
                result_id, response_file, f"{self.name}_{result_id}.nii.gz")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t

"""Per-process runtime of the app: options, model, results, the model worker and jobs.

It hangs off the app instance (``app_instance().xai``), the one object that both MONAI Label's
code and the HTTP wrapper reach.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from xai_core.ask import OVERLAY_SOURCE, draw_overlay
from xai_core.registration import RegistrationCache
from xai_core.settings import Settings

from . import provenance
from .jobs import InferFn, JobManager
from .models import ModelCache
from .options import AppOptions
from .results import Drawn, ResultStore


class XAIRuntime:
    def __init__(self, options: AppOptions):
        self.options = options
        self.settings = Settings()  # mask bounds, levels, threads: one object for this process
        self.caches = {name: ModelCache(name, options.device, self.settings) for name in options.served_models}
        self.models = self.caches[options.model]  # the default model
        # A vqa result's overlay is drawn when a client downloads it (the Slicer module never does).
        self.results = ResultStore(options.results_dir, options.results_keep,
                                   drawn={"overlay.png": Drawn(OVERLAY_SOURCE, draw_overlay)})
        self.registrations = RegistrationCache(keep=16)
        _sweep_stale_uploads(options.state_dir / "uploads")
        # One thread does all model work: torch keeps the cores busy on its own, and CAM hooks on
        # the shared network must not interleave. Threads (not processes) suffice for a responsive
        # event loop because torch, SimpleITK and scipy spend the time outside the GIL.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xai-worker")
        self.jobs = JobManager(self.worker, keep=options.jobs_keep)
        _configure_torch(self.models.device, self.settings)

    def cache(self, model: str) -> ModelCache:
        """The cache of a served model (KeyError names the served ones)."""
        try:
            return self.caches[model]
        except KeyError:
            raise KeyError(f"model {model!r} is not served; served: {sorted(self.caches)}") from None

    def label_provenance(self, client_params: dict[str, Any], image_id: str, *, user: str | None = None,
                         auth: bool = False) -> dict[str, Any]:
        """The info a label is stored with, stamped from the result the client names
        (:func:`lib.provenance.stamp`)."""
        rid = client_params.get("result_id")
        result = self.results.read_json(rid) if isinstance(rid, str) and rid else None
        return provenance.stamp(client_params, image_id=image_id, result=result, user=user, auth=auth)

    def dicom_source(self, image_id: str | None) -> Path | None:
        """The DICOM series folder a datastore study was converted from, when ``xai serve`` kept it."""
        if not image_id:
            return None
        folder = self.options.dicom_dir / image_id
        # The id passed the id guard; the check keeps a crafted id from leaving the folder all the same.
        if folder.resolve().parent != self.options.dicom_dir.resolve() or not folder.is_dir():
            return None
        return folder

    def label_as_seg(self, image_id: str, data: bytes, name: str, info: dict[str, Any]) -> Path:
        """A stored label (its verified bytes and info) as a DICOM SEG on its study's source series,
        coded from the label's provenance and the findings of the result it corrects."""
        import tempfile

        import SimpleITK as sitk

        from xai_core.export_dicom import export_label
        from xai_core.io import Image

        from .errors import BadInput, NotFound

        series = self.dicom_source(image_id)
        if series is None:
            raise NotFound(f"image {image_id!r} did not come from a DICOM series: there is no series to "
                           "reference (SEG export needs the study's DICOM source)")
        result = self.results.read_json(info["result_id"]) if info.get("result_id") else None
        findings = (result or {}).get("findings") or {}
        suffix = ".nii.gz" if name.endswith(".gz") else "".join(Path(name).suffixes)
        out_dir = Path(tempfile.mkdtemp(dir=self.options.state_dir, prefix="seg-"))
        src = out_dir / f"label{suffix}"
        src.write_bytes(data)
        label = Image.from_sitk(sitk.ReadImage(str(src)))
        if not label.array.any():
            raise BadInput(f"label of image {image_id!r} is empty: a DICOM SEG needs at least one segment")
        return export_label(
            label, series, out_dir / "label.seg.dcm", label_class=(info.get("targets") or ["none"])[0],
            method=info.get("method") or "manual", model=info.get("model_name") or self.options.model,
            model_version=info.get("model_version") or "unknown",
            weights_sha256=info.get("model_weights_sha256") or "",
            structure=(findings.get("location") or {}).get("top_structure"),
            corrected=info.get("source") == "corrected_saliency",
            parameters={k: str(info[k]) for k in ("result_id", "saved_at", "version") if info.get(k) is not None})

    def bind(self, infer: InferFn) -> None:
        """Give the job manager the app's ``infer`` (MONAI Label's request path)."""
        self.jobs.infer = infer

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the model worker thread."""
        return self.worker.submit(fn, *args)


def _sweep_stale_uploads(folder: Path, max_age_s: float = 3600.0) -> None:
    """Delete uploads a crash or a dropped request left behind. Only old ones: a training subprocess
    builds a runtime too, while the server may be receiving an upload this very moment."""
    if not folder.is_dir():
        return
    stale = time.time() - max_age_s
    for p in folder.iterdir():
        with contextlib.suppress(OSError):
            if p.is_file() and p.stat().st_mtime < stale:
                p.unlink()


def _configure_torch(device: torch.device, s: Settings) -> None:
    # By default the model leaves one core to the event loop: torch's threads spin between parallel
    # regions, and with every core busy /info/ would wait for the scheduler.
    torch.set_num_threads(s.num_threads or max(1, (os.cpu_count() or 1) - 1))
    if device.type == "cuda":
        # Full float32 on the GPU: TF32 convolutions keep 10 mantissa bits, enough to reorder
        # near-equal saliency voxels around the mask thresholds (see docs/server.md).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

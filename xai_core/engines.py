"""Engines that run one pure function, :func:`explain_study`, over a cohort: locally or on Ray.

``explain_study(row, settings, task=...) -> rows`` explains one study with every method of the task
and returns plain rows (dicts): localisation metrics against the study's mask, faithfulness curves,
sanity cascades and example slices where the task asks for them, or the explanation files
(``explain-batch``). It reads only its arguments and the files they name, and keeps no state but a
per-process model cache, so any engine can call it anywhere:

* :func:`run_local` (the default): a loop in this process, one model.
* :func:`run_ray`: a pool of Ray actors (:class:`StudyWorker`), each loading the model once and
  explaining the studies the pool hands it; results come back in input order. Each actor asks for
  ``Settings.ray_cpus_per_worker`` CPUs and, when the cluster has GPUs, ``Settings.ray_gpus_per_worker``
  GPUs (the model then runs on CUDA through ``Settings.device = 'auto'``). Without ``address`` a
  local Ray instance is started (127.0.0.1, no dashboard) and shut down afterwards; with
  ``address`` (``ray start --head`` printed it) the cluster's workers do the work, and the study files
  must be at the same paths on every node (a shared file system).

Both engines give identical numbers: the same function runs on the same inputs, and the torch
thread count of each worker is set from ``Settings.num_threads`` (default: the worker's CPUs), the
only thing that could change the order of float sums on a CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .settings import Settings

__all__ = ["Task", "find_studies", "explain_study", "run", "run_local", "run_ray", "StudyWorker", "ENGINES",
           "load_model_cached", "tables"]

ENGINES = ("local", "ray")
Progress = Callable[[int, int], None]


@dataclass
class Task:
    """What :func:`explain_study` does with each study (picklable: it travels to the workers).

    Attributes:
        methods: registered explanation methods.
        model: model name (``xai_core.models.load``).
        method_kwargs: explainer parameters per method.
        target: ``"label"`` explains the study's true class (evaluation; the predicted class for a
            study without a lesion); anything else goes to :func:`~xai_core.explain.parse_target`
            (None: the predicted class).
        localisation: Dice, IoU, AUPRC and the pointing game against the study's mask.
        tolerance_mm: pointing-game tolerance (default: one model-grid voxel).
        faithfulness: deletion curves of every map (``curves``).
        curves: which of :data:`xai_core.faithfulness.CURVES`.
        sanity_ids: studies that also get the randomisation cascade of every method.
        example_ids: studies whose image, map and mask slice come back for the overlay grid.
        out_dir: write each explanation's files to ``out_dir/<study_id>/<method>/`` (explain-batch).
    """

    methods: list[str]
    model: str = "brain-lesion-3d"
    method_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    target: Any = "label"
    localisation: bool = True
    tolerance_mm: float | None = None
    faithfulness: bool = True
    curves: tuple[str, ...] = ("deletion_morf", "deletion_lerf")
    sanity_ids: tuple[str, ...] = ()
    example_ids: tuple[str, ...] = ()
    out_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def find_studies(folder: str | Path) -> list[dict[str, Any]]:
    """Rows (``study_id``, ``image``) for a folder: its ``manifest.csv`` when it has one (generated
    studies, with labels and masks), else every image file and every sub-folder (a DICOM series),
    sorted by name. The study id is the name without its image suffix."""
    folder = Path(folder)
    if (folder / "manifest.csv").is_file():
        from .data.brain import read_manifest

        return read_manifest(folder)
    rows = []
    for p in sorted(folder.iterdir()):
        name = p.name.lower()
        suffix = next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)
        if p.is_dir() and not name.startswith("."):
            rows.append({"study_id": p.name, "image": str(p), "format": "dicom"})
        elif p.is_file() and suffix:
            rows.append({"study_id": p.name[: -len(suffix)], "image": str(p), "format": suffix.strip(".")})
    return rows


_MODELS: dict[tuple, Any] = {}


def load_model_cached(name: str, settings: Settings) -> Any:
    """One loaded model per (name, weights folders, device) in this process."""
    from .models import load

    key = (name, str(settings.weights_dir), str(settings.user_weights_dir), settings.device)
    if key not in _MODELS:
        _MODELS[key] = load(name, settings=settings)
    return _MODELS[key]


def _read_mask(path: str | None):
    if not path or not Path(path).is_file():
        return None
    from .evaluate import read_mask

    return read_mask(path).array.astype(bool)


def _grid_map(model: Any, exp: Any, inputs: Any) -> np.ndarray:
    """The displayed map (input grid) on the model grid, where the faithfulness curves perturb: the
    map as the user sees it, whatever the method's own resolution."""
    grid = getattr(model, "grid", None)
    if grid is None:
        raise ValueError(f"faithfulness needs a model grid; a {model.kind} model has none")
    arr, _ = grid.to_model(exp.primary)
    return arr


def _example_slice(exp: Any, truth: np.ndarray | None) -> dict[str, Any]:
    """The axial (k) plane through the lesion's centre (or the map's peak): image, map and mask,
    float32 / bool 2-D arrays, with the pixel aspect ratio."""
    sal = exp.primary.array
    if truth is not None and truth.any():
        k = int(round(float(np.nonzero(truth)[0].mean())))
    else:
        k = int(np.unravel_index(int(np.argmax(sal)), sal.shape)[0])
    sx, sy, _ = exp.image.spacing
    return {"k": k, "image": exp.image.array[k].astype(np.float32), "saliency": sal[k].astype(np.float32),
            "truth": None if truth is None else truth[k].copy(), "mask": exp.mask.mask[k].copy(),
            "aspect": float(sy / sx)}


def explain_study(row: dict[str, Any], settings: Settings | None = None, *, task: Task, model: Any = None
                  ) -> list[dict[str, Any]]:
    """Explain one study with every method of ``task``; the rows of every table it asks for.

    Args:
        row: a manifest row (``study_id``, ``image``; ``label`` and ``mask`` for scoring, ``format``).
        settings: everything tunable (default ``Settings()``).
        task: what to compute (:class:`Task`).
        model: a loaded adapter (default: loaded once per process, :func:`load_model_cached`).

    Returns:
        dicts with ``table`` one of ``cases`` (one per method: prediction, localisation, faithfulness
        summary, seconds), ``curves`` (one per method and curve: fractions and scores), ``sanity`` (one
        per method on the task's sanity studies) and ``examples`` (slices for the overlay grid).
    """
    from .faithfulness import faithfulness
    from .io import read_image
    from .metrics import auprc, dice, iou, pointing_game
    from .pipeline import explain, write_explanation

    cfg = settings or Settings()
    model = model if model is not None else load_model_cached(task.model, cfg)
    image = read_image(row["image"])
    label = row.get("label")
    truth = _read_mask(row.get("mask")) if label not in (None, "", "none") else None
    if task.target == "label":
        target = label if label not in (None, "", "none") else None
    else:
        target = task.target
    tol = model.card.grid_spacing_mm if task.tolerance_mm is None else task.tolerance_mm
    sid = row.get("study_id") or Path(row["image"]).name
    out: list[dict[str, Any]] = []
    inputs = model.prepare(image) if task.faithfulness else None
    for method in task.methods:
        kwargs = task.method_kwargs.get(method)
        exp = explain(image, method, target=target, model=model, method_kwargs=kwargs, settings=cfg)
        t_index = model.classes.index(exp.targets[0])
        rec: dict[str, Any] = {
            "table": "cases", "study_id": sid, "label": label or "", "format": row.get("format", ""),
            "method": method, "target": exp.targets[0], "predicted": exp.prediction.label,
            "p_target": float(exp.prediction.probabilities[t_index]),
            "mask_empty": bool(exp.mask.empty), "mask_voxels": int(exp.mask.mask.sum()),
            "seconds": float(sum(exp.timings.values())),
        }
        if task.localisation and truth is not None:
            sal = exp.primary.array
            rec.update(dice=dice(exp.mask.mask, truth), iou=iou(exp.mask.mask, truth),
                       auprc=auprc(sal, truth, within=exp.foreground),
                       pointing_game=float(pointing_game(sal, truth, spacing=image.spacing[::-1], tolerance_mm=tol)))
        if task.faithfulness:
            res = faithfulness(model, inputs, _grid_map(model, exp, inputs), t_index, settings=cfg,
                               curves=task.curves)
            rec.update(res.summary())
            rec["faithfulness_seconds"] = res.seconds
            for c in res.curves.values():
                out.append({"table": "curves", "study_id": sid, "method": method, "curve": c.name,
                            "fractions": list(c.fractions), "scores": list(c.scores)})
        if task.out_dir:
            files = write_explanation(exp, Path(task.out_dir) / sid / method)
            rec["files"] = str(Path(task.out_dir) / sid / method)
            rec["n_files"] = len(files)
        out.append(rec)
        if sid in task.example_ids:
            out.append({"table": "examples", "study_id": sid, "method": method, "label": label or "",
                        "target": exp.targets[0], **_example_slice(exp, truth)})
        if sid in task.sanity_ids:
            from .sanity import cascade

            s = cascade(model, image, method, target=t_index, settings=cfg, method_kwargs=kwargs, study_id=sid)
            out.append({"table": "sanity", **s.to_dict()})
    return out


# ----------------------------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------------------------


def _set_threads(settings: Settings, default: int | None = None) -> None:
    import torch

    n = settings.num_threads or default
    if n:
        torch.set_num_threads(int(n))


def run_local(rows: Sequence[dict[str, Any]], task: Task, settings: Settings | None = None, *,
              model: Any = None, progress: Progress | None = None) -> list[dict[str, Any]]:
    """:func:`explain_study` over ``rows`` in this process, in order; all rows of all studies."""
    cfg = settings or Settings()
    _set_threads(cfg)
    model = model if model is not None else load_model_cached(task.model, cfg)
    out: list[dict[str, Any]] = []
    for n, row in enumerate(rows):
        out.extend(explain_study(row, cfg, task=task, model=model))
        if progress:
            progress(n + 1, len(rows))
    return out


class StudyWorker:
    """A Ray actor's body: one model, loaded once, explaining the studies it is handed."""

    def __init__(self, settings: Settings, task: Task, threads: int):
        _set_threads(settings, threads)
        self.settings, self.task = settings, task
        self.model = load_model_cached(task.model, settings)

    def run(self, row: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
        t = time.perf_counter()
        return explain_study(row, self.settings, task=self.task, model=self.model), time.perf_counter() - t

    def device(self) -> str:
        return str(self.model.device)


def run_ray(rows: Sequence[dict[str, Any]], task: Task, settings: Settings | None = None, *,
            address: str | None = None, workers: int | None = None, progress: Progress | None = None,
            stats: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """:func:`explain_study` over ``rows`` on a pool of Ray actors; rows come back in input order.

    Args:
        address: a running cluster (``ray start --head`` prints it, e.g. ``10.0.0.1:6379``; ``auto``
            finds a local one). None starts a local instance with ``workers x ray_cpus_per_worker`` CPUs
            on 127.0.0.1 and shuts it down at the end. An instance that is already initialised in this
            process (``ray.init`` by the caller) is used as it is and left running.
        workers: actors, one model each (default: one per GPU when the cluster has GPUs, else one per
            ``ray_cpus_per_worker`` CPUs of the cluster).
        stats: filled with the number of workers, their devices, and the wall time.
    """
    import os

    import ray
    from ray.util import ActorPool

    cfg = settings or Settings()
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            n_cpu = (workers or max(1, int((os.cpu_count() or 1) // cfg.ray_cpus_per_worker))) * cfg.ray_cpus_per_worker
            ray.init(num_cpus=max(1, int(np.ceil(n_cpu))), include_dashboard=False, log_to_driver=False,
                     object_store_memory=256 * 1024 * 1024, _node_ip_address="127.0.0.1")
        started = True
    actors = []
    try:
        res = ray.cluster_resources()
        gpus = float(res.get("GPU", 0.0))
        opts: dict[str, Any] = {"num_cpus": cfg.ray_cpus_per_worker}
        if gpus > 0:
            opts["num_gpus"] = cfg.ray_gpus_per_worker
            n = workers or max(1, int(gpus // cfg.ray_gpus_per_worker))
        else:
            n = workers or max(1, int(float(res.get("CPU", 1.0)) // cfg.ray_cpus_per_worker))
        threads = max(1, int(cfg.ray_cpus_per_worker))
        remote = ray.remote(StudyWorker)
        actors = [remote.options(**opts).remote(cfg, task, threads) for _ in range(n)]
        devices = ray.get([a.device.remote() for a in actors])
        t = time.perf_counter()
        pool = ActorPool(actors)
        out: list[dict[str, Any]] = []
        busy = []
        for i, (rows_i, sec) in enumerate(pool.map(lambda a, r: a.run.remote(r), list(rows))):
            out.extend(rows_i)
            busy.append(sec)
            if progress:
                progress(i + 1, len(rows))
        if stats is not None:
            stats.update(workers=n, devices=devices, wall_s=time.perf_counter() - t, study_s=busy,
                         gpus_per_worker=opts.get("num_gpus", 0), cpus_per_worker=cfg.ray_cpus_per_worker)
        return out
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()


def run(rows: Sequence[dict[str, Any]], task: Task, settings: Settings | None = None, *, engine: str = "local",
        address: str | None = None, workers: int | None = None, progress: Progress | None = None,
        stats: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run ``task`` over ``rows`` on ``engine`` (``local`` or ``ray``)."""
    if engine == "local":
        t = time.perf_counter()
        out = run_local(rows, task, settings, progress=progress)
        if stats is not None:
            stats.update(workers=1, wall_s=time.perf_counter() - t)
        return out
    if engine == "ray":
        return run_ray(rows, task, settings, address=address, workers=workers, progress=progress, stats=stats)
    raise ValueError(f"unknown engine {engine!r}; choose from {ENGINES}")


def tables(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by their ``table`` key (the key itself dropped)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["table"], []).append({k: v for k, v in r.items() if k != "table"})
    return out

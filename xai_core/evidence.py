"""Evidence-based regularisation (EBR): patch-weight maps of similar past cases as a prior.

Radiologists compare a study with similar cases they have seen. MedLIME does the same for its
surrogate: the library holds, for each training case, a feature vector and a patch-weight map on
the LIME units; at explain time the ``k`` nearest *abnormal* cases (label other than ``none``) by
cosine distance give the Nadaraya-Watson estimate

    w_NW = sum_i K_i m_i / sum_i K_i,    K_i = exp(-d_i^2 / (2 h^2)),   d_i = 1 - cos(f, f_i)

over those ``k`` cases (the weights sum to 1 and fall with the distance), which the surrogate is
pulled towards (``lambda2 |w - alpha w_NW|^2``, :func:`xai_core.explain.lime.fit_surrogate`; the
scale ``alpha >= 0`` is fitted to the samples, because maps of other cases are in other units).
``h`` is the bandwidth; by default the median of the ``k`` distances (adaptive: the kernel neither
collapses on the nearest case nor flattens to a plain mean when all cases are close).

Features: the MAE encoder's mean token with every cube visible (:meth:`xai_core.mae.MAE3D.embed`),
so the library needs nothing of the explained model but its inputs (MedLIME's black-box setting).
Maps (``--maps``):

* ``lesion`` (default): the lesion fraction of each unit from the case's ground-truth mask on the
  model grid (where the evidence of that past case was; exact and cheap);
* ``lime``: the case's plain-LIME weights for its own label (``--samples`` samples; costly).

Each map is scaled to a maximum of 1. Built by ``xai evidence build --model NAME --data DIR --out
FILE`` (one ``.npz``); the server loads it once at start (``--conf evidence FILE``) and every MedLIME
explanation of that process uses it (:func:`set_default_library`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["EvidenceLibrary", "Neighbours", "nadaraya_watson", "build_library", "load_library",
           "set_default_library", "default_library"]


@dataclass
class Neighbours:
    """The cases that made ``w_NW``: ids, labels, cosine distances, kernel weights (sum 1), bandwidth."""

    case_ids: list[str]
    labels: list[str]
    distances: np.ndarray
    weights: np.ndarray
    bandwidth: float
    w_nw: np.ndarray  # (n_units,)
    mode: str = "knn"

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "bandwidth": round(float(self.bandwidth), 6),
                "cases": [{"case": c, "label": lab, "distance": round(float(d), 6), "weight": round(float(w), 6)}
                          for c, lab, d, w in zip(self.case_ids, self.labels, self.distances, self.weights,
                                                  strict=True)]}


def nadaraya_watson(distances: np.ndarray, bandwidth: float | None = None) -> tuple[np.ndarray, float]:
    """Gaussian kernel weights ``(k,)`` (summing to 1) for ``distances (k,)`` and the bandwidth used
    (``None``: the median distance; a zero median falls back to 1e-6)."""
    d = np.asarray(distances, np.float64)
    h = float(np.median(d)) if bandwidth is None else float(bandwidth)
    h = max(h, 1e-6)
    logk = -(d ** 2) / (2 * h * h)
    k = np.exp(logk - logk.max())  # shifted: the weights are the same, and never all underflow to 0
    return k / k.sum(), h


@dataclass
class EvidenceLibrary:
    """Feature vectors ``(n, F)`` and unit maps ``(n, n_units)`` of past cases, with their ids and labels.

    ``patch`` and ``grid`` name the LIME units the maps are on (the model grid cut in cubes of ``patch``).
    """

    features: np.ndarray
    maps: np.ndarray
    case_ids: list[str]
    labels: list[str]
    patch: int
    grid: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, np.float32)
        self.maps = np.asarray(self.maps, np.float32)
        n = len(self.case_ids)
        if self.features.shape[0] != n or self.maps.shape[0] != n or len(self.labels) != n:
            raise ValueError("features, maps, case ids and labels must have one row per case")
        norms = np.linalg.norm(self.features, axis=1, keepdims=True)
        self._unit = self.features / np.maximum(norms, 1e-12)

    def __len__(self) -> int:
        return len(self.case_ids)

    def cosine_distances(self, f: np.ndarray) -> np.ndarray:
        """``1 - cos(f, f_i)`` for every case ``(n,)``."""
        f = np.asarray(f, np.float32).ravel()
        return 1.0 - self._unit @ (f / max(float(np.linalg.norm(f)), 1e-12))

    def neighbours(self, f: np.ndarray, k: int = 5, bandwidth: float | None = None, *, mode: str = "knn",
                   exclude: str | None = None, seed: int = 0) -> Neighbours:
        """The ``k`` nearest abnormal cases to feature ``f`` and their Nadaraya-Watson map.

        ``mode="random"`` draws ``k`` abnormal cases at random instead (the ablation "EBR with random
        neighbours"), weighted by the same kernel. ``exclude``: a case id left out (the case itself).
        """
        pool = np.array([i for i, (c, lab) in enumerate(zip(self.case_ids, self.labels, strict=True))
                         if lab != "none" and c != exclude])
        if pool.size == 0:
            raise ValueError("the evidence library holds no abnormal case")
        d = self.cosine_distances(f)[pool]
        k = min(int(k), pool.size)
        if mode == "knn":
            sel = np.argsort(d, kind="stable")[:k]
        elif mode == "random":
            sel = np.random.default_rng(seed).choice(pool.size, size=k, replace=False)
        else:
            raise ValueError(f"mode must be 'knn' or 'random', got {mode!r}")
        w, h = nadaraya_watson(d[sel], bandwidth)
        idx = pool[sel]
        return Neighbours(case_ids=[self.case_ids[i] for i in idx], labels=[self.labels[i] for i in idx],
                          distances=d[sel], weights=w, bandwidth=h, w_nw=(w[:, None] * self.maps[idx]).sum(0),
                          mode=mode)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "case_ids": self.case_ids, "labels": self.labels, "patch": self.patch,
                "grid": list(self.grid)}
        with open(path, "wb") as fh:  # a file object: numpy would add ".npz" to a name without it
            np.savez_compressed(fh, features=self.features, maps=self.maps, meta=np.array(json.dumps(meta)))
        return path

    @classmethod
    def read(cls, path: str | Path) -> EvidenceLibrary:
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return cls(features=z["features"], maps=z["maps"], case_ids=list(meta.pop("case_ids")),
                       labels=list(meta.pop("labels")), patch=int(meta.pop("patch")),
                       grid=tuple(int(g) for g in meta.pop("grid")), meta=meta, path=str(path))


_CACHE: dict[str, EvidenceLibrary] = {}
_DEFAULT: dict[str, EvidenceLibrary | None] = {"library": None}


def load_library(path: str | Path) -> EvidenceLibrary:
    """The library at ``path``, read once per process (later calls return the same object)."""
    key = str(Path(path).resolve())
    if key not in _CACHE:
        if not Path(path).exists():
            raise FileNotFoundError(f"no evidence library at {path} (build one: xai evidence build ...)")
        _CACHE[key] = EvidenceLibrary.read(path)
    return _CACHE[key]


def set_default_library(path: str | Path | None) -> EvidenceLibrary | None:
    """Load ``path`` now and make it the library MedLIME uses when none is given (None: no default)."""
    _DEFAULT["library"] = load_library(path) if path else None
    return _DEFAULT["library"]


def default_library() -> EvidenceLibrary | None:
    return _DEFAULT["library"]


def build_library(model: Any, data: str | Path, out: str | Path, *, patch: int = 8, maps: str = "lesion",
                  samples: int = 256, limit: int | None = None, mae: Any = None,
                  progress: Callable[[int, int], None] | None = None, command: str = "") -> EvidenceLibrary:
    """Features and unit maps of the studies in ``data`` (a folder with ``manifest.csv``) for ``model``.

    Args:
        model: a volume-classifier adapter (its ``prepare`` gives the model-grid input; with
            ``maps="lime"`` its forward function is explained).
        maps: ``lesion`` (ground-truth lesion fraction per unit) or ``lime`` (plain-LIME weights).
        samples: LIME samples per case (``maps="lime"``).
        mae: the MAE whose encoder gives the features (default: the shipped one).
    """
    from .data.brain import read_manifest
    from .explain.lime import patch_units
    from .io import read_image
    from .mae import load_mae

    if maps not in ("lesion", "lime"):
        raise ValueError(f"maps must be 'lesion' or 'lime', got {maps!r}")
    mae = mae if mae is not None else load_mae(device=model.device)
    rows = read_manifest(data)[:limit]
    feats, unit_maps, ids, labels = [], [], [], []
    t0 = time.time()
    for n, row in enumerate(rows):
        inputs = model.prepare(read_image(row["image"]))
        x = inputs.tensor
        feats.append(mae.embed(x)[0].cpu().numpy())
        units = patch_units(x.shape[2:], patch)  # every unit: maps of different cases must align
        if maps == "lesion":
            if row["label"] == "none" or not row.get("mask"):
                m = np.zeros(units.n_units, np.float32)
            else:
                lesion = model.grid.to_model(read_image(row["mask"]), interpolator="linear")[0] > 0.5
                m = units.unit_means(torch.from_numpy(lesion.astype(np.float32))).numpy()
        else:
            from .explain.lime import LIME

            target = model.classes.index(row["label"])
            att = LIME(model.forward_func(), patch=patch, n_samples=samples).attribute(x, target=target)
            w = att.raw[0][0, 0, 0]
            m = units.unit_means(w.cpu()).numpy()
        peak = float(np.abs(m).max())
        unit_maps.append((m / peak if peak > 0 else m).astype(np.float32))
        ids.append(row["study_id"])
        labels.append(row["label"])
        if progress is not None:
            progress(n + 1, len(rows))
    card = model.card
    lib = EvidenceLibrary(features=np.stack(feats), maps=np.stack(unit_maps), case_ids=ids, labels=labels,
                          patch=patch, grid=tuple(units.grid),
                          meta={"features": "mae-3d encoder mean token", "maps": maps, "samples": samples,
                                "data": str(data), "model": {"name": card.name, "version": card.version,
                                                             "weights_sha256": card.weights_sha256},
                                "mae": getattr(mae, "card", None), "seconds": round(time.time() - t0, 1),
                                "command": command})
    lib.save(out)
    lib.path = str(out)
    return lib

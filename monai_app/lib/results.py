"""Where the parts of one result live: ``<results_dir>/<result_id>/<file>``.

One HTTP response carries one file, so every inference writes all its artifacts here and returns
their URLs (``/xai/results/<result_id>/<file>``) in its JSON. Results are a cache, not records:
the oldest are pruned beyond ``keep`` (labels, which are records, live in the datastore).

Some artifacts are drawn only when a client downloads them (:class:`Drawn`; the vqa overlay PNG): the
result keeps their source, its URL is listed with the others, and the first download draws the file
(:meth:`ResultStore.draw`), which later downloads then read like any other.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_ID = re.compile(r"^[0-9a-f]{32}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}\.(nii\.gz|json|md|dcm|png)$")
URL_PREFIX = "/xai/results"

log = logging.getLogger("xai.results")


def artifact_name(file_name: str) -> str:
    """``saliency.nii.gz`` -> ``saliency``, ``mask.seg.dcm`` -> ``mask_seg``, ``saliency.pm.dcm`` -> ``saliency_pm``."""
    parts = file_name.split(".")
    return "_".join(parts[:2]) if file_name.endswith(".dcm") and len(parts) > 2 else parts[0]


@dataclass(frozen=True)
class Drawn:
    """An artifact drawn on its first download from a file the result keeps.

    Attributes:
        source: the file in the result folder it is drawn from; a result without it has no such artifact.
        draw: ``draw(folder)`` writes the artifact into the folder and returns its path (None when the
            folder cannot draw it); raises ValueError when the source is damaged.
    """

    source: str
    draw: Callable[[Path], Path | None]


class Undrawable(LookupError):
    """A drawn artifact whose source the result keeps but cannot be drawn from (a damaged file). A
    LookupError: the web layer catches it by that name, since the app's modules load as ``lib.*``
    under MONAI Label and as ``monai_app.lib.*`` in tests (two classes of one name)."""


class ResultStore:
    def __init__(self, root: Path, keep: int = 200, drawn: Mapping[str, Drawn] | None = None):
        """``drawn``: artifact file name (``overlay.png``) -> how it is drawn on its first download."""
        self.root = Path(root)
        self.keep = max(1, int(keep))
        self.drawn = dict(drawn or {})
        self.outgoing = self.root / ".outgoing"  # response copies, deleted once sent
        self._lock = threading.Lock()
        # Its own lock, not _lock: a draw takes a while and must not hold up create() on the model worker.
        self._draw_lock = threading.Lock()

    def create(self) -> tuple[str, Path]:
        """A new, empty result folder: ``(result_id, path)``."""
        rid = uuid.uuid4().hex
        path = self.root / rid
        path.mkdir(parents=True)
        self._prune()
        return rid, path

    def path(self, result_id: str, name: str) -> Path | None:
        """The file ``name`` of result ``result_id``; None when either is malformed or missing."""
        if not RESULT_ID.match(result_id) or not FILE_NAME.match(name):
            return None
        p = self.root / result_id / name
        return p if p.is_file() else None

    def draw(self, result_id: str, name: str) -> Path | None:
        """The drawn artifact ``name`` of result ``result_id`` (:class:`Drawn`), drawn now unless it
        already is; None when the ids are malformed, the artifact is not drawn, or the result lacks its
        source (pruned, or another kind of result). Raises :class:`Undrawable` when the source is damaged:
        the result stays as it is (a cache entry; a new request makes a new one)."""
        spec = self.drawn.get(name)
        if spec is None or not RESULT_ID.match(result_id):
            return None
        folder = self.root / result_id
        # One draw at a time: two downloads of one overlay draw it once; the second reads the file.
        with self._draw_lock:
            done = self.path(result_id, name)
            if done is not None or not (folder / spec.source).is_file():
                return done
            try:
                return spec.draw(folder)
            except FileNotFoundError:  # pruned while it was drawn
                return None
            except ValueError as e:
                log.warning("result %s: %s cannot be drawn: %s", result_id, name, e)
                raise Undrawable(f"{name} of result {result_id!r} cannot be drawn: {e}") from e

    def urls(self, result_id: str) -> dict[str, str]:
        """``{artifact name: URL}`` for every file of the result (name = file name without suffix),
        drawn artifacts whose source the result keeps included."""
        folder = self.root / result_id
        out = {}
        for p in sorted(folder.iterdir()):
            if FILE_NAME.match(p.name):
                out[artifact_name(p.name)] = f"{URL_PREFIX}/{result_id}/{p.name}"
        for name, spec in self.drawn.items():
            if (folder / spec.source).is_file():
                out.setdefault(artifact_name(name), f"{URL_PREFIX}/{result_id}/{name}")
        out.setdefault("result", f"{URL_PREFIX}/{result_id}/result.json")
        return out

    def write_json(self, result_id: str, data: dict[str, Any]) -> Path:
        path = self.root / result_id / "result.json"
        tmp = path.with_name(f".result.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)  # a download never sees half a file
        return path

    def read_json(self, result_id: str) -> dict[str, Any] | None:
        p = self.path(result_id, "result.json")
        if p is None:
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def outgoing_copy(self, result_id: str, name: str, as_name: str) -> str:
        """A copy of an artifact for the HTTP response, which MONAI Label deletes after sending it."""
        self.outgoing.mkdir(parents=True, exist_ok=True)
        dest = self.outgoing / as_name
        shutil.copyfile(self.root / result_id / name, dest)
        return str(dest)

    def _prune(self) -> None:
        with self._lock:
            # A response copy outlives its request only when the client went away before it was sent.
            if self.outgoing.is_dir():
                stale = time.time() - 3600
                for p in self.outgoing.iterdir():
                    if p.stat().st_mtime < stale:
                        p.unlink(missing_ok=True)
            dirs = [p for p in self.root.iterdir() if p.is_dir() and RESULT_ID.match(p.name)]
            if len(dirs) <= self.keep:
                return
            dirs.sort(key=lambda p: p.stat().st_mtime)
            for old in dirs[:len(dirs) - self.keep]:
                shutil.rmtree(old, ignore_errors=True)

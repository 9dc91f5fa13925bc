"""Where the parts of one result live: ``<results_dir>/<result_id>/<file>``.

One HTTP response carries one file, so every inference writes all its artifacts here and returns
their URLs (``/xai/results/<result_id>/<file>``) in its JSON. Results are a cache, not records:
the oldest are pruned beyond ``keep`` (labels, which are records, live in the datastore).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

RESULT_ID = re.compile(r"^[0-9a-f]{32}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}\.(nii\.gz|json|md|dcm|png)$")
URL_PREFIX = "/xai/results"


def artifact_name(file_name: str) -> str:
    """``saliency.nii.gz`` -> ``saliency``, ``mask.seg.dcm`` -> ``mask_seg``, ``saliency.pm.dcm`` -> ``saliency_pm``."""
    parts = file_name.split(".")
    return "_".join(parts[:2]) if file_name.endswith(".dcm") and len(parts) > 2 else parts[0]


class ResultStore:
    def __init__(self, root: Path, keep: int = 200):
        self.root = Path(root)
        self.keep = max(1, int(keep))
        self.outgoing = self.root / ".outgoing"  # response copies, deleted once sent
        self._lock = threading.Lock()

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

    def urls(self, result_id: str) -> dict[str, str]:
        """``{artifact name: URL}`` for every file of the result (name = file name without suffix)."""
        out = {}
        for p in sorted((self.root / result_id).iterdir()):
            if FILE_NAME.match(p.name):
                out[artifact_name(p.name)] = f"{URL_PREFIX}/{result_id}/{p.name}"
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

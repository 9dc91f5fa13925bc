"""MONAI Label's local datastore, made safe for concurrent clients and made to keep every label.

What changes against :class:`monailabel.datastore.local.LocalDatastore`:

* Saving a label over an existing one (same image and tag) first archives the old file and its
  info as a numbered version under ``<studies>/.xai/label_versions/<tag>/<image>/``; removing a
  label or an image archives too. Nothing a client stored is ever lost.
* One re-entrant lock serialises every method: request handlers run on the event loop and in
  thread pools at once, and the parent class mutates one shared model without a lock of its own.
* The datastore JSON is written atomically (temp file + rename): a crash mid-write would otherwise
  leave a truncated file and every label's info with it.
* No file watcher (``auto_reload``): its thread reloads the JSON behind a running save and can
  drop that save's label.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from filelock import FileLock
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from .errors import Conflict
from .options import STATE_DIR

EXTENSIONS = ("*.nii.gz", "*.nii", "*.nrrd")
VERSION_KEY = "version"


def _locked(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with self._rlock:
            return fn(self, *args, **kwargs)

    return wrapper


class VersionedLocalDatastore(LocalDatastore):
    def __init__(self, datastore_path: str):
        self._rlock = threading.RLock()
        root = Path(datastore_path)
        self._versions_root = root / STATE_DIR / "label_versions"
        self._removed_root = root / STATE_DIR / "removed"
        super().__init__(datastore_path, extensions=EXTENSIONS, auto_reload=False, read_only=False)

    # -- labels ---------------------------------------------------------------------------------

    @_locked
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"image {image_id!r} is not in the datastore")
        info = dict(label_info or {})
        previous = obj.labels.get(label_tag)
        version = 1
        if previous is not None:
            old_file = Path(self.get_label_uri(image_id, label_tag))
            version = int(previous.info.get(VERSION_KEY, 1)) + 1
            self._archive_label(image_id, label_tag, old_file, previous.info)
            _, new_ext = self._to_id(os.path.basename(label_filename))
            if old_file.exists() and not old_file.name.endswith(new_ext):
                old_file.unlink()  # a different extension would leave a second file for the same label
        info[VERSION_KEY] = version
        info["saved_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return super().save_label(image_id, label_filename, label_tag, info)

    @_locked
    def remove_label(self, label_id: str, label_tag: str) -> None:
        label = self._datastore.label(label_id, label_tag)
        if label is None:
            raise LabelNotFoundException(f"no label with tag {label_tag!r} for image {label_id!r}")
        self._archive_label(label_id, label_tag, Path(self.get_label_uri(label_id, label_tag)), label.info)
        super().remove_label(label_id, label_tag)

    def _archive_label(self, image_id: str, tag: str, path: Path, info: dict[str, Any]) -> None:
        if not path.is_file():
            return
        version = int(info.get(VERSION_KEY, 1))
        folder = self._versions_root / tag / image_id
        folder.mkdir(parents=True, exist_ok=True)
        _, ext = self._to_id(path.name)
        dest = folder / f"v{version:04d}{ext}"
        if dest.exists():  # never overwrite an archived version (e.g. two removals of version 1)
            dest = folder / f"v{version:04d}-{time.time_ns()}{ext}"
        shutil.copy2(path, dest)
        (dest.parent / (dest.name[: -len(ext)] + ".json")).write_text(
            json.dumps({**info, VERSION_KEY: version, "file": dest.name}, indent=2, default=str))

    @_locked
    def label_versions(self, image_id: str, tag: str) -> list[dict[str, Any]]:
        """Archived versions of a label, oldest first: ``[{"version", "file", "info"}]``."""
        folder = self._versions_root / tag / image_id
        out = []
        for meta in sorted(folder.glob("v*.json")) if folder.is_dir() else []:
            try:
                info = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            out.append({"version": int(info.get(VERSION_KEY, 0)), "file": info.get("file"), "info": info})
        return out

    def label_version_path(self, image_id: str, tag: str, file_name: str) -> Path | None:
        p = self._versions_root / tag / image_id / file_name
        return p if p.is_file() and p.parent == self._versions_root / tag / image_id else None

    # -- images ---------------------------------------------------------------------------------

    @_locked
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if image_id in self._datastore.objects:
            raise Conflict(f"image {image_id!r} already exists; upload under another id (nothing is overwritten)")
        _, ext = self._to_id(os.path.basename(image_filename))
        if os.path.exists(os.path.join(self._datastore.image_path(), image_id + ext)):
            raise Conflict(f"a file for image {image_id!r} already exists in the datastore folder")
        return super().add_image(image_id, image_filename, image_info)

    @_locked
    def remove_image(self, image_id: str) -> None:
        obj = self._datastore.objects.get(image_id)
        if obj:
            path = Path(self.get_image_uri(image_id))
            if path.is_file():
                self._removed_root.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, self._removed_root / f"{time.strftime('%Y%m%dT%H%M%S')}-{path.name}")
        super().remove_image(image_id)

    # -- persistence ----------------------------------------------------------------------------

    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            tmp = f"{self._datastore_config_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str))
            os.replace(tmp, self._datastore_config_path)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        with self._rlock:
            if lock:
                with FileLock(self._lock_file):
                    write()
            else:
                write()


# Every other public method reads the shared model: the same lock keeps readers off half-made changes.
for _name in ("name", "set_name", "description", "set_description", "datalist", "get_image", "get_image_uri",
              "get_image_info", "get_label", "get_label_uri", "get_labels_by_image_id", "get_label_by_image_id",
              "get_label_info", "get_labeled_images", "get_unlabeled_images", "list_images",
              "get_dataset_archive", "refresh", "update_image_info", "update_label_info", "status", "json"):
    setattr(VersionedLocalDatastore, _name, _locked(getattr(LocalDatastore, _name)))

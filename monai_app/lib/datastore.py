"""MONAI Label's local datastore, made safe for concurrent clients, crash-safe, and made to keep every label.

What changes against :class:`monailabel.datastore.local.LocalDatastore`:

* Saving a label over an existing one (same image and tag) first archives the old file and its
  info as a numbered version under ``<studies>/.xai/label_versions/<tag>/<image>/``; removing a
  label or an image archives too. Nothing a client stored is ever lost.
* Crash-safe saves. The stock ``save_label`` copies the upload over the current file in place and
  then rewrites its JSON index, so a kill -9 in between leaves a truncated label served with the
  previous version's info. Here a save (:meth:`VersionedLocalDatastore.store_label`):

  1. archives the current version (temp file, fsync, rename; its sha256 checked first),
  2. writes a *pending* record (``.xai/pending/<tag>/<image>.json``) naming the new bytes' sha256,
  3. copies the upload to a temporary file in the label folder, fsyncs it and renames it over the label,
  4. rewrites the index (temp file, fsync, ``os.replace``, fsync of the folder): the commit point,
  5. removes the pending record.

  At start-up a pending record whose sha256 is not the index's is an interrupted, unacknowledged save:
  its file (if it got renamed in) goes to ``.xai/quarantine/`` and the archived previous version is put
  back, so the current label is again the last acknowledged one.
* Every stored version (current and archived) carries its ``sha256`` in its info. Reads through
  :meth:`read_label` / :meth:`read_label_version` verify it and raise :class:`LabelIntegrityError`
  (a 500 naming the label) instead of serving other bytes. A start-up check moves any label or
  archived version whose file does not match its hash to ``.xai/quarantine/`` and logs it.
* One re-entrant lock serialises every method: request handlers run on the event loop and in
  thread pools at once, and the parent class mutates one shared model without a lock of its own.
  The stock ``FileLock`` is held across a whole save, so another process (MONAI Label's training
  subprocess opens the same datastore) never sees, or "recovers", a save in progress.
* No file watcher (``auto_reload``): its thread reloads the JSON behind a running save and can
  drop that save's label.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from .errors import Conflict, XAIError
from .options import STATE_DIR

EXTENSIONS = ("*.nii.gz", "*.nii", "*.nrrd")
VERSION_KEY = "version"
SHA_KEY = "sha256"
TMP_SUFFIX = ".tmp"  # temporary files end with this, so the datastore's *.nii.gz listing never sees them

log = logging.getLogger("xai.datastore")


class LabelIntegrityError(XAIError):
    """A stored label does not match the sha256 recorded when it was saved: it is not served.

    A server fault (500), but its detail is shown to the client (``expose_detail``): it names the
    label and says nothing about server paths."""

    http_status = 500
    expose_detail = True


@dataclass(frozen=True)
class SavedLabel:
    """What :meth:`VersionedLocalDatastore.store_label` stored, read under the datastore lock."""

    label_id: str
    tag: str
    version: int
    sha256: str
    info: dict[str, Any] = field(default_factory=dict)


def _locked(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with self._rlock:
            return fn(self, *args, **kwargs)

    return wrapper


# -- durable file primitives --------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the directory entry itself must reach the disk)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_beside(dest: Path) -> Path:
    # Same folder as the destination: os.replace is atomic only within one file system.
    return dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"


def _stage_copy(src: Path | str, dest: Path) -> tuple[Path, str]:
    """Copy ``src`` to a fsynced temporary file beside ``dest``; returns ``(temp path, sha256)``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(dest)
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            for chunk in iter(lambda: fi.read(1 << 20), b""):
                h.update(chunk)
                fo.write(chunk)
            fo.flush()
            os.fsync(fo.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, h.hexdigest()


def _commit(tmp: Path, dest: Path) -> None:
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)


def durable_copy(src: Path | str, dest: Path) -> str:
    """Copy ``src`` to ``dest`` atomically and durably (temp + fsync + rename); returns the sha256."""
    tmp, sha = _stage_copy(src, dest)
    _commit(tmp, dest)
    return sha


def durable_write_text(dest: Path, text: str) -> None:
    """Write ``text`` to ``dest`` atomically and durably."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(dest)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class VersionedLocalDatastore(LocalDatastore):
    def __init__(self, datastore_path: str):
        self._rlock = threading.RLock()
        root = Path(datastore_path)
        self._state_root = root / STATE_DIR
        self._versions_root = self._state_root / "label_versions"
        self._removed_root = self._state_root / "removed"
        self._pending_root = self._state_root / "pending"
        self._quarantine_root = self._state_root / "quarantine"
        self._started = False
        # The stock constructor loads the index and reconciles it with the files: the start-up
        # recovery and integrity check run inside that first reconcile (_reconcile_datastore).
        super().__init__(datastore_path, extensions=EXTENSIONS, auto_reload=False, read_only=False)

    # -- saving ---------------------------------------------------------------------------------

    @_locked
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """MONAI Label's interface: store a label, return its id (see :meth:`store_label`)."""
        return self.store_label(image_id, label_filename, label_tag, label_info).label_id

    @_locked
    def store_label(self, image_id: str, label_filename: str, label_tag: str,
                    label_info: dict[str, Any]) -> SavedLabel:
        """Store a label crash-safely (see the module docstring); the result is read under the lock."""
        with FileLock(self._lock_file):
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"image {image_id!r} is not in the datastore")
            _, ext = self._to_id(os.path.basename(label_filename))
            folder = Path(self._datastore.label_path(label_tag))
            folder.mkdir(parents=True, exist_ok=True)
            dest = folder / (image_id + ext)
            previous = obj.labels.get(label_tag)
            previous_record = None
            if previous is not None:
                old_file = folder / (image_id + previous.ext)
                archived = self._archive_label(image_id, label_tag, old_file, previous.info)
                previous_record = {"file": old_file.name, "ext": previous.ext, SHA_KEY: previous.info.get(SHA_KEY),
                                   "archive": archived.name if archived else None}
            version = self._next_version(image_id, label_tag, previous)
            info = {k: v for k, v in dict(label_info or {}).items() if k not in ("ts", "name")}
            tmp, sha = _stage_copy(label_filename, dest)
            info.update({VERSION_KEY: version, SHA_KEY: sha, "saved_at": _stamp(), "ts": int(time.time()),
                         "name": dest.name})
            pending = self._pending_path(label_tag, image_id)
            try:
                durable_write_text(pending, json.dumps({"image": image_id, "tag": label_tag, "version": version,
                                                        SHA_KEY: sha, "file": dest.name,
                                                        "previous": previous_record}, indent=2))
                _commit(tmp, dest)
                if previous is not None and previous.ext != ext:
                    # A different extension would leave a second file for the same label (archived above).
                    (folder / (image_id + previous.ext)).unlink(missing_ok=True)
                obj.labels[label_tag] = DataModel(info=info, ext=ext)
                self._update_datastore_file(lock=False)  # the commit point
            except BaseException:
                tmp.unlink(missing_ok=True)
                # Undo on disk and in memory: the save was not acknowledged.
                if previous is not None:
                    obj.labels[label_tag] = previous
                else:
                    obj.labels.pop(label_tag, None)
                if pending.is_file():
                    self._recover_pending(pending, committed_sha=(previous.info.get(SHA_KEY) if previous else None))
                raise
            pending.unlink(missing_ok=True)
            log.info("saved label %s/%s version %d sha256 %s", label_tag, image_id, version, sha[:12])
            return SavedLabel(image_id, label_tag, version, sha, copy.deepcopy(info))

    def _next_version(self, image_id: str, tag: str, previous: DataModel | None) -> int:
        """One more than any version seen, current or archived (numbers stay unique after a removal)."""
        seen = [int(previous.info.get(VERSION_KEY, 1))] if previous is not None else []
        folder = self._versions_root / tag / image_id
        for meta in folder.glob("v*.json") if folder.is_dir() else []:
            # Archived versions and tombstones of quarantined ones: a number is never given twice.
            try:
                seen.append(int(json.loads(meta.read_text()).get(VERSION_KEY, 0)))
            except (OSError, ValueError, TypeError):
                continue
        return max(seen, default=0) + 1

    @_locked
    def remove_label(self, label_id: str, label_tag: str) -> None:
        label = self._datastore.label(label_id, label_tag)
        if label is None:
            raise LabelNotFoundException(f"no label with tag {label_tag!r} for image {label_id!r}")
        with FileLock(self._lock_file):
            self._archive_label(label_id, label_tag, Path(self.get_label_uri(label_id, label_tag)), label.info)
        super().remove_label(label_id, label_tag)

    def _archive_label(self, image_id: str, tag: str, path: Path, info: dict[str, Any]) -> Path | None:
        """Copy the current file of a label into its versions folder (durably) before it is replaced.

        A file that does not match its recorded sha256 is not archived as a version: it goes to
        quarantine (a truncated file must not become history). Archiving the same bytes twice (a save
        interrupted after this step, then retried) reuses the existing archive."""
        if not path.is_file():
            return None
        version = int(info.get(VERSION_KEY, 1))
        actual = sha256_file(path)
        expected = info.get(SHA_KEY)
        if expected and actual != expected:
            self._quarantine(path, f"label {tag!r} of image {image_id!r} (version {version}) does not match its "
                                   f"sha256 when archived", info)
            return None
        folder = self._versions_root / tag / image_id
        folder.mkdir(parents=True, exist_ok=True)
        _, ext = self._to_id(path.name)
        dest = folder / f"v{version:04d}{ext}"
        if dest.exists():
            meta = self._meta_of(dest, ext)
            if meta.is_file() and json.loads(meta.read_text()).get(SHA_KEY) == actual and sha256_file(dest) == actual:
                return dest
            dest = folder / f"v{version:04d}-{time.time_ns()}{ext}"  # never overwrite an archived version
        durable_copy(path, dest)
        durable_write_text(self._meta_of(dest, ext), json.dumps(
            {**info, VERSION_KEY: version, SHA_KEY: actual, "file": dest.name}, indent=2, default=str))
        return dest

    @staticmethod
    def _meta_of(archived: Path, ext: str) -> Path:
        return archived.parent / (archived.name[: -len(ext)] + ".json")

    def _pending_path(self, tag: str, image_id: str) -> Path:
        return self._pending_root / tag / f"{image_id}.json"

    # -- reading, verified ----------------------------------------------------------------------

    @_locked
    def read_label(self, image_id: str, tag: str) -> tuple[bytes, str, dict[str, Any]]:
        """``(bytes, file name, info)`` of the current label, verified against its sha256.

        The bytes are read under the lock, so they are exactly the version the info describes even
        while another client saves a new one."""
        label = self._datastore.label(image_id, tag)
        if label is None:
            raise LabelNotFoundException(f"no label with tag {tag!r} for image {image_id!r}")
        path = Path(self.get_label_uri(image_id, tag))
        what = f"label {tag!r} of image {image_id!r} (version {label.info.get(VERSION_KEY, '?')})"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise LabelIntegrityError(f"{what} is listed but its file is missing") from None
        self._verify(data, label.info.get(SHA_KEY), what, path)
        return data, path.name, copy.deepcopy(label.info)

    @_locked
    def read_label_version(self, image_id: str, tag: str, file_name: str) -> tuple[bytes, dict[str, Any]]:
        """``(bytes, info)`` of an archived version (``file_name`` as listed by :meth:`label_versions`)."""
        folder = self._versions_root / tag / image_id
        path = folder / file_name
        if path.parent != folder or not path.is_file() or path.name.endswith((".json", TMP_SUFFIX)):
            raise LabelNotFoundException(f"no version {file_name!r} of label {tag!r} for image {image_id!r}")
        _, ext = self._to_id(path.name)
        meta = self._meta_of(path, ext)
        info = json.loads(meta.read_text()) if meta.is_file() else {}
        what = f"version {file_name!r} of label {tag!r} of image {image_id!r}"
        data = path.read_bytes()
        self._verify(data, info.get(SHA_KEY), what, path)
        return data, info

    @staticmethod
    def _verify(data: bytes, expected: str | None, what: str, path: Path) -> None:
        if not expected:
            raise LabelIntegrityError(f"{what} has no recorded sha256; it is not served unverified")
        actual = sha256_bytes(data)
        if actual != expected:
            log.error("integrity: %s at %s has sha256 %s, expected %s", what, path, actual, expected)
            raise LabelIntegrityError(f"{what} failed its integrity check (sha256 mismatch); it is not served. "
                                      "Restart the server to quarantine it; earlier versions stay available")

    @_locked
    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        # A copy: the caller serialises it after the lock is released, while a save may change it.
        return copy.deepcopy(super().get_label_info(label_id, label_tag))

    @_locked
    def label_versions(self, image_id: str, tag: str) -> list[dict[str, Any]]:
        """Archived versions of a label, oldest first: ``[{"version", "file", "info"}]``."""
        return self._archived(image_id, tag)

    def _archived(self, image_id: str, tag: str) -> list[dict[str, Any]]:
        folder = self._versions_root / tag / image_id
        out = []
        for meta in sorted(folder.glob("v*.json")) if folder.is_dir() else []:
            try:
                info = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            if info.get("file") and (folder / str(info["file"])).is_file():
                out.append({"version": int(info.get(VERSION_KEY, 0)), "file": info["file"], "info": info})
        return out

    # -- start-up recovery and integrity check --------------------------------------------------

    def _reconcile_datastore(self) -> None:
        if self._started:
            super()._reconcile_datastore()
            self._adopt_unhashed()
            return
        self._started = True
        # The constructor has just loaded the index (FileLock does not nest: no reload in here).
        with FileLock(self._lock_file):
            for pending in sorted(self._pending_root.glob("*/*.json")) if self._pending_root.is_dir() else []:
                self._recover_pending(pending)
            self._remove_stale_temp_files()
        super()._reconcile_datastore()
        problems = self.check_integrity()
        if problems:
            log.error("datastore integrity check: %d problem(s), quarantined under %s:\n  %s", len(problems),
                      self._quarantine_root, "\n  ".join(problems))
        else:
            log.info("datastore integrity check: every label and archived version matches its sha256")

    def _recover_pending(self, pending: Path, committed_sha: str | None | bool = False) -> str:
        """Finish or undo a save that was interrupted (``pending`` is its record); returns what was done.

        ``committed_sha``: the sha256 the index holds for the label (read from the index when not given)."""
        try:
            rec = json.loads(pending.read_text())
        except (OSError, ValueError):
            pending.unlink(missing_ok=True)  # written atomically, so never half-made; unreadable = nothing to do
            return "unreadable record removed"
        image_id, tag, sha = rec["image"], rec["tag"], rec[SHA_KEY]
        if committed_sha is False:
            label = self._datastore.label(image_id, tag)
            committed_sha = label.info.get(SHA_KEY) if label is not None else None
        what = f"label {tag!r} of image {image_id!r}"
        if committed_sha == sha:
            outcome = f"{what} version {rec['version']}: the save had committed"
        else:
            folder = Path(self._datastore.label_path(tag))
            dest = folder / rec["file"]
            outcome = f"{what}: the interrupted save of version {rec['version']} never replaced the current file"
            if dest.is_file() and sha256_file(dest) == sha:
                self._quarantine(dest, f"unacknowledged save of {what} version {rec['version']} interrupted "
                                       "before its index update", rec)
                outcome = f"{what}: the interrupted save of version {rec['version']} was undone (file quarantined)"
                prev = rec.get("previous")
                if prev and prev.get("archive"):
                    archived = self._versions_root / tag / image_id / prev["archive"]
                    if archived.is_file() and sha256_file(archived) == prev.get(SHA_KEY):
                        durable_copy(archived, folder / prev["file"])
                        outcome += "; the last acknowledged version was restored from its archive"
        pending.unlink(missing_ok=True)
        log.warning("recovery: %s", outcome)
        return outcome

    def _remove_stale_temp_files(self) -> None:
        """Temporary files of writes a crash interrupted (never renamed in, so never part of the store)."""
        roots = [Path(self._datastore.label_path(None)), self._versions_root, self._pending_root,
                 Path(self._datastore_path)]
        for root in roots:
            if not root.is_dir():
                continue
            walk = root.glob(f".*{TMP_SUFFIX}") if root == Path(self._datastore_path) else root.rglob(f".*{TMP_SUFFIX}")
            for tmp in walk:
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)

    @_locked
    def check_integrity(self) -> list[str]:
        """Hash every current label and archived version; quarantine mismatches. Returns the problems.

        Labels without a recorded sha256 (added by hand to the labels folder, or saved before hashes
        were kept) get one now: from here on they are verified too."""
        problems: list[str] = []
        with FileLock(self._lock_file):
            changed = False
            for image_id, obj in self._datastore.objects.items():
                for tag, label in list(obj.labels.items()):
                    path = Path(self._datastore.label_path(tag)) / (image_id + label.ext)
                    if not path.is_file():
                        continue
                    actual = sha256_file(path)
                    expected = label.info.get(SHA_KEY)
                    if not expected:
                        label.info[SHA_KEY] = actual
                        label.info.setdefault(VERSION_KEY, 1)
                        changed = True
                        log.info("integrity: label %r of image %r had no sha256; recorded it", tag, image_id)
                    elif actual != expected:
                        msg = (f"label {tag!r} of image {image_id!r} (version {label.info.get(VERSION_KEY, '?')}) "
                               f"does not match its sha256")
                        moved = self._quarantine(path, msg, label.info)
                        version = int(label.info.get(VERSION_KEY, 1))
                        # A tombstone keeps the version number taken (the next save gets a new one).
                        durable_write_text(self._versions_root / tag / image_id / f"v{version:04d}-quarantined.json",
                                           json.dumps({**label.info, VERSION_KEY: version, "file": None,
                                                       "quarantined": moved.name}, indent=2, default=str))
                        del obj.labels[tag]
                        changed = True
                        problems.append(msg)
            if self._versions_root.is_dir():
                for meta in sorted(self._versions_root.glob("*/*/v*.json")):
                    problem = self._check_archived(meta)
                    if problem:
                        problems.append(problem)
            if changed:
                self._update_datastore_file(lock=False)
        return problems

    def _check_archived(self, meta: Path) -> str | None:
        tag, image_id = meta.parent.parent.name, meta.parent.name
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        path = meta.parent / str(info.get("file", ""))
        if not info.get("file") or not path.is_file():
            return None
        actual = sha256_file(path)
        if not info.get(SHA_KEY):
            durable_write_text(meta, json.dumps({**info, SHA_KEY: actual}, indent=2, default=str))
            return None
        if actual == info[SHA_KEY]:
            return None
        msg = f"archived version {path.name!r} of label {tag!r} of image {image_id!r} does not match its sha256"
        self._quarantine(path, msg, info)
        meta.replace(self._quarantine_root / f"{path.name}.{uuid.uuid4().hex[:8]}.version.json")
        return msg

    def _adopt_unhashed(self) -> None:
        """Give labels that a reconcile just found on disk a sha256 (so reads can verify them)."""
        changed = False
        for image_id, obj in self._datastore.objects.items():
            for tag, label in obj.labels.items():
                if not label.info.get(SHA_KEY):
                    path = Path(self._datastore.label_path(tag)) / (image_id + label.ext)
                    if path.is_file():
                        label.info[SHA_KEY] = sha256_file(path)
                        label.info.setdefault(VERSION_KEY, 1)
                        changed = True
        if changed:
            self._update_datastore_file()

    def _quarantine(self, path: Path, reason: str, info: dict[str, Any] | None = None) -> Path:
        """Move ``path`` out of the store into ``.xai/quarantine/`` with a note saying why; logs it."""
        self._quarantine_root.mkdir(parents=True, exist_ok=True)
        dest = self._quarantine_root / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}-{path.name}"
        os.replace(path, dest)
        durable_write_text(dest.with_name(dest.name + ".json"),
                           json.dumps({"reason": reason, "original": str(path), "info": info or {},
                                       "quarantined_at": _stamp()}, indent=2, default=str))
        _fsync_dir(path.parent)
        log.error("quarantined: %s -> %s", reason, dest)
        return dest

    # -- images ---------------------------------------------------------------------------------

    @_locked
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if image_id in self._datastore.objects:
            raise Conflict(f"image {image_id!r} already exists; upload under another id (nothing is overwritten)")
        _, ext = self._to_id(os.path.basename(image_filename))
        dest = Path(self._datastore.image_path()) / (image_id + ext)
        if dest.exists():
            raise Conflict(f"a file for image {image_id!r} already exists in the datastore folder")
        # Durable copy, then the index: a crash leaves either no file or a complete one.
        with FileLock(self._lock_file):
            durable_copy(image_filename, dest)
            info = dict(image_info or {})
            info.update(ts=int(time.time()), name=dest.name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        return image_id

    @_locked
    def remove_image(self, image_id: str) -> None:
        obj = self._datastore.objects.get(image_id)
        if obj:
            path = Path(self.get_image_uri(image_id))
            if path.is_file():
                self._removed_root.mkdir(parents=True, exist_ok=True)
                durable_copy(path, self._removed_root / f"{time.strftime('%Y%m%dT%H%M%S')}-{path.name}")
        super().remove_image(image_id)

    # -- persistence ----------------------------------------------------------------------------

    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            durable_write_text(Path(self._datastore_config_path),
                               json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str))
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
              "get_labeled_images", "get_unlabeled_images", "list_images",
              "get_dataset_archive", "refresh", "update_image_info", "update_label_info", "status", "json"):
    setattr(VersionedLocalDatastore, _name, _locked(getattr(LocalDatastore, _name)))


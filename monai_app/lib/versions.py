"""Published fine-tuned versions of a model, the active one, and their lineage.

Layout, under the user weights folder (never the shipped one)::

    versions/<model>/<version>.pt      weights (state dict)
    versions/<model>/<version>.json    model card: name, version, training (base, lineage, labels,
                                       validation before/after, settings)
    versions/<model>/active.json       {"active": <version> | null, "history": [...]}

A version is named by lineage: the shipped model's release plus ``+ftN``, with ``N`` one more than
the highest fine-tune published on that release (``brain-lesion-3d@1.3.0+ft2``). A fine-tune of a
fine-tune is ``+ft3``, never ``+ft2+ft3``; its card names its parent, so the chain back to the
release is in :meth:`VersionStore.lineage`. ``active`` null means the model's own weights (user
folder first, then the shipped folder: ``xai_core.models.load``).

Activation is a pointer change, written atomically: the server's :class:`lib.models.ModelCache`
reads the pointer on every request and loads the new weights on the next one, while a request
already running keeps the model object it started with. ``history`` holds the earlier pointers,
so a rollback returns to the version active before the last switch.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from xai_core.models import ModelAdapter, ModelCard, load_card_file, sha256

VERSIONS_DIR = "versions"
POINTER = "active.json"
# What a published version is called: the release, then +ftN (N >= 1). Anything else is refused as
# a version name, which also keeps path separators and dots-only names out of file names.
VERSION_RE = re.compile(r"^(?P<release>[0-9A-Za-z][0-9A-Za-z.\-]*)\+ft(?P<n>[1-9][0-9]*)$")
HISTORY_KEEP = 50


class VersionError(ValueError):
    """A version that is not published, a bad name, nothing to roll back to."""


def release_of(version: str) -> str:
    """The shipped release a version descends from: ``1.3.0+ft2`` -> ``1.3.0``, ``1.3.0`` -> ``1.3.0``."""
    return version.split("+", 1)[0]


def display_name(model: str, version: str) -> str:
    """``brain-lesion-3d@1.3.0+ft2``: how /info/ and the cards name a version."""
    return f"{model}@{version}"


def _atomic_write(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class VersionStore:
    """The published versions of one model in ``<user_weights_dir>/versions/<model>/``."""

    # One lock per folder across the instances of a process: the HTTP routes and a sync train run
    # may build their own stores.
    _locks: dict[str, threading.Lock] = {}

    def __init__(self, user_weights_dir: Path | str, model: str):
        self.model = model
        self.root = Path(user_weights_dir) / VERSIONS_DIR / model
        self._lock = self._locks.setdefault(str(self.root.resolve()), threading.Lock())

    # -- files ------------------------------------------------------------------------------------

    def files(self, version: str) -> tuple[Path, Path] | None:
        """``(card, weights)`` of a published version, or None."""
        if not VERSION_RE.match(version or ""):
            return None
        card, pt = self.root / f"{version}.json", self.root / f"{version}.pt"
        return (card, pt) if card.is_file() and pt.is_file() else None

    def card(self, version: str) -> dict[str, Any]:
        files = self.files(version)
        if files is None:
            raise VersionError(f"{display_name(self.model, version)} is not a published version; published: "
                               f"{self.versions() or 'none'}")
        return json.loads(files[0].read_text())

    def versions(self) -> list[str]:
        """Published versions, oldest first (by release, then fine-tune number)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.glob("*.json"):
            m = VERSION_RE.match(p.stem)
            if m and p.with_suffix(".pt").is_file():
                found.append((m["release"], int(m["n"]), p.stem))
        return [v for *_, v in sorted(found)]

    def next_version(self, parent_version: str) -> str:
        """The name the next fine-tune of ``parent_version`` gets: its release + ``ft<max + 1>``."""
        release = release_of(parent_version)
        taken = [int(m["n"]) for v in self.versions() if (m := VERSION_RE.match(v)) and m["release"] == release]
        return f"{release}+ft{max(taken, default=0) + 1}"

    def publish(self, net: torch.nn.Module, parent: ModelCard, training: dict[str, Any],
                metrics: dict[str, Any]) -> ModelCard:
        """Write the weights of ``net`` and their card as the next version after ``parent``; returns
        the card. The weights go first and the card last, each atomically: a version exists only
        once its card does, and a crash leaves at most an orphan ``.pt`` that nothing lists."""
        with self._lock:
            version = self.next_version(parent.version)
            self.root.mkdir(parents=True, exist_ok=True)
            pt = self.root / f"{version}.pt"
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{version}.", suffix=".pt.tmp")
            os.close(fd)
            try:
                torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
                os.replace(tmp, pt)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            parent_ref = {"name": parent.name, "version": parent.version, "weights_sha256": parent.weights_sha256,
                          "display_name": display_name(parent.name, parent.version)}
            card = parent.model_copy(deep=True, update={
                "version": version,
                "weights_sha256": sha256(pt),
                "training": {**training, "parent": parent_ref, "release": release_of(version),
                             "display_name": display_name(parent.name, version),
                             "published_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                # The parent's figures describe other weights: the card keeps only what was measured
                # on these (validation before/after) and names the parent's for reference.
                "metrics": {**metrics, "parent_metrics": parent.metrics},
            })
            _atomic_write(self.root / f"{version}.json", card.model_dump_json(indent=2).encode())
            return card

    def load(self, version: str, device: str | torch.device | None = None) -> ModelAdapter:
        """The adapter of a published version, its weights checked against the card's sha256."""
        files = self.files(version)
        if files is None:
            raise VersionError(f"{display_name(self.model, version)} is not a published version")
        card, pt = files
        expected = json.loads(card.read_text()).get("weights_sha256")
        if expected and sha256(pt) != expected:
            raise VersionError(f"weights of {display_name(self.model, version)} fail their sha256 check")
        return load_card_file(card, device=device)

    # -- the active pointer -----------------------------------------------------------------------

    @property
    def pointer_path(self) -> Path:
        return self.root / POINTER

    def pointer(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.pointer_path.read_text())
        except (OSError, ValueError):
            return {"active": None, "history": []}
        return {"active": doc.get("active"), "history": list(doc.get("history") or []),
                "changed_at": doc.get("changed_at")}

    def active(self) -> str | None:
        """The active published version, or None for the model's own weights."""
        return self.pointer()["active"]

    def active_files(self) -> tuple[Path, Path] | None:
        """``(card, weights)`` of the active version; None when the model's own weights are active
        (or the active version's files are gone: the model's own weights serve then)."""
        active = self.active()
        return self.files(active) if active else None

    def _write_pointer(self, active: str | None, history: list[Any]) -> dict[str, Any]:
        doc = {"active": active, "history": history[-HISTORY_KEEP:],
               "changed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _atomic_write(self.pointer_path, json.dumps(doc, indent=2).encode())
        return doc

    def activate(self, version: str | None) -> dict[str, Any]:
        """Make ``version`` (a published one, or None for the model's own weights) active; returns
        the new pointer. The previous one goes onto the history for :meth:`rollback`."""
        if version is not None and self.files(version) is None:
            raise VersionError(f"{display_name(self.model, version)} is not a published version; published: "
                               f"{self.versions() or 'none'}")
        with self._lock:
            doc = self.pointer()
            if doc["active"] == version:
                return doc
            return self._write_pointer(version, [*doc["history"], doc["active"]])

    def rollback(self) -> dict[str, Any]:
        """Return to the version that was active before the last switch."""
        with self._lock:
            doc = self.pointer()
            history = doc["history"]
            # Skip entries whose files have gone: rolling back onto missing weights would serve the
            # model's own weights under another name.
            while history:
                previous = history.pop()
                if previous is None or self.files(previous) is not None:
                    return self._write_pointer(previous, history)
            raise VersionError(f"nothing to roll back to: {self.model} has no earlier active version")

    # -- lineage ----------------------------------------------------------------------------------

    def lineage(self, version: str | None, own_card: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The chain from the release to ``version``, oldest first: ``[{"version", "display_name",
        "weights_sha256", "validation"?}, ...]``. ``own_card`` is the model's own card (the release)."""
        chain: list[dict[str, Any]] = []
        seen: set[str] = set()
        current = version
        while current and current not in seen and self.files(current) is not None:
            seen.add(current)
            card = self.card(current)
            training = card.get("training") or {}
            chain.append({"version": current, "display_name": display_name(self.model, current),
                          "weights_sha256": card.get("weights_sha256"),
                          "validation": (card.get("metrics") or {}).get("validation")})
            current = (training.get("parent") or {}).get("version")
        root = current if current else (own_card or {}).get("version")
        if root:
            sha = (own_card or {}).get("weights_sha256") if (own_card or {}).get("version") == root else None
            chain.append({"version": root, "display_name": display_name(self.model, root), "weights_sha256": sha})
        return chain[::-1]

    def summary(self, own_card: dict[str, Any] | None = None) -> dict[str, Any]:
        """What /info/ and ``GET /xai/models/{model}/versions`` show."""
        doc = self.pointer()
        active = doc["active"] if doc["active"] and self.files(doc["active"]) else None
        own_version = (own_card or {}).get("version")
        version = active or own_version
        out = []
        for v in self.versions():
            card = self.card(v)
            training = card.get("training") or {}
            out.append({"version": v, "display_name": display_name(self.model, v),
                        "parent": (training.get("parent") or {}).get("version"),
                        "published_at": training.get("published_at"),
                        "weights_sha256": card.get("weights_sha256"),
                        "validation": (card.get("metrics") or {}).get("validation"),
                        "active": v == active})
        return {"active_version": version,
                "active_display_name": display_name(self.model, version) if version else None,
                "active_is_published_version": active is not None, "own_version": own_version,
                "lineage": self.lineage(active, own_card),
                "versions": out, "can_roll_back": bool(doc["history"]), "changed_at": doc.get("changed_at")}

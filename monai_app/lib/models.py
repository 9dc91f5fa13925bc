"""The served model, loaded once and reloaded when its weights change on disk.

Weights may appear or be replaced while the server runs (the shipped weights land later, a
published fine-tune is activated), so every request reads the active-version pointer and checks
the card and weight files' modification times, and reloads when they changed. A request already
running keeps the model object it started with: a switch takes effect from the next request.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from xai_core.models import ModelAdapter, load_card_file
from xai_core.settings import Settings, resolve_device

from .errors import Unavailable
from .versions import VersionStore


def weights_dirs(settings: Settings) -> list[Path]:
    """Search order of ``xai_core.models.load``: user (fine-tuned) weights first, then the shipped ones."""
    return [Path(settings.user_weights_dir), Path(settings.weights_dir)]


class ModelCache:
    """Thread-safe holder of one loaded :class:`~xai_core.models.ModelAdapter`.

    The weight folders come from ``settings`` (default ``Settings()``), read once here: ``/info/``
    asks every cache for its files, and building settings from the environment per call cost
    ~80 ms a request.
    """

    def __init__(self, name: str, device: str, settings: Settings | None = None):
        self.name = name
        self.device = resolve_device(device)
        self._dirs = weights_dirs(settings or Settings())
        self._lock = threading.Lock()
        self._model: ModelAdapter | None = None
        self._stamp: tuple[Any, ...] | None = None

    def versions(self) -> VersionStore:
        """The published fine-tuned versions of this model (``lib.versions``)."""
        return VersionStore(self._dirs[0], self.name)

    def own_files(self) -> tuple[Path, Path] | None:
        """``(card, weights)`` of the model's own weights (user folder, then shipped), ignoring any
        active published version."""
        for d in self._dirs:
            card = d / f"{self.name}.json"
            if card.is_file() and card.with_suffix(".pt").is_file():
                return card, card.with_suffix(".pt")
        return None

    def files(self) -> tuple[Path, Path] | None:
        """``(card, weights)`` that serve: the active published version when one is activated
        (``POST /xai/models/{model}/activate``), else the model's own; None when the model is missing."""
        active = self.versions().active_files()
        return active if active is not None else self.own_files()

    def own_card(self) -> dict[str, Any]:
        """The card of the model's own weights (the release a lineage starts from); empty when missing."""
        files = self.own_files()
        try:
            return json.loads(files[0].read_text()) if files else {}
        except (OSError, ValueError):
            return {}

    def available(self) -> bool:
        return self.files() is not None

    def card(self) -> dict[str, Any]:
        """The model card (cheap: no weights are read); empty when the model is missing."""
        files = self.files()
        if files is None:
            return {}
        try:
            return json.loads(files[0].read_text())
        except (OSError, ValueError):
            return {}

    def kind(self) -> str:
        """The card's model kind (``volume-classifier`` for cards written before kinds existed)."""
        return str(self.card().get("kind") or "volume-classifier")

    def get(self) -> ModelAdapter:
        """The loaded model, (re)loading it when its files changed."""
        files = self.files()
        if files is None:
            raise Unavailable(f"model {self.name!r} is not available: no {self.name}.json/.pt in "
                              f"{', '.join(str(d) for d in self._dirs)}")
        card, pt = files
        stamp = (str(card), card.stat().st_mtime_ns, pt.stat().st_mtime_ns, pt.stat().st_size)
        with self._lock:
            if self._model is None or stamp != self._stamp:
                # Load into locals first: a failed reload keeps nothing half-updated.
                model = load_card_file(card, device=self.device)
                self._model, self._stamp = model, stamp
            return self._model

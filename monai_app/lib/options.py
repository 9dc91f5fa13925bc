"""App options: MONAI Label ``--conf KEY VALUE`` pairs over ``xai_core`` settings (env ``XAI_*``).

Every option has one source of truth: the conf value when given, else the setting (so ``XAI_TOKEN``
and ``--conf token ...`` both work), else the default here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from xai_core.settings import Settings

# Server state that is not a study lives in this hidden folder of the datastore, which MONAI Label's
# local datastore does not list (it lists top-level image files only).
STATE_DIR = ".xai"


@dataclass(frozen=True)
class AppOptions:
    """Resolved options of one server process.

    Attributes:
        models: model names served (``xai_core.models.load``), the default first.
        device: ``auto``, ``cpu`` or ``cuda:N``.
        token: bearer token every route requires; empty disables auth.
        max_upload_bytes: largest request body accepted (413 above).
        studies: datastore folder.
        results_dir: where explanation artifacts are kept (``/xai/results``).
        results_keep: how many results are kept before the oldest are pruned.
        jobs_keep: how many finished jobs are remembered.
        vqa_model: the visual-question-answering model behind the ``vqa`` task (``--conf vqa_model``,
            default ``brain-vqa``; ``none`` turns it off). It need not be in ``models``: its task is
            listed in ``/info/`` only while its weights exist, which may be after the server started.
    """

    models: tuple[str, ...]
    device: str
    token: str
    max_upload_bytes: int
    studies: Path
    results_dir: Path
    results_keep: int
    jobs_keep: int
    vqa_model: str = ""

    @property
    def model(self) -> str:
        """The default model: its tasks keep their plain names."""
        return self.models[0]

    @property
    def served_models(self) -> tuple[str, ...]:
        """``models`` and the vqa model (when it is not one of them already)."""
        extra = (self.vqa_model,) if self.vqa_model and self.vqa_model not in self.models else ()
        return (*self.models, *extra)

    @property
    def state_dir(self) -> Path:
        return self.studies / STATE_DIR

    @property
    def dicom_dir(self) -> Path:
        """``<id>/``: the DICOM series a study was converted from (``xai serve`` keeps it), for SEG and
        Parametric Map output."""
        return self.state_dir / "dicom"

    @classmethod
    def from_conf(cls, conf: Mapping[str, str] | None, studies: str | Path) -> AppOptions:
        conf = dict(conf or {})
        s = Settings()
        studies = Path(studies)
        max_mb = float(conf.get("max_upload_mb", s.max_upload_mb))
        if max_mb <= 0:
            raise ValueError(f"max_upload_mb must be positive, got {max_mb}")
        # ``--conf models a,b`` serves several; ``--conf model a`` (or nothing) one.
        names = [m.strip() for m in str(conf.get("models", conf.get("model", "brain-lesion-3d"))).split(",")]
        models = tuple(dict.fromkeys(m for m in names if m))
        if not models:
            raise ValueError("--conf models names no model")
        vqa_model = str(conf.get("vqa_model", "brain-vqa")).strip()
        if vqa_model.lower() in ("none", "off", "false", "0"):
            vqa_model = ""
        return cls(
            models=models,
            device=conf.get("device", s.device),
            token=conf.get("token", s.token) or "",
            max_upload_bytes=int(max_mb * 1024 * 1024),
            studies=studies,
            results_dir=Path(conf.get("results_dir", studies / STATE_DIR / "results")),
            results_keep=int(conf.get("results_keep", 200)),
            jobs_keep=int(conf.get("jobs_keep", 500)),
            vqa_model=vqa_model,
        )

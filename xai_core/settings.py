"""The one home of configuration.

Every tunable of the system lives in :class:`Settings`. Values come from (highest first) keyword
arguments, environment variables prefixed ``XAI_`` (for example ``XAI_DEVICE=cpu``) and the defaults
below. The CLI, the MONAI Label app (``--conf`` values are passed as keyword arguments) and the tests
all build their settings through :func:`get_settings`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="XAI_", extra="ignore")

    device: str = Field("auto", description="'auto' picks CUDA when present, else the CPU; or 'cpu', 'cuda:0'")
    num_threads: int = Field(0, description="torch CPU threads; 0 leaves torch's default")

    # Model grid: every model input is resampled to this axis-aligned grid (LPS, mm), centred on the
    # physical centre of the input volume.
    model_grid_size: int = Field(64, description="voxels per side of the cubic model grid")
    model_grid_spacing_mm: float = Field(3.0, description="isotropic spacing of the model grid, mm")

    # Safety limits for untrusted input.
    max_voxels: int = Field(512**3, description="largest volume accepted, in voxels")

    weights_dir: Path = Field(REPO_ROOT / "xai_core" / "models" / "weights",
                              description="shipped, read-only model weights and cards")
    user_weights_dir: Path = Field(REPO_ROOT / "runs" / "weights",
                                   description="fine-tuned weights are written here, never over shipped ones")
    samples_dir: Path = Field(REPO_ROOT / "data" / "samples", description="sample studies for the server")

    # Saliency masks.
    mask_levels_percent: tuple[float, ...] = Field((1.0, 5.0, 10.0, 20.0),
                                                   description="top-k%% of brain voxels per saliency level")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings from the environment (cached)."""
    return Settings()


def resolve_device(spec: str | None = None):
    """Torch device for ``spec`` ('auto' -> CUDA when available, else CPU)."""
    import torch

    spec = spec or get_settings().device
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)

"""Task configs (MONAI Label ``TaskConfig``): which infer and train tasks the app offers, per model kind."""

from .volume_classifier import VolumeClassifierConfig, task_name, wire_name
from .vqa import VQAConfig

# Config class per model kind (the card's ``kind``).
CONFIGS = {"volume-classifier": VolumeClassifierConfig, "vqa": VQAConfig}

__all__ = ["CONFIGS", "VQAConfig", "VolumeClassifierConfig", "task_name", "wire_name"]

"""Task configs (MONAI Label ``TaskConfig``): which infer and train tasks the app offers."""

from .brain_lesion import BrainLesionConfig, wire_name

__all__ = ["BrainLesionConfig", "wire_name"]

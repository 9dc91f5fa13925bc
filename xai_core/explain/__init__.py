"""Explainers: ``get_explainer(name)(model, **kwargs).attribute(x, target)``.

Registered here: ``gradcam``, ``gradcam++``, ``scorecam``. See :mod:`xai_core.explain.base` for the
target, layer and flat-map rules.
"""

from __future__ import annotations

from .base import (
    Attribution,
    CAMExplainer,
    Explainer,
    available_methods,
    get_explainer,
    register,
    resolve_targets,
    select_output,
)
from .gradcam import GradCAM, GradCAMPlusPlus
from .scorecam import ScoreCAM

__all__ = [
    "Attribution",
    "CAMExplainer",
    "Explainer",
    "GradCAM",
    "GradCAMPlusPlus",
    "ScoreCAM",
    "available_methods",
    "get_explainer",
    "register",
    "resolve_targets",
    "select_output",
]

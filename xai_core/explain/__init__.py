"""Explainers: ``get_explainer(name)(module_or_forward_func, **params).attribute(inputs, target=...)``.

Registered here: ``gradcam``, ``gradcam++``, ``scorecam`` (the CAM family, on a module's layer);
``ig`` (integrated gradients on the voxels, any differentiable function) and ``relig`` (layer
integrated gradients at an early layer with noise tunnelling, :mod:`.integrated_gradients`);
``lime`` (LIME on fixed cubes, :mod:`.lime`) and ``medlime`` (with generative masking, test-time
adaptation and evidence from similar cases, :mod:`.medlime`); a forward function is enough for both.
The contract (inputs, targets, raw signed attributions, display view, progress and cancel) is in
:mod:`xai_core.explain.base`; the one target parser in :mod:`xai_core.explain.targets`.
"""

from __future__ import annotations

from .base import (
    Attribution,
    AttributionCancelled,
    CAMExplainer,
    Explainer,
    available_methods,
    display_view,
    get_explainer,
    register,
    select_output,
)
from .gradcam import GradCAM, GradCAMPlusPlus
from .integrated_gradients import RELIG, IntegratedGradients, LayerIntegratedGradients
from .lime import LIME
from .medlime import MedLIME
from .noise_tunnel import NoiseTunnel
from .scorecam import ScoreCAM
from .targets import TargetError, parse_target, resolve_targets, target_classes

__all__ = [
    "Attribution",
    "AttributionCancelled",
    "CAMExplainer",
    "Explainer",
    "GradCAM",
    "GradCAMPlusPlus",
    "IntegratedGradients",
    "LayerIntegratedGradients",
    "LIME",
    "MedLIME",
    "NoiseTunnel",
    "RELIG",
    "ScoreCAM",
    "TargetError",
    "available_methods",
    "display_view",
    "get_explainer",
    "parse_target",
    "register",
    "resolve_targets",
    "select_output",
    "target_classes",
]

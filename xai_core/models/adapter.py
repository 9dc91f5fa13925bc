"""The model contract: one adapter per model kind, named in the model card (``kind``).

The pipeline, the evaluation and the server talk to a model only through this interface, so a
new kind (a VQA model, a slice classifier) plugs in without touching them::

    inputs = adapter.prepare(image, **request)            # model grid / slice / tokens
    pred = adapter.predict(inputs)                         # logits, calibrated probabilities
    explainer = adapter.explainer("relig", n_samples=8)    # built on the right module or function
    att = explainer.attribute(inputs.inputs, target=[[c]],
                              additional_forward_args=inputs.additional_forward_args)
    maps = adapter.to_input(att.maps[0], inputs)           # back onto the input geometry
    random = adapter.randomised("classifier")              # sanity checks
"""

from __future__ import annotations

import copy
import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..explain import Explainer, get_explainer
from ..io import Image

__all__ = ["ModelAdapter", "ModelInput"]


@dataclass
class ModelInput:
    """What the model sees for one image.

    inputs:  the attributed tensors, batch of one (the volume: ``(1, 1, K, J, I)`` float32).
    additional_forward_args: passed to the forward after ``inputs``, never attributed (token ids).
    image:   the input image the tensors were made from.
    ref:     kind-specific geometry to map outputs back (the model grid reference image).
    meta:    kind-specific request details (the question, the slice plane), JSON-ready.
    """

    inputs: tuple[torch.Tensor, ...]
    image: Image
    ref: Any = None
    additional_forward_args: tuple[Any, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor(self) -> torch.Tensor:
        """The first (displayed) input."""
        return self.inputs[0]


class ModelAdapter(ABC):
    """One loaded model of one kind, with its card and device.

    Subclasses set ``kind`` and implement the abstract methods. ``card`` is the
    :class:`~xai_core.models.ModelCard`; ``net`` the network, whose forward returns a tensor or a
    tuple with the class logits at ``output_index``.
    """

    kind: ClassVar[str] = ""
    output_index: ClassVar[int | str] = 0

    def __init__(self, card: Any, net: nn.Module, device: torch.device):
        self.card = card
        self.net = net.to(device).eval()
        self.device = device
        self._ood_guard: Any = None

    @classmethod
    def from_files(cls, card: Any, net: nn.Module, device: torch.device, card_path: Any) -> ModelAdapter:
        """The adapter of a card read from ``card_path`` (kinds with files beside the weights, such as
        a tokenizer, read them here)."""
        return cls(card, net, device)

    @property
    def classes(self) -> list[str]:
        return list(self.card.classes)

    @abstractmethod
    def prepare(self, image: Image, **request: Any) -> ModelInput:
        """The model's view of ``image`` (and of the request: a question, a plane)."""

    @abstractmethod
    def predict(self, inputs: ModelInput | Image) -> Any:
        """The prediction for ``inputs`` (an :class:`~xai_core.io.Image` is prepared first)."""

    @abstractmethod
    def to_input(self, maps: torch.Tensor | np.ndarray, inputs: ModelInput) -> list[Image]:
        """Maps ``(T, *model_shape)`` of input 0 back onto the input image's grid, one image each."""

    def module(self) -> nn.Module:
        """The differentiable network explainers hook (class logits at ``output_index``)."""
        return self.net

    def forward_func(self) -> Callable[..., torch.Tensor]:
        """The cheapest function from ``(*inputs, *additional_forward_args)`` to class logits ``(B, N)``:
        what a black-box method may call. Override to skip outputs that do not feed the classes."""
        net, index = self.net, self.output_index

        def forward(*args: Any) -> torch.Tensor:
            out = net(*args)
            return out if isinstance(out, torch.Tensor) else out[index]

        return forward

    def layer_for(self, method: str) -> str | None:
        """The card's default layer for ``method`` (None: the method's own default)."""
        layers = getattr(self.card, "layers", None) or {}
        return layers.get(method)

    def explainer(self, method: str, **params: Any) -> Explainer:
        """``method`` built on what it needs of this model: the module for gradient and activation
        methods (with the card's layer for that method), the forward function for black boxes."""
        cls = get_explainer(method)
        if self.kind not in cls.model_kinds:
            raise ValueError(f"method {method!r} does not fit model kind {self.kind!r} "
                             f"(it fits {sorted(cls.model_kinds)})")
        if cls.needs == "forward" or (cls.needs == "gradients" and not _takes(cls, "layer")):
            # Input-level methods need no layer: the cheapest path to the class logits will do.
            return cls(self.forward_func(), **params)
        if "layer" not in params and self.layer_for(cls.name) is not None:
            params["layer"] = self.layer_for(cls.name)
        layer = params.get("layer", _default(cls, "layer"))
        stages = getattr(self.net, "sequential_stages", ())
        if _takes(cls, "forward_from") and isinstance(layer, str) and layer in stages:
            # Path methods at an early layer continue from it instead of rerunning the stages before it.
            params.setdefault("forward_from", functools.partial(self.net.forward_from, layer))
        return cls(self.module(), output_index=self.output_index, **params)

    def ood_guard(self) -> Any:
        """The out-of-distribution guard of this model (:class:`xai_core.ood.OODGuard`, its fitted
        statistics read once from beside the weights)."""
        if self._ood_guard is None:
            from ..ood import OODGuard

            self._ood_guard = OODGuard.for_model(self)
        return self._ood_guard

    def assess_input(self, inputs: ModelInput) -> Any:
        """:class:`xai_core.ood.OODResult` for ``inputs``: is this input what the model was made for?"""
        return self.ood_guard().assess(self, inputs)

    def cascade_layers(self) -> list[str]:
        """Top-level modules on the path to the class logits, output first (for randomisation)."""
        order = getattr(self.net, "cascade_order", None)
        return list(order) if order else [n for n, _ in reversed(list(self.net.named_children()))]

    def randomised(self, cascade_from: str, seed: int = 0) -> ModelAdapter:
        """A copy whose layers from the output down to ``cascade_from`` (inclusive, in
        :meth:`cascade_layers` order) are re-initialised: the cascading model-parameter
        randomisation of Adebayo et al. (2018). The original is untouched."""
        order = self.cascade_layers()
        if cascade_from not in order:
            raise ValueError(f"unknown layer {cascade_from!r}; cascade order: {order}")
        clone = copy.copy(self)
        clone.net = copy.deepcopy(self.net)
        clone._ood_guard = None  # fitted to the original weights
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            for name in order[:order.index(cascade_from) + 1]:
                for mod in clone.net.get_submodule(name).modules():
                    if hasattr(mod, "reset_parameters"):
                        mod.reset_parameters()
        finally:
            torch.random.set_rng_state(gen_state)
        clone.net.eval()
        return clone


def _takes(cls: type, param: str) -> bool:
    return param in inspect.signature(cls.__init__).parameters


def _default(cls: type, param: str) -> Any:
    p = inspect.signature(cls.__init__).parameters.get(param)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


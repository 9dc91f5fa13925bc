"""Explainer base class, registry and the shared class-activation-map (CAM) machinery.

Shape of the API (captum-like)::

    explainer = get_explainer("gradcam")(model, layer="encoder_out")   # cls(model, **kwargs)
    maps = explainer.attribute(x, target="all")          # (B, T, *spatial) float32 in 0..1
    info = explainer.attribute_with_info(x, target=2)    # maps + flat flags + targets + logits

``x`` is a channel-first batch ``(B, C, *spatial)`` with 1 to 3 spatial dims. The model may return a
tensor or a tuple / NamedTuple / list (e.g. :class:`~xai_core.models.brain_lesion_net.LesionOutput`)
or a mapping; ``output_index`` picks the class logits ``(B, num_classes)`` (``(B,)`` is read as one
class).

Targets (``target=``):

* ``None``: the predicted class (argmax of the logits) of each item, ``T = 1``;
* ``int``: that class for every item, ``T = 1``;
* a flat list / 1-D tensor of ints: with ``B == 1`` the classes asked for (``T = len``); with
  ``B > 1`` one class per item (``len`` must equal ``B``, ``T = 1``);
* a nested list / 2-D tensor ``(B, T)`` (or ``(1, T)``, used for every item): per-item classes;
* ``"all"``: every class, ``T = num_classes``.

Flat maps: a map whose maximum equals its minimum (for instance a ReLU'd CAM that is zero
everywhere) cannot be min-max scaled. It comes back as all zeros and is flagged in
``Attribution.flat`` (``(B, T)`` bool). :meth:`Explainer.attribute` returns only the maps and keeps
the last call's :class:`Attribution` in ``explainer.last_info`` (``explainer.last_flat`` is its
``flat``); that attribute is per-explainer state, so code that shares one explainer between threads
should call :meth:`Explainer.attribute_with_info` and read the flags from its result.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Target = int | str | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | None
LayerSpec = nn.Module | str | None

# Relative tolerance under which a map counts as flat: float32 rounding of a constant map after
# interpolation stays far below this, while any real contrast stays far above it.
FLAT_RTOL = 1e-6

# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Explainer]] = {}
E = TypeVar("E", bound="type[Explainer]")


def register(name: str) -> Callable[[E], E]:
    """Class decorator: make an :class:`Explainer` subclass available as ``get_explainer(name)``."""
    key = name.lower()

    def deco(cls: E) -> E:
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"explainer name {name!r} is already registered to {_REGISTRY[key].__name__}")
        _REGISTRY[key] = cls
        cls.name = key
        return cls

    return deco


def get_explainer(name: str) -> type[Explainer]:
    """The explainer class registered as ``name`` (case-insensitive); ``cls(model, **kwargs)``."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"unknown explanation method {name!r}; available: {available_methods()}") from None


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


# ----------------------------------------------------------------------------------------------------------
# Results and small helpers
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attribution:
    """What one explainer call produced.

    maps:    ``(B, T, *spatial)`` float32 on the input's grid and device, each ``(b, t)`` map min-max
             scaled to 0..1 (1 = most important); flat maps are all zeros.
    flat:    ``(B, T)`` bool, True where the raw map was flat (no ranking possible).
    targets: ``(B, T)`` int64 class index of each map.
    logits:  ``(B, num_classes)`` float32 class logits of the unmodified input (detached).
    layer:   dotted name of the layer the maps come from (None for input-level methods).
    raw_max: ``(B, T)`` float32 maximum of the raw (unscaled, upsampled) map, to compare the strength
             of maps across classes or items; its unit is the method's own.
    """

    maps: torch.Tensor
    flat: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    layer: str | None
    raw_max: torch.Tensor


def select_output(output: Any, output_index: int | str = 0) -> torch.Tensor:
    """The tensor of a model output: itself, ``output[output_index]`` of a tuple / NamedTuple / list,
    or ``output[key]`` of a mapping."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output[output_index]
    if isinstance(output, tuple | list):
        if isinstance(output_index, str):
            return getattr(output, output_index)  # NamedTuple field
        return output[output_index]
    raise TypeError(f"cannot select a tensor from a model output of type {type(output).__name__}")


def class_logits(output: Any, output_index: int | str = 0) -> torch.Tensor:
    """Class logits ``(B, num_classes)`` from a model output (``(B,)`` becomes ``(B, 1)``)."""
    logits = select_output(output, output_index)
    if logits.ndim == 1:
        logits = logits[:, None]
    if logits.ndim != 2:
        raise ValueError(f"output {output_index!r} has shape {tuple(logits.shape)}; expected class logits "
                         "(B, num_classes): pick the classification output with output_index")
    return logits


def resolve_targets(target: Target, logits: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` int64 class indices for ``target`` (rules in the module docstring)."""
    b, n = logits.shape
    dev = logits.device
    if target is None:
        idx = logits.detach().argmax(1, keepdim=True)
    elif isinstance(target, str):
        if target.lower() != "all":
            raise ValueError(f"target string must be 'all', got {target!r}")
        idx = torch.arange(n, device=dev).expand(b, n)
    elif isinstance(target, bool):
        raise TypeError("target must be a class index, not a bool")
    elif isinstance(target, numbers.Integral) or (isinstance(target, torch.Tensor) and target.ndim == 0):
        idx = torch.full((b, 1), int(target), dtype=torch.long, device=dev)
    else:
        t = torch.as_tensor(target if isinstance(target, torch.Tensor) else np.asarray(target)).to(dev)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"target indices must be integers, got dtype {t.dtype}")
        t = t.long()
        if t.ndim == 1:
            if t.numel() == 0:
                raise ValueError("empty target list")
            if b == 1:
                idx = t[None, :]
            elif t.numel() == b:
                idx = t[:, None]
            else:
                raise ValueError(f"a flat target list for a batch of {b} needs one class per item "
                                 f"(got {t.numel()}); use a nested list (B, T) for several classes per item")
        elif t.ndim == 2:
            if t.shape[0] == 1:
                idx = t.expand(b, t.shape[1])
            elif t.shape[0] == b:
                idx = t
            else:
                raise ValueError(f"target of shape {tuple(t.shape)} does not match batch size {b}")
            if idx.shape[1] == 0:
                raise ValueError("empty target list")
        else:
            raise ValueError(f"target must be at most 2-D, got shape {tuple(t.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"target class out of range 0..{n - 1}: {idx.tolist()}")
    return idx.contiguous()


def normalise_maps(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max scale each ``(b, t)`` map of ``(B, T, *spatial)`` to 0..1.

    Returns ``(scaled float32, flat (B, T) bool, raw_max (B, T) float32)``. Flat or non-finite maps
    come back as zeros and flagged flat (non-finite ones with a warning: they mean a broken model).
    """
    m = maps.float()
    flat_view = m.flatten(2)
    finite = torch.isfinite(flat_view).all(-1)
    if not bool(finite.all()):
        warnings.warn("non-finite values in attribution maps; those maps are returned as zeros", stacklevel=3)
        flat_view = torch.where(torch.isfinite(flat_view), flat_view, torch.zeros_like(flat_view))
    lo = flat_view.amin(-1)
    hi = flat_view.amax(-1)
    rng = hi - lo
    flat = (rng <= FLAT_RTOL * torch.maximum(hi.abs(), lo.abs())) | ~finite
    denom = torch.where(flat, torch.ones_like(rng), rng)
    scaled = (flat_view - lo[..., None]) / denom[..., None]
    scaled = torch.where(flat[..., None], torch.zeros_like(scaled), scaled).clamp_(0.0, 1.0)
    return scaled.view_as(m), flat, torch.where(finite, hi, torch.zeros_like(hi))


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Linear (1-D), bilinear (2-D) or trilinear (3-D) resize of ``(B, T, *s)`` maps to ``size``,
    ``align_corners=False`` (cell centres, as the model grid and MONAI's upsampler use)."""
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[2:]) == size:
        return maps
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(maps, size=size, mode=mode, align_corners=False)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own previous mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in modes:
            m.training = was_training


def module_name(model: nn.Module, layer: nn.Module) -> str:
    """Dotted name of ``layer`` inside ``model`` ("" for the model itself)."""
    for name, mod in model.named_modules():
        if mod is layer:
            return name
    raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model")


def default_layer_name(model: nn.Module) -> str | None:
    """The ``default_cam_layer`` declared by the model or by a wrapped submodule (name prefixed)."""
    for prefix, mod in model.named_modules():
        name = getattr(mod, "default_cam_layer", None)
        if isinstance(name, str) and name:
            return f"{prefix}.{name}" if prefix else name
    return None


def _graph_nodes(root: torch.Tensor) -> set[Any]:
    """All autograd nodes that ``root`` depends on."""
    seen: set[Any] = set()
    stack = [root.grad_fn] if root.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions if n is not None and n not in seen)
    return seen


# ----------------------------------------------------------------------------------------------------------
# Explainer base
# ----------------------------------------------------------------------------------------------------------


class Explainer:
    """Base of all explainers: ``cls(model, **kwargs)``, ``attribute(inputs, target) -> maps``.

    Subclasses implement :meth:`attribute_with_info`. ``output_index`` selects the class logits from a
    multi-output model (0 = ``class_logits`` of ``BrainLesionNet``).
    """

    name: ClassVar[str] = ""

    def __init__(self, model: nn.Module, *, output_index: int | str = 0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.output_index = output_index
        self.last_info: Attribution | None = None

    @property
    def last_flat(self) -> torch.Tensor | None:
        """``(B, T)`` flat flags of the last :meth:`attribute` call on this explainer."""
        return None if self.last_info is None else self.last_info.flat

    def attribute(self, inputs: torch.Tensor, target: Target = None) -> torch.Tensor:
        """Maps ``(B, T, *spatial)`` float32 in 0..1 (see :class:`Attribution`)."""
        info = self.attribute_with_info(inputs, target)
        self.last_info = info
        return info.maps

    def attribute_with_info(self, inputs: torch.Tensor, target: Target = None) -> Attribution:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__}, output_index={self.output_index!r})"


def _check_inputs(inputs: torch.Tensor) -> None:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
    if inputs.ndim not in (3, 4, 5):
        raise ValueError(f"inputs must be (B, C, *spatial) with 1-3 spatial dims, got {tuple(inputs.shape)}")


class CAMExplainer(Explainer):
    """Shared machinery of class-activation-map methods: one hooked forward, maps on a layer.

    Layer (``layer=``): a module of the model, or its dotted name. By default the model's (or a
    wrapped submodule's) ``default_cam_layer`` attribute, else found on the first call: the module
    that finishes last in the forward pass among those that contain a convolution, output a spatial
    map ``(B, K, *s)`` with ``s`` not all 1, and lie on the path to the class logits. Outer stages
    finish after their inner convolutions, so this is the last encoder stage's output (for
    ``BrainLesionNet``: ``encoder_out``, not the segmentation decoder). The choice is cached.

    If a layer runs more than once in a forward, the last call's output is used.

    Every call runs the model in eval mode (each module's own mode is restored afterwards), with
    gradients enabled even under ``torch.no_grad`` (servers call models that way), removes its hooks
    before it returns or raises, and writes no ``.grad`` on the parameters.
    """

    needs_gradients: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, layer: LayerSpec = None, output_index: int | str = 0):
        super().__init__(model, output_index=output_index)
        if layer is None:
            name = default_layer_name(model)
        elif isinstance(layer, str):
            name = layer
        elif isinstance(layer, nn.Module):
            name = module_name(model, layer)
        else:
            raise TypeError(f"layer must be a module, a dotted name or None, got {type(layer).__name__}")
        if name is not None:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"model has no layer named {name!r}") from None
        self._layer_name: str | None = name

    @property
    def layer_name(self) -> str | None:
        """Dotted name of the CAM layer (None until the first call when it is found automatically)."""
        return self._layer_name

    # -- forward with hooks ---------------------------------------------------------------------------------

    def _forward(self, inputs: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model once. Returns ``(logits (B, N), activations (B, K, *s))``; the activations are
        part of the autograd graph of the logits when ``with_grad``. Hooks never outlive the call."""
        if self._layer_name is None:
            return self._forward_discover(inputs)
        layer = self.model.get_submodule(self._layer_name)
        store: dict[str, Any] = {}

        def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
            store["out"] = out

        handle = layer.register_forward_hook(hook)
        try:
            with torch.set_grad_enabled(with_grad):
                logits = class_logits(self.model(inputs), self.output_index)
        finally:
            handle.remove()
        if "out" not in store:
            raise RuntimeError(f"layer {self._layer_name!r} did not run in the forward pass")
        acts = store["out"]
        if not isinstance(acts, torch.Tensor) or acts.ndim != inputs.ndim:
            got = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
            raise ValueError(f"layer {self._layer_name!r} must output a (B, K, *spatial) tensor with "
                             f"{inputs.ndim - 2} spatial dims, got {got}")
        return logits, acts

    def _forward_discover(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward with light hooks on every convolution-holding module, then pick the CAM layer."""
        conv_holders: set[str] = set()
        for name, mod in self.model.named_modules():
            if isinstance(mod, nn.modules.conv._ConvNd):
                parts = name.split(".")
                conv_holders.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        conv_holders.discard("")
        if not conv_holders:
            raise ValueError("the model has no convolution layer; pass layer= explicitly")
        records: list[tuple[str, Any]] = []
        handles = []
        try:
            for name, mod in self.model.named_modules():
                if name in conv_holders:
                    handles.append(mod.register_forward_hook(
                        lambda _m, _a, out, _n=name: records.append((_n, out))))
            with torch.enable_grad():
                logits = class_logits(self.model(inputs), self.output_index)
        finally:
            for h in handles:
                h.remove()
        ancestors = _graph_nodes(logits)
        for name, out in reversed(records):
            if (isinstance(out, torch.Tensor) and out.ndim == inputs.ndim and out.grad_fn in ancestors
                    and any(s > 1 for s in out.shape[2:])):
                self._layer_name = name
                return logits, out
        raise ValueError("found no convolutional layer on the path to the class logits; pass layer=")

    # -- the call -------------------------------------------------------------------------------------------

    def _raw_maps(self, inputs: torch.Tensor, acts: torch.Tensor, logits: torch.Tensor,
                  targets: torch.Tensor) -> torch.Tensor:
        """Raw, non-negative maps ``(B, T, *s)`` at the layer's resolution."""
        raise NotImplementedError

    def attribute_with_info(self, inputs: torch.Tensor, target: Target = None) -> Attribution:
        """Maps ``(B, T, *spatial)`` for ``inputs`` ``(B, C, *spatial)`` and ``target`` (module docstring)."""
        _check_inputs(inputs)
        # An input that requires grad keeps a graph even through frozen (requires_grad=False) layers;
        # autograd.grad only walks back as far as the layer, so this adds no backward work.
        x = inputs.detach().requires_grad_(self.needs_gradients or self._layer_name is None)
        with eval_mode(self.model), torch.enable_grad():
            logits, acts = self._forward(x, with_grad=self.needs_gradients)
            targets = resolve_targets(target, logits)
            raw = self._raw_maps(x, acts, logits, targets)
        raw = upsample(raw.detach().float(), inputs.shape[2:])
        maps, flat, raw_max = normalise_maps(raw)
        return Attribution(maps=maps, flat=flat, targets=targets, logits=logits.detach().float(),
                           layer=self._layer_name, raw_max=raw_max)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={type(self.model).__name__}, layer={self._layer_name!r}, "
                f"output_index={self.output_index!r})")

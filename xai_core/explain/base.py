"""The explainer contract (captum's shape), the registry, and the shared CAM machinery.

Shape of the API::

    explainer = get_explainer("gradcam++")(module_or_forward_func, layer="encoder_out")
    att = explainer.attribute(x, target="all", additional_forward_args=(...,), progress=cb, cancel=stop)
    att.raw[0]     # (B, T, C or 1, *spatial) signed raw attribution of input 0, in the method's unit
    att.maps       # (B, T, *spatial) display view of input 0, 0..1 (1 = most important)

``inputs`` is one tensor or a tuple of tensors, each batch-first; the first is the one shown (for
the models here a channel-first volume or slice ``(B, C, *spatial)`` with 1 to 3 spatial dims).
``additional_forward_args`` are passed to the forward after the inputs and are not attributed
(token ids, masks). The forward may return a tensor or a tuple / NamedTuple / list / mapping;
``output_index`` picks the class logits ``(B, num_classes)`` (``(B,)`` is read as one class).

Targets: :func:`xai_core.explain.targets.resolve_targets` (one parser for the whole system).

Every method declares, as class attributes:

* ``title``: what the server and the viewer show ("Grad-CAM++ (Chattopadhyay et al. 2018)");
* ``model_kinds``: the model kinds (:attr:`xai_core.models.ModelAdapter.kind`) it fits;
* ``needs``: ``"gradients"`` (a differentiable forward; layer methods need the module),
  ``"activations"`` (a module whose layer is read, no backward) or ``"forward"`` (a black box: any
  function from inputs to logits);
* ``display``: how the display view is made from the raw attribution (:func:`display_view`).

Long methods call ``progress(fraction)`` between units of work and check ``cancel()``; when it
returns True they raise :class:`AttributionCancelled`. A ``progress`` callback may also raise to
stop the work (the server's jobs do).

Flat maps: a display view whose maximum equals its minimum (for instance a ReLU'd CAM that is zero
everywhere) cannot be ranked. It comes back as all zeros and is flagged in ``Attribution.flat``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .targets import Target, resolve_targets

LayerSpec = nn.Module | str | None
ForwardFunc = Callable[..., Any]
Inputs = torch.Tensor | tuple[torch.Tensor, ...]
Progress = Callable[[float], None]
Cancel = Callable[[], bool]
Display = Literal["minmax", "positive", "absolute"]
Needs = Literal["gradients", "activations", "forward"]
NEEDS = ("gradients", "activations", "forward")

# Relative tolerance under which a map counts as flat: float32 rounding of a constant map after
# interpolation stays far below this, while any real contrast stays far above it.
FLAT_RTOL = 1e-6

# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Explainer]] = {}
E = TypeVar("E", bound="type[Explainer]")


def register(name: str) -> Callable[[E], E]:
    """Class decorator: make an :class:`Explainer` subclass available as ``get_explainer(name)``.
    The class must declare a ``title`` and at least one model kind."""
    key = name.lower()

    def deco(cls: E) -> E:
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"explainer name {name!r} is already registered to {_REGISTRY[key].__name__}")
        if not cls.title or not cls.model_kinds or cls.needs not in NEEDS:
            raise ValueError(f"{cls.__name__} must declare title, model_kinds and needs to be registered")
        _REGISTRY[key] = cls
        cls.name = key
        return cls

    return deco


def get_explainer(name: str) -> type[Explainer]:
    """The explainer class registered as ``name`` (case-insensitive)."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"unknown explanation method {name!r}; available: {available_methods()}") from None


def available_methods(kind: str | None = None) -> list[str]:
    """Registered method names, sorted; with ``kind`` only the methods that fit that model kind."""
    return sorted(n for n, cls in _REGISTRY.items() if kind is None or kind in cls.model_kinds)


# ----------------------------------------------------------------------------------------------------------
# Results and small helpers
# ----------------------------------------------------------------------------------------------------------


class AttributionCancelled(RuntimeError):
    """Raised by an explainer whose ``cancel()`` check returned True."""


@dataclass(frozen=True)
class Attribution:
    """What one explainer call produced.

    raw:       one tensor per input, ``(B, T, C_i, *rest_i)``: the signed attribution of input ``i`` for
               each target, in the method's unit (IG: logit units, summing to the logit change),
               on the input's grid. ``C_i`` is 1 for methods that score locations rather than
               channels (the CAM family; layer methods summed over the layer's channels).
    maps:      ``(B, T, *spatial)`` float32 display view of ``raw[0]``, each map scaled to 0..1
               (:func:`display_view`); flat maps are all zeros.
    flat:      ``(B, T)`` bool, True where the display view was flat (no ranking possible).
    targets:   ``(B, T)`` int64 class index of each map.
    logits:    ``(B, num_classes)`` float32 class logits of the unmodified input (detached).
    layer:     dotted name of the layer the attribution was computed at (None for input-level).
    raw_max:   ``(B, T)`` float32 maximum of the view before scaling, to compare the strength of maps
               across classes or items.
    layer_raw: ``(B, T, K, *s)`` signed attribution at the layer's own resolution (layer methods).
    delta:     ``(B, T)`` convergence delta of path methods: sum of attributions minus the output
               difference between input and baseline (0 for an exact integral).
    aux_raw:   layer name -> ``(B, T, *layer_output_shape[1:])`` signed attribution at further layers
               integrated along the same path (a VQA model's question embedding: one row per token).
    extras:    method-specific diagnostics (JSON-ready values).
    """

    raw: tuple[torch.Tensor, ...]
    maps: torch.Tensor
    flat: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    layer: str | None
    raw_max: torch.Tensor
    layer_raw: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    aux_raw: dict[str, torch.Tensor] = field(default_factory=dict)


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


def display_view(raw: torch.Tensor, mode: Display) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 0..1 display view of a raw attribution ``(B, T, C, *spatial)``, summed over channels.

    ``minmax``: min-max scaled as it is (CAM maps, which are non-negative by construction);
    ``positive``: evidence for the target only (negative values become 0), then scaled;
    ``absolute``: magnitude of either sign, then scaled.
    Returns ``(maps, flat, raw_max)`` as :func:`normalise_maps`.
    """
    m = raw.float().sum(2)
    if mode == "positive":
        m = m.clamp(min=0.0)
    elif mode == "absolute":
        m = m.abs()
    elif mode != "minmax":
        raise ValueError(f"display must be 'minmax', 'positive' or 'absolute', got {mode!r}")
    return normalise_maps(m)


def as_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """``inputs`` as a non-empty tuple of tensors (captum's convention)."""
    t = inputs if isinstance(inputs, tuple) else (inputs,)
    if not t or not all(isinstance(x, torch.Tensor) for x in t):
        raise TypeError(f"inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}")
    if len({x.shape[0] for x in t}) != 1:
        raise ValueError(f"inputs disagree on the batch size: {[tuple(x.shape) for x in t]}")
    return t


def forward_args(additional_forward_args: Any) -> tuple[Any, ...]:
    """``additional_forward_args`` as a tuple (None -> empty)."""
    if additional_forward_args is None:
        return ()
    return additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)


class Ticker:
    """Progress and cancel for one call: ``tick(fraction)`` reports and raises when cancelled."""

    def __init__(self, progress: Progress | None, cancel: Cancel | None):
        self.progress, self.cancel = progress, cancel

    def __call__(self, fraction: float) -> None:
        if self.cancel is not None and self.cancel():
            raise AttributionCancelled("attribution cancelled")
        if self.progress is not None:
            self.progress(min(1.0, max(0.0, float(fraction))))


# ----------------------------------------------------------------------------------------------------------
# Explainer base
# ----------------------------------------------------------------------------------------------------------


class Explainer:
    """Base of all explainers: ``cls(forward_func, **params).attribute(inputs, target, ...)``.

    ``forward_func`` is a module or a plain function from ``(*inputs, *additional_forward_args)`` to
    the model output; ``output_index`` selects the class logits from a multi-output model (0 =
    ``class_logits`` of ``BrainLesionNet``). Subclasses implement :meth:`_attribute`.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    model_kinds: ClassVar[frozenset[str]] = frozenset()
    needs: ClassVar[Needs] = "gradients"
    display: ClassVar[Display] = "minmax"
    # Parameters a client of the server may set, with their allowed range (inclusive): the rest stay
    # at the defaults, so a request cannot make a method arbitrarily slow or large.
    param_bounds: ClassVar[dict[str, tuple[float, float]]] = {}

    def __init__(self, forward_func: nn.Module | ForwardFunc, *, output_index: int | str = 0):
        if not callable(forward_func):
            raise TypeError(f"forward_func must be a module or a function, got {type(forward_func).__name__}")
        self.forward_func = forward_func
        self.output_index = output_index

    @property
    def model(self) -> nn.Module | None:
        """The module explained, or None for a plain forward function."""
        return self.forward_func if isinstance(self.forward_func, nn.Module) else None

    def logits(self, inputs: tuple[torch.Tensor, ...], args: tuple[Any, ...] = ()) -> torch.Tensor:
        """Class logits ``(B, N)`` of the forward on ``(*inputs, *args)``."""
        return class_logits(self.forward_func(*inputs, *args), self.output_index)

    def attribute(self, inputs: Inputs, target: Target = None, additional_forward_args: Any = None, *,
                  progress: Progress | None = None, cancel: Cancel | None = None) -> Attribution:
        """Attribute the class logits of ``target`` (:func:`resolve_targets`) to each input."""
        tick = Ticker(progress, cancel)
        tick(0.0)
        att = self._attribute(as_tuple(inputs), target, forward_args(additional_forward_args), tick)
        tick(1.0)
        return att

    def _attribute(self, inputs: tuple[torch.Tensor, ...], target: Target, args: tuple[Any, ...],
                   tick: Ticker) -> Attribution:
        raise NotImplementedError

    def finish(self, raw: tuple[torch.Tensor, ...], targets: torch.Tensor, logits: torch.Tensor,
               layer: str | None = None, **more: Any) -> Attribution:
        """An :class:`Attribution` from raw per-input attributions, with the display view of input 0."""
        maps, flat, raw_max = display_view(raw[0], self.display)
        return Attribution(raw=tuple(r.detach() for r in raw), maps=maps, flat=flat, targets=targets,
                           logits=logits.detach().float(), layer=layer, raw_max=raw_max, **more)

    def __repr__(self) -> str:
        what = type(self.model).__name__ if self.model is not None else getattr(self.forward_func, "__name__", "fn")
        return f"{type(self).__name__}({what}, output_index={self.output_index!r})"


def check_method_params(cls: type[Explainer], params: Any) -> dict[str, Any]:
    """Client-supplied parameters of method ``cls``, checked against its ``param_bounds``: a dict of
    numbers, each named there and within its range (whole numbers where the default is an int)."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ValueError(f"method_params must be an object, got {type(params).__name__}")
    out = {}
    for key, value in params.items():
        if key not in cls.param_bounds:
            allowed = ", ".join(sorted(cls.param_bounds)) or "none"
            raise ValueError(f"{cls.name} takes no parameter {key!r} from a request; it takes: {allowed}")
        lo, hi = cls.param_bounds[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise ValueError(f"{cls.name} parameter {key} must be a number in [{lo:g}, {hi:g}], got {value!r}")
        default = inspect.signature(cls.__init__).parameters[key].default
        whole = isinstance(default, int) and not isinstance(default, bool)
        if whole and not float(value).is_integer():
            raise ValueError(f"{cls.name} parameter {key} must be a whole number, got {value!r}")
        out[key] = int(value) if whole else float(value)
    return out


def _check_image_input(inputs: torch.Tensor) -> None:
    if inputs.ndim not in (3, 4, 5):
        raise ValueError(f"inputs must be (B, C, *spatial) with 1-3 spatial dims, got {tuple(inputs.shape)}")


def layer_name_for(model: nn.Module, layer: LayerSpec, default: str | None = None) -> str | None:
    """Dotted name of ``layer`` (a submodule, a name, or None for ``default`` / the model's
    ``default_cam_layer``); checks that the model has it."""
    if layer is None:
        name = default if default is not None else default_layer_name(model)
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
    return name


def require_module(forward_func: Any, method: str) -> nn.Module:
    if not isinstance(forward_func, nn.Module):
        raise TypeError(f"{method} hooks a layer of the model: build it on the nn.Module, not on a plain "
                        f"function (got {type(forward_func).__name__}); black-box methods take a function")
    return forward_func


class CAMExplainer(Explainer):
    """Shared machinery of class-activation-map methods: one hooked forward, maps on a layer.

    Built on a module (the layer is hooked), never on a plain function.

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

    ``raw[0]`` is the CAM map upsampled to the input grid, ``(B, T, 1, *spatial)``, non-negative, in
    the unit of activation times gradient; ``layer_raw`` the same at the layer's resolution.
    """

    model_kinds = frozenset({"volume-classifier", "slice-classifier"})
    display = "minmax"

    def __init__(self, model: nn.Module, *, layer: LayerSpec = None, output_index: int | str = 0):
        super().__init__(require_module(model, type(self).__name__), output_index=output_index)
        self._layer_name: str | None = layer_name_for(model, layer)

    @property
    def layer_name(self) -> str | None:
        """Dotted name of the CAM layer (None until the first call when it is found automatically)."""
        return self._layer_name

    # -- forward with hooks ---------------------------------------------------------------------------------

    def _forward(self, inputs: tuple[torch.Tensor, ...], args: tuple[Any, ...],
                 with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model once. Returns ``(logits (B, N), activations (B, K, *s))``; the activations are
        part of the autograd graph of the logits when ``with_grad``. Hooks never outlive the call."""
        if self._layer_name is None:
            return self._forward_discover(inputs, args)
        layer = self.model.get_submodule(self._layer_name)
        store: dict[str, Any] = {}

        def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
            store["out"] = out

        handle = layer.register_forward_hook(hook)
        try:
            with torch.set_grad_enabled(with_grad):
                logits = self.logits(inputs, args)
        finally:
            handle.remove()
        if "out" not in store:
            raise RuntimeError(f"layer {self._layer_name!r} did not run in the forward pass")
        acts = store["out"]
        if not isinstance(acts, torch.Tensor) or acts.ndim != inputs[0].ndim:
            got = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
            raise ValueError(f"layer {self._layer_name!r} must output a (B, K, *spatial) tensor with "
                             f"{inputs[0].ndim - 2} spatial dims, got {got}")
        return logits, acts

    def _forward_discover(self, inputs: tuple[torch.Tensor, ...],
                          args: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
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
                logits = self.logits(inputs, args)
        finally:
            for h in handles:
                h.remove()
        ancestors = _graph_nodes(logits)
        for name, out in reversed(records):
            if (isinstance(out, torch.Tensor) and out.ndim == inputs[0].ndim and out.grad_fn in ancestors
                    and any(s > 1 for s in out.shape[2:])):
                self._layer_name = name
                return logits, out
        raise ValueError("found no convolutional layer on the path to the class logits; pass layer=")

    # -- the call -------------------------------------------------------------------------------------------

    def _raw_maps(self, inputs: tuple[torch.Tensor, ...], args: tuple[Any, ...], acts: torch.Tensor,
                  logits: torch.Tensor, targets: torch.Tensor, tick: Ticker) -> torch.Tensor:
        """Raw, non-negative maps ``(B, T, *s)`` at the layer's resolution."""
        raise NotImplementedError

    def _attribute(self, inputs: tuple[torch.Tensor, ...], target: Target, args: tuple[Any, ...],
                   tick: Ticker) -> Attribution:
        _check_image_input(inputs[0])
        # An input that requires grad keeps a graph even through frozen (requires_grad=False) layers;
        # autograd.grad only walks back as far as the layer, so this adds no backward work.
        grads = self.needs == "gradients" or self._layer_name is None
        x = tuple(t.detach().requires_grad_(grads and t.is_floating_point()) for t in inputs)
        with eval_mode(self.model), torch.enable_grad():
            logits, acts = self._forward(x, args, with_grad=self.needs == "gradients")
            targets = resolve_targets(target, logits)
            layer_raw = self._raw_maps(x, args, acts, logits, targets, tick).detach().float()
        raw = upsample(layer_raw, inputs[0].shape[2:])[:, :, None]
        return self.finish((raw,), targets, logits, layer=self._layer_name, layer_raw=layer_raw[:, :, None])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={type(self.model).__name__}, layer={self._layer_name!r}, "
                f"output_index={self.output_index!r})")

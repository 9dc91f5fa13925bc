"""The one target parser: what the user asked to explain, and which class indices that means.

Two steps, used by the core, the pipeline and the server alike:

* :func:`parse_target` checks a user-facing value (CLI flag, HTTP parameter, Python argument)
  against the model's classes and returns a :data:`TargetSpec`; every bad value raises
  :class:`TargetError` (a ``ValueError``) with a sentence naming the choices, which the server
  answers with a 4xx and the CLI with a one-line error.
* :func:`target_classes` turns a spec into class indices once the prediction is known, and
  :func:`resolve_targets` turns a tensor-level target into ``(B, T)`` indices for an explainer call.

User-facing values: ``None`` / ``""`` / ``"predicted"`` (the predicted class), ``"all"`` (every
class, the predicted one first), a class name, a class index (an ``int`` or a string of ASCII
digits), or a list of names / indices. A one-element list is read as its element (MONAI Label
clients send a config list's first choice that way).
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["TargetError", "TargetTypeError", "TargetSpec", "Target", "parse_target", "target_classes",
           "resolve_targets"]

# A spec: None = predicted class, "all", or explicit class indices.
TargetSpec = None | str | tuple[int, ...]
# What an explainer's ``attribute(target=...)`` takes (tensor level, per batch item).
Target = int | str | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | None

# str.isdigit() is True for "²" and other Unicode digits that int() rejects: accept ASCII only.
_INDEX = re.compile(r"[0-9]{1,6}")


class TargetError(ValueError):
    """A target that names no class of the model; the message lists the choices."""

    http_status = 422


class TargetTypeError(TargetError, TypeError):
    """A target of the wrong type (a bool, float indices)."""


def _one(value: Any, classes: Sequence[str]) -> int:
    choices = f"use a class name {list(classes)}, an index 0..{len(classes) - 1}, 'all' or 'predicted'"
    if isinstance(value, bool):
        raise TargetError(f"target must be a class name or index, not a boolean; {choices}")
    if isinstance(value, numbers.Integral):
        idx = int(value)
    elif isinstance(value, str) and _INDEX.fullmatch(value):
        idx = int(value)
    elif isinstance(value, str) and value in classes:
        return list(classes).index(value)
    else:
        shown = value if len(repr(value)) <= 80 else f"{repr(value)[:77]}..."
        raise TargetError(f"unknown target {shown!r}; {choices}")
    if not 0 <= idx < len(classes):
        raise TargetError(f"target class index {idx} is out of range 0..{len(classes) - 1} ({list(classes)})")
    return idx


def parse_target(value: Any, classes: Sequence[str]) -> TargetSpec:
    """Check ``value`` against ``classes``; returns None (predicted), ``"all"`` or class indices."""
    if isinstance(value, list | tuple):
        if len(value) == 1:
            value = value[0]
        elif not value:
            return None
        else:
            idx = tuple(_one(v, classes) for v in value)
            if len(set(idx)) != len(idx):
                raise TargetError(f"target lists a class twice: {list(value)}")
            return idx
    if value is None or value == "" or value == "predicted":
        return None
    if value == "all":
        return "all"
    return (_one(value, classes),)


def target_classes(spec: TargetSpec, n_classes: int, predicted: int) -> list[int]:
    """Class indices to explain, the primary one first (``"all"``: the predicted class first)."""
    if spec is None:
        return [int(predicted)]
    if spec == "all":
        return [int(predicted)] + [c for c in range(n_classes) if c != predicted]
    return [int(c) for c in spec]


def resolve_targets(target: Target, logits: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` int64 class indices for an explainer's ``target`` and the class logits ``(B, N)``.

    * ``None``: the predicted class (argmax) of each item, ``T = 1``;
    * ``int``: that class for every item, ``T = 1``;
    * a flat list / 1-D tensor: with ``B == 1`` the classes asked for (``T = len``); with ``B > 1`` one
      class per item (``len == B``, ``T = 1``);
    * a nested list / 2-D tensor ``(B, T)`` (or ``(1, T)``, used for every item);
    * ``"all"``: every class, ``T = N``.
    """
    b, n = logits.shape
    dev = logits.device
    if target is None:
        idx = logits.detach().argmax(1, keepdim=True)
    elif isinstance(target, str):
        if target.lower() != "all":
            raise TargetError(f"target string must be 'all', got {target!r}")
        idx = torch.arange(n, device=dev).expand(b, n)
    elif isinstance(target, bool):
        raise TargetTypeError("target must be a class index, not a bool")
    elif isinstance(target, numbers.Integral) or (isinstance(target, torch.Tensor) and target.ndim == 0):
        idx = torch.full((b, 1), int(target), dtype=torch.long, device=dev)
    else:
        t = torch.as_tensor(target if isinstance(target, torch.Tensor) else np.asarray(target)).to(dev)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TargetTypeError(f"target indices must be integers, got dtype {t.dtype}")
        t = t.long()
        if t.ndim == 1:
            if t.numel() == 0:
                raise TargetError("empty target list")
            if b == 1:
                idx = t[None, :]
            elif t.numel() == b:
                idx = t[:, None]
            else:
                raise TargetError(f"a flat target list for a batch of {b} needs one class per item "
                                  f"(got {t.numel()}); use a nested list (B, T) for several classes per item")
        elif t.ndim == 2:
            if t.shape[0] == 1:
                idx = t.expand(b, t.shape[1])
            elif t.shape[0] == b:
                idx = t
            else:
                raise TargetError(f"target of shape {tuple(t.shape)} does not match batch size {b}")
            if idx.shape[1] == 0:
                raise TargetError("empty target list")
        else:
            raise TargetError(f"target must be at most 2-D, got shape {tuple(t.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise TargetError(f"target class out of range 0..{n - 1}: {idx.tolist()}")
    return idx.contiguous()

"""Asking: a question about one slice of a volume, answered by a ``vqa`` model and optionally explained.

:func:`ask` is the one library function behind ``xai ask`` and the server's ``vqa`` task::

    res = ask(image, "Is there a lesion?", plane="coronal", slice_mm=12.0, method="relig", settings=s)
    res.answer          # VQAAnswer (xai_core.schema): answer, confidence, top 5, tokens, slice, model
    res.saliency        # Image on the input volume's grid: the map on the slice's slab, zero elsewhere
    res.overlay_png     # PNG bytes: slice, heatmap, question, answer, token bars
    write_answer(res, "out/")   # answer.json, saliency.nii.gz, tokens.json, overlay.png

The server draws the overlay only when a client downloads it: it asks with ``overlay=False``, keeps
what the picture is drawn from (:func:`write_overlay_source`) and :func:`draw_overlay` draws it from
the result folder on the first download.

Planes are patient (LPS) planes and ``slice_mm`` is the slice's LPS coordinate along the plane's axis
(S for axial, P for coronal, L for sagittal; default the volume's physical centre), as in
:mod:`xai_core.slices`. Methods: ``relig`` (RE-LIG: the image embedding and, along the same path, the
question embedding, so every token gets a score), ``ig`` (integrated gradients on the pixels, no token
scores) and ``none`` (the answer only).

Errors in the request (empty question, unknown plane or method, a slice outside the volume, a model
that is not a vqa model) raise :class:`AskError`, a ``ValueError`` whose message names the problem:
the CLI prints it as one line, the server answers 422 with it.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .io import Image, write_image
from .schema import VQAAnswer
from .settings import Settings
from .slices import AXIS_NAMES, PLANES, plane_extent

__all__ = ["AskError", "AskResult", "DEFAULT_MODEL", "MAX_QUESTION_CHARS", "METHODS", "OVERLAY_SOURCE", "ask",
           "check_request", "default_params", "draw_overlay", "overlay_png", "write_answer", "write_overlay_source"]

DEFAULT_MODEL = "brain-vqa"
METHODS = ("relig", "ig", "none")
# The tokenizer truncates long questions anyway; a bound keeps a pasted document from being tokenised
# and echoed back in every reply.
MAX_QUESTION_CHARS = 500
# What the overlay is drawn from, kept beside answer.json when the overlay is drawn later. Not one of
# the server's downloadable file types (results.FILE_NAME), so it is never listed as an artifact.
OVERLAY_SOURCE = "overlay_source.npz"

Progress = Callable[[str, float], None]


class AskError(ValueError):
    """A request that cannot be answered as asked; the message names the problem."""


@dataclass
class AskResult:
    """One answered (and possibly explained) question.

    Attributes:
        answer: the reply record (:class:`~xai_core.schema.VQAAnswer`).
        saliency: float32 heatmap 0..1 on the input volume's grid (same size, spacing, origin,
            direction), non-zero only on the slice's one-voxel slab; None with method ``none``.
        slice_image: the resampled slice, ``(rows, cols)`` float32 in the volume's intensities.
        slice_map: the heatmap on the slice, ``(rows, cols)`` 0..1; None with method ``none``.
        window: display window of the slice (the study's 1st and 99.5th percentiles).
        overlay_png: the overlay picture, PNG bytes; None when not asked for.
    """

    answer: VQAAnswer
    saliency: Image | None
    slice_image: np.ndarray
    slice_map: np.ndarray | None
    window: tuple[float, float]
    overlay_png: bytes | None = None


def _no_progress(stage: str, fraction: float) -> None:
    return None


def default_params(method: str, settings: Settings) -> dict[str, Any]:
    """The explainer parameters of ``method`` that a request does not set: ``settings.vqa_relig_*`` for
    ``relig``, ``settings.vqa_ig_n_steps`` for ``ig``, none for ``none``."""
    if method == "relig":
        return {"n_samples": settings.vqa_relig_n_samples, "n_steps": settings.vqa_relig_n_steps}
    if method == "ig":
        return {"n_steps": settings.vqa_ig_n_steps}
    return {}


def check_request(question: Any, plane: Any = "axial", slice_mm: Any = None, method: Any = "relig",
                  image: Image | None = None) -> tuple[str, str, float | None, str]:
    """The request's values, checked and normalised: ``(question, plane, slice_mm, method)``.

    Args:
        question: non-empty text of at most :data:`MAX_QUESTION_CHARS` characters.
        plane: ``axial``, ``coronal`` or ``sagittal`` (case and surrounding spaces ignored); None = axial.
        slice_mm: LPS mm along the plane's axis, a finite number (or numeric text); None = the centre.
        method: ``relig``, ``ig`` or ``none``; None = relig.
        image: when given, ``slice_mm`` must lie within its extent along the plane's axis.

    Raises:
        AskError: naming the first bad value.
    """
    if not isinstance(question, str) or not question.strip():
        raise AskError("the question is empty: type a question about the slice")
    question = question.strip()
    if len(question) > MAX_QUESTION_CHARS:
        raise AskError(f"the question is {len(question)} characters long; at most {MAX_QUESTION_CHARS} are taken")
    plane = "axial" if plane is None else plane
    if not isinstance(plane, str) or plane.strip().lower() not in PLANES:
        raise AskError(f"plane must be one of {', '.join(PLANES)}, got {plane!r}")
    plane = plane.strip().lower()
    method = "relig" if method is None else method
    if not isinstance(method, str) or method.strip().lower() not in METHODS:
        raise AskError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    method = method.strip().lower()
    if isinstance(slice_mm, str) and not slice_mm.strip():
        slice_mm = None  # an empty form field: the default, the volume's centre
    if slice_mm is not None:
        if isinstance(slice_mm, str):
            try:
                slice_mm = float(slice_mm)
            except ValueError:
                raise AskError(f"slice_mm must be a number (LPS mm), got {slice_mm!r}") from None
        if isinstance(slice_mm, bool) or not isinstance(slice_mm, int | float) or not math.isfinite(slice_mm):
            raise AskError(f"slice_mm must be a finite number (LPS mm), got {slice_mm!r}")
        slice_mm = float(slice_mm)
        if image is not None:
            lo, hi = plane_extent(image, plane)
            if not lo <= slice_mm <= hi:
                axis = AXIS_NAMES[("sagittal", "coronal", "axial").index(plane)]
                raise AskError(f"slice_mm {slice_mm:g} is outside the volume: its {plane} slices run from "
                               f"{lo:.1f} to {hi:.1f} mm along {axis} (LPS)")
    return question, plane, slice_mm, method


def ask(image: Image, question: str, *, plane: str = "axial", slice_mm: float | None = None,
        method: str = "relig", model: Any = None, model_name: str = DEFAULT_MODEL,
        method_kwargs: dict[str, Any] | None = None, overlay: bool = True, progress: Progress | None = None,
        settings: Settings | None = None) -> AskResult:
    """Answer ``question`` about one slice of ``image`` and explain the answer.

    Args:
        image: the 3-D volume (any geometry, oblique included).
        question: the question (see :func:`check_request` for the bounds of every request value).
        plane: patient plane of the slice: ``axial`` | ``coronal`` | ``sagittal``.
        slice_mm: the slice's LPS coordinate along the plane's axis (S, P or L), mm; default the centre.
        method: ``relig`` | ``ig`` | ``none``.
        model: a loaded vqa adapter (:class:`~xai_core.models.vqa.VQAModel`); default: load ``model_name``.
        model_name: the model to load when ``model`` is None.
        method_kwargs: explainer parameters over :func:`default_params` (e.g. ``n_samples``, ``n_steps``).
        overlay: also render the overlay PNG now (matplotlib; ~0.65 s). The server passes False and
            draws it when a client downloads it (:func:`draw_overlay`).
        progress: ``progress(stage, fraction)`` with stages load, prepare, answer, attribute, render; it
            may raise to stop the call (the server's job cancel).
        settings: device and weight folders for loading the model, and the explainer parameters a
            request does not set (``vqa_relig_n_samples``, ``vqa_relig_n_steps``, ``vqa_ig_n_steps``);
            default ``Settings()``.

    Returns:
        An :class:`AskResult`.

    Raises:
        AskError: a bad request value, a slice outside the volume or its content, a model of another kind.
        KeyError: an unknown model name.
    """
    from .explain import get_explainer
    from .pipeline import software_versions

    progress = progress or _no_progress
    settings = settings or Settings()
    question, plane, slice_mm, method = check_request(question, plane, slice_mm, method, image)
    timings: dict[str, float] = {}
    progress("load", 0.0)
    t = time.perf_counter()
    if model is None:  # timed only when loaded here (a caller's model was loaded before the call)
        from .models import load

        model = load(model_name, settings=settings)
        timings["load"] = round(time.perf_counter() - t, 4)
    if getattr(model, "kind", None) != "vqa":
        raise AskError(f"model {model.card.name!r} is a {model.kind!r} model; asking needs a vqa model "
                       f"(e.g. {DEFAULT_MODEL})")

    progress("prepare", 0.1)
    t = time.perf_counter()
    try:
        inputs = model.prepare(image, question=question, plane=plane, slice_mm=slice_mm)
    except ValueError as e:  # an empty slice, a bad plane: the request, not the code
        raise AskError(str(e)) from None
    timings["prepare"] = round(time.perf_counter() - t, 4)

    progress("answer", 0.2)
    t = time.perf_counter()
    pred = model.predict(inputs)
    timings["predict"] = round(time.perf_counter() - t, 4)

    sl = inputs.ref["slice"]
    from .models.vqa import study_window

    window = study_window(image)
    saliency = slice_map = None
    saliency_json = None
    tokens: list[dict[str, Any]] = []
    params: dict[str, Any] = {}
    title = None
    if method != "none":
        cls = get_explainer(method)
        title = cls.title
        params = {**default_params(method, settings), **(method_kwargs or {})}
        progress("attribute", 0.3)
        t = time.perf_counter()
        try:
            explainer = model.explainer(method, **params)
        except TypeError as e:  # a parameter the method does not take (a typo on the command line)
            raise AskError(f"{method}: {e}") from None
        att = explainer.attribute(inputs.inputs, target=[[pred.answer_index]],
                                  additional_forward_args=inputs.additional_forward_args,
                                  progress=lambda f: progress("attribute", 0.3 + 0.5 * f))
        timings["attribute"] = round(time.perf_counter() - t, 4)
        slice_map = model.slice_maps(att.maps[0], inputs)[0]
        saliency = model.to_input(att.maps[0], inputs)[0]
        tokens = model.token_scores(att, inputs)
        arr = saliency.array
        flat = bool(att.flat[0, 0]) or not np.any(arr > 0)
        peak = None if flat else np.unravel_index(int(np.argmax(arr)), arr.shape)[::-1]  # (i, j, k)
        saliency_json = {
            "flat": flat, "display": explainer.display, "raw_max": float(att.raw_max[0, 0]),
            "convergence_delta": None if att.delta is None else float(att.delta[0, 0]),
            "layer": att.layer,
            "peak_index_ijk": None if peak is None else [int(v) for v in peak],
            "peak_lps_mm": None if peak is None else [round(float(v), 3) for v in saliency.index_to_physical(peak)],
            "nonzero_voxels": int(np.count_nonzero(arr > 0)),
            "extras": {k: v for k, v in att.extras.items() if _jsonable(v)},
        }
    card = model.card
    answer = VQAAnswer(
        question=question, answer=pred.answer, answer_type=pred.answer_type,
        confidence=round(pred.confidence, 6),
        top=[{"answer": a, "probability": round(p, 6)} for a, p in pred.top],
        tokens=[{"token": d["token"], "score": round(d["score"], 6)} for d in tokens],
        method=method, method_title=title, params=params,
        slice={k: inputs.meta[k] for k in ("plane", "axis", "position_mm", "thickness_mm", "size", "spacing",
                                           "origin", "direction")},
        saliency=saliency_json,
        image={"size": list(image.size), "spacing": [float(v) for v in image.spacing],
               "origin": [float(v) for v in image.origin], "direction": [float(v) for v in image.direction]},
        model={"name": card.name, "version": card.version, "weights_sha256": card.weights_sha256 or None},
        timings_s=timings, software=software_versions())
    result = AskResult(answer=answer, saliency=saliency, slice_image=np.asarray(sl.array, np.float32),
                       slice_map=slice_map, window=window)
    if overlay:
        progress("render", 0.85)
        t = time.perf_counter()
        result.overlay_png = overlay_png(result)
        answer.timings_s["overlay"] = round(time.perf_counter() - t, 4)
    return result


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _wrap(text: str, width: int = 70) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def overlay_png(result: AskResult, alpha: float = 0.45) -> bytes:
    """The overlay picture as PNG bytes: the slice in its display orientation (``xai_core.slices``)
    with the heatmap over it, the question, the answer with its confidence and the runners-up, and one
    bar per question token (when the method scored them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = result.answer
    has_tokens = bool(a.tokens)
    fig, axes = plt.subplots(1, 2 if has_tokens else 1, figsize=(11 if has_tokens else 6.2, 5.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1.3, 1]} if has_tokens else None)
    ax = axes[0, 0]
    lo, hi = result.window
    # Square pixels: a slice is resampled on a square grid (its column and row spacing are equal).
    ax.imshow(result.slice_image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    if result.slice_map is not None:
        im = ax.imshow(np.ma.masked_less(result.slice_map, 0.05), cmap="inferno", vmin=0, vmax=1, alpha=alpha,
                       interpolation="nearest")
        # Below the slice, so that its label never runs into the token names of the bar panel.
        fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.05, pad=0.03,
                     label=f"{a.method} saliency (0..1)")
    s = a.slice
    ax.set_title(f"{s.plane} slice at {s.axis} = {s.position_mm:.1f} mm")
    ax.axis("off")
    if has_tokens:
        bx = axes[0, 1]
        names = [t.token for t in a.tokens]
        scores = np.array([t.score for t in a.tokens], float)
        y = np.arange(len(names))
        bx.barh(y, scores, color=np.where(scores >= 0, "#c0392b", "#2e6da4"))
        bx.set_yticks(y, names)
        for label in bx.get_yticklabels():
            label.set_parse_math(False)  # a "$" token is text, not the start of a formula
        bx.invert_yaxis()  # the question reads top to bottom
        bx.axvline(0, color="k", linewidth=0.6)
        bx.set_xlabel("token attribution (logit units)")
        bx.set_title("question tokens")
    runners = ", ".join(f"{t.answer} {t.probability:.2f}" for t in a.top[1:4])
    fig.suptitle(f"Q: {_wrap(a.question)}\nA: {a.answer} ({a.confidence:.2f}, {a.answer_type});  "
                 f"runners-up: {runners}", fontsize=11, parse_math=False)  # "$...$" in a question is text
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_answer(result: AskResult, out: str | Path) -> dict[str, Path]:
    """Write the parts of ``result`` into folder ``out``: ``answer.json`` (the
    :class:`~xai_core.schema.VQAAnswer`, with ``files``), ``saliency.nii.gz`` (float32 heatmap on the
    input volume's grid, zero off the slice; not with method ``none``), ``tokens.json`` (``{"question",
    "method", "unit", "tokens": [{"token", "score"}]}``, one score per question token; the list is
    empty when the method scored none) and ``overlay.png`` (when rendered). Returns ``{name: path}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if result.saliency is not None:
        files["saliency"] = write_image(result.saliency, out / "saliency.nii.gz")
    a = result.answer
    files["tokens"] = out / "tokens.json"
    files["tokens"].write_text(json.dumps({"question": a.question, "method": a.method, "unit": "logit",
                                           "tokens": [t.model_dump() for t in a.tokens]}, indent=2))
    if result.overlay_png is not None:
        files["overlay"] = out / "overlay.png"
        files["overlay"].write_bytes(result.overlay_png)
    files["answer"] = out / "answer.json"
    record = a.model_copy(update={"files": {k: v.name for k, v in files.items()}})
    files["answer"].write_text(json.dumps(record.model_dump(mode="json"), indent=2))
    return files


def write_overlay_source(result: AskResult, out: str | Path) -> Path:
    """Keep what :func:`overlay_png` draws besides the answer, so that :func:`draw_overlay` can draw the
    overlay later from folder ``out``: ``overlay_source.npz`` with ``slice_image`` ``(rows, cols)``
    float32, ``slice_map`` ``(rows, cols)`` 0..1 (absent with method ``none``) and ``window`` (2,)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"slice_image": np.asarray(result.slice_image, np.float32),
              "window": np.asarray(result.window, np.float64)}
    if result.slice_map is not None:
        arrays["slice_map"] = np.asarray(result.slice_map, np.float32)
    path = out / OVERLAY_SOURCE
    np.savez_compressed(path, **arrays)
    return path


def draw_overlay(folder: str | Path) -> Path | None:
    """Draw ``overlay.png`` in ``folder`` from its ``answer.json`` and :data:`OVERLAY_SOURCE` (written
    by :func:`write_answer` and :func:`write_overlay_source`): the same picture :func:`ask` renders.
    Returns its path; None when the folder lacks either file (another kind of result, or one pruned
    meanwhile). Raises ValueError naming the file when one is damaged (truncated, not an archive,
    missing arrays, an answer that is not the schema's)."""
    folder = Path(folder)
    try:
        with np.load(folder / OVERLAY_SOURCE) as z:
            slice_image = z["slice_image"]
            slice_map = z["slice_map"] if "slice_map" in z.files else None
            lo, hi = (float(v) for v in z["window"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{OVERLAY_SOURCE} is damaged ({type(e).__name__})") from e
    try:
        answer = VQAAnswer.model_validate_json((folder / "answer.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"answer.json is damaged ({type(e).__name__})") from e
    if slice_image.ndim != 2 or (slice_map is not None and slice_map.shape != slice_image.shape):
        raise ValueError(f"{OVERLAY_SOURCE} is damaged (slice arrays of shapes {slice_image.shape}, "
                         f"{None if slice_map is None else slice_map.shape})")
    png = overlay_png(AskResult(answer=answer, saliency=None, slice_image=slice_image, slice_map=slice_map,
                                window=(lo, hi)))
    path = folder / "overlay.png"
    # Written aside and renamed: a concurrent download never reads half a picture.
    tmp = folder / f".overlay.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_bytes(png)
    os.replace(tmp, path)
    return path

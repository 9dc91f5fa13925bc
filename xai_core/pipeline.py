"""``explain(image, method)``: the one explanation pipeline that every front end calls.

image (input grid) -> model grid -> prediction -> saliency on the model grid (explainer)
-> saliency on the input grid (same geometry) -> mask, components and levels.

The CLI writes the result to files (:func:`write_explanation`), the MONAI Label app returns its
parts over HTTP, and the tests inspect it; none of them holds explanation logic of its own.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .explain import available_methods, parse_target, target_classes
from .io import Image, write_image
from .masks import SaliencyMask, saliency_mask
from .models import ModelAdapter
from .models import load as load_model
from .models.grid import normalise_intensity
from .settings import Settings

__all__ = ["Explanation", "explain", "brain_foreground", "write_explanation", "software_versions"]

Progress = Callable[[str, float], None]


@dataclass
class Explanation:
    """Everything one explanation produced, on the input image's grid.

    Attributes:
        image: the input image.
        method: registry name of the explainer.
        targets: explained class names; ``saliency[0]`` belongs to ``targets[0]`` (the primary).
        prediction: model prediction (calibrated probabilities, segmentation head).
        saliency: float32 display maps 0..1 (1 = most important), one per target, input geometry.
        raw: float32 signed raw attribution per target (channels summed), input geometry, in the
            method's unit per model-grid voxel.
        mask: the primary map's adaptive mask and levels (:class:`~xai_core.masks.SaliencyMask`).
        foreground: bool brain mask the percentages of the mask and levels refer to.
        params: method parameters (layer, targets, ...), for provenance.
        timings: seconds per stage.
        flat: per target, True when the raw map was flat (no ranking possible).
        attribution: how the display view was made, raw maxima, convergence delta, method extras.
        title: the method's title.
        ood: the out-of-distribution guard's verdict (:class:`xai_core.ood.OODResult` as a dict).
    """

    image: Image
    method: str
    targets: list[str]
    prediction: Any
    saliency: list[Image]
    mask: SaliencyMask
    foreground: np.ndarray
    params: dict[str, Any]
    timings: dict[str, float]
    flat: list[bool] = field(default_factory=list)
    model_card: dict[str, Any] = field(default_factory=dict)
    raw: list[Image] = field(default_factory=list)
    attribution: dict[str, Any] = field(default_factory=dict)
    title: str = ""
    ood: dict[str, Any] | None = None

    @property
    def primary(self) -> Image:
        return self.saliency[0]

    def mask_image(self) -> Image:
        return self.image.with_array(self.mask.mask.astype(np.uint8))

    def levels_image(self) -> Image:
        return self.image.with_array(self.mask.levels.astype(np.uint8))

    def summary(self) -> dict[str, Any]:
        """JSON-ready result (:class:`xai_core.schema.ExplanationResult`): prediction, probabilities,
        method, saliency and mask statistics, geometry, timings, versions."""
        from .schema import ExplanationResult

        p = self.prediction
        voxel_ml = float(np.prod(self.image.spacing)) / 1000.0
        peak = np.unravel_index(int(np.argmax(self.primary.array)), self.primary.array.shape)
        attribution = dict(self.attribution)
        result = ExplanationResult(
            prediction={
                "label": p.label,
                "probabilities": {c: round(float(v), 6) for c, v in zip(self.model_card["classes"],
                                                                          p.probabilities, strict=True)},
                "calibration": self.model_card.get("calibration"),
                "temperature": self.model_card.get("temperature"),
                "logits": [round(float(v), 6) for v in p.logits],
                "lesion_volume_ml_segmentation_head": round(float(p.lesion_mask.array.sum()) * voxel_ml, 3),
            },
            method=self.method,
            method_title=self.title or self.method,
            targets=self.targets,
            params=self.params,
            saliency={
                "flat": self.flat,
                "peak_index_ijk": [int(v) for v in peak[::-1]],
                "peak_lps_mm": [round(float(v), 3) for v in self.image.index_to_physical(peak[::-1])],
                "display": attribution.pop("display", "minmax"),
                "raw_max": attribution.pop("raw_max", []),
                "convergence_delta": attribution.pop("convergence_delta", None),
                "evidence": attribution.pop("evidence", None),
                "extras": attribution,
            },
            mask={
                "empty": self.mask.empty,
                "reason": self.mask.reason,
                "threshold": _finite_or_none(self.mask.threshold),
                "percentile": _finite_or_none(self.mask.percentile),
                "voxels": int(self.mask.mask.sum()),
                "volume_ml": round(float(self.mask.mask.sum()) * voxel_ml, 3),
                "fraction_of_brain": round(self.mask.fraction, 6),
                "components": len(self.mask.components),
                "levels_percent": sorted(self.mask.level_thresholds, reverse=True),
                "levels_encoding": "uint8: 0 outside; level n = top p_n % of brain voxels, nested, "
                                   "highest level most salient",
            },
            image={"size": list(self.image.size), "spacing": list(self.image.spacing),
                   "origin": list(self.image.origin), "direction": list(self.image.direction)},
            timings_s={k: round(v, 4) for k, v in self.timings.items()},
            model={k: self.model_card.get(k) for k in ("name", "version", "weights_sha256")},
            software=software_versions(),
            ood=self.ood,
        )
        out = result.model_dump(mode="json", exclude={"task", "image_id", "result_id", "artifacts"})
        for key in ("files", "findings", "report", "ood"):  # absent when not made
            if out[key] is None:
                del out[key]
        return out


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def software_versions() -> dict[str, str]:
    import monai
    import SimpleITK as sitk
    import torch

    return {"xai_core": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "SimpleITK": sitk.Version_VersionString(), "python": platform.python_version()}


def brain_foreground(image: Image) -> np.ndarray:
    """Voxels of the head/brain on the input grid: normalised intensity above 10 % (MR background is
    near zero), holes filled. Percent-based saliency levels count these voxels only."""
    from scipy import ndimage

    fg = normalise_intensity(image.array) > 0.1
    fg = ndimage.binary_opening(fg, iterations=1)
    return ndimage.binary_fill_holes(fg) if fg.any() else fg


def explain(image: Image, method: str = "gradcam++", *, target: Any = None,
            model: ModelAdapter | None = None, method_kwargs: dict[str, Any] | None = None,
            progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
            settings: Settings | None = None, request: dict[str, Any] | None = None,
            check_input: bool = True) -> Explanation:
    """Explain ``model``'s decision on ``image`` with ``method``.

    Args:
        image: any geometry (see :mod:`xai_core.io`).
        method: a registered method name that fits the model's kind
            (:func:`xai_core.explain.available_methods`).
        target: class name or index, a list of them, ``'all'``, or None/``'predicted'`` for the
            predicted class (:func:`xai_core.explain.parse_target`).
        model: a loaded model adapter (default: ``brain-lesion-3d``).
        method_kwargs: extra explainer arguments (e.g. ``layer``, ``n_samples``).
        progress: called with (stage running now, fraction done); it may raise to stop the work.
        cancel: polled by long methods; True stops them with ``AttributionCancelled``.
        settings: mask bounds and levels, device (default: from the environment).
        request: kind-specific inputs for ``model.prepare`` (a question, a slice).
        check_input: run the out-of-distribution guard (:mod:`xai_core.ood`); its result is
            ``Explanation.ood`` and a quality flag of the findings.
    """
    cfg = settings or Settings()
    model = model or load_model("brain-lesion-3d", settings=cfg)
    if method not in available_methods(model.kind):
        raise ValueError(f"unknown method {method!r} for a {model.kind} model; available: "
                         f"{available_methods(model.kind)}")
    spec = parse_target(target, model.classes)
    report = progress or (lambda stage, frac: None)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    report("prepare", 0.0)
    inputs = model.prepare(image, **(request or {}))
    timings["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    pred = model.predict(inputs)
    timings["predict"] = time.perf_counter() - t
    t = time.perf_counter()
    ood = model.assess_input(inputs).model_dump(mode="json") if check_input else None
    if ood is not None:
        timings["ood"] = time.perf_counter() - t
    report("attribute", 0.2)

    targets = target_classes(spec, len(model.classes), model.classes.index(pred.label))
    kwargs = dict(method_kwargs or {})
    t = time.perf_counter()
    explainer = model.explainer(method, **kwargs)
    att = explainer.attribute(inputs.inputs, target=[targets], additional_forward_args=inputs.additional_forward_args,
                              progress=lambda f: report("attribute", 0.2 + 0.5 * f), cancel=cancel)
    timings["attribute"] = time.perf_counter() - t
    report("mask", 0.7)

    t = time.perf_counter()
    saliency = []
    for on_input in model.to_input(att.maps[0], inputs):
        a = on_input.array
        hi = float(a.max())
        # Resampling can lower the peak slightly; rescale so 1 is the most important voxel again.
        a = a / hi if hi > 0 else np.zeros_like(a)
        saliency.append(image.with_array(np.clip(a, 0, 1).astype(np.float32)))
    raw = model.to_input(att.raw[0][0].sum(1), inputs)  # (T, *grid) signed, channels summed
    timings["to_input_grid"] = time.perf_counter() - t

    t = time.perf_counter()
    fg = brain_foreground(image)
    # k, j, i array order: spacing reversed from ITK's (i, j, k).
    sm = saliency_mask(saliency[0].array, fg, spacing=tuple(image.spacing[::-1]),
                       min_fraction=cfg.mask_min_fraction, max_fraction=cfg.mask_max_fraction,
                       levels_percent=cfg.mask_levels_percent)
    timings["mask"] = time.perf_counter() - t
    report("done", 1.0)
    params = {"target": target if target is not None else "predicted", "target_classes": targets,
              "layer": att.layer, **{k: v for k, v in kwargs.items() if _jsonable(v)}}
    attribution = {"display": explainer.display, "raw_max": [float(v) for v in att.raw_max[0].tolist()],
                   **({"convergence_delta": [float(v) for v in att.delta[0].tolist()]}
                      if att.delta is not None else {}),
                   **att.extras}
    return Explanation(
        image=image, method=method, targets=[model.classes[c] for c in targets], prediction=pred,
        saliency=saliency, mask=sm, foreground=fg, params=params, timings=timings,
        flat=[bool(f) for f in att.flat[0].tolist()], model_card=model.card.model_dump(), raw=raw,
        attribution=attribution, title=explainer.title, ood=ood,
    )


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def write_explanation(exp: Explanation, out: str | Path, overlay: bool = True) -> dict[str, Path]:
    """Write ``saliency.nii.gz`` (display view 0..1 of the primary target), ``attribution.nii.gz``
    (its signed raw attribution), ``saliency_<class>.nii.gz`` (every target when several),
    ``levels.nii.gz``, ``mask.nii.gz``, ``result.json`` and ``overlay.png`` into ``out``.
    Every volume carries the input's geometry."""
    from .render import overlay_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"saliency": write_image(exp.primary, out / "saliency.nii.gz"),
             "levels": write_image(exp.levels_image(), out / "levels.nii.gz"),
             "mask": write_image(exp.mask_image(), out / "mask.nii.gz")}
    if exp.raw:
        files["attribution"] = write_image(exp.raw[0], out / "attribution.nii.gz")
    if len(exp.saliency) > 1:
        for name, sal in zip(exp.targets, exp.saliency, strict=True):
            files[f"saliency_{name}"] = write_image(sal, out / f"saliency_{name}.nii.gz")
    summary = exp.summary()
    if overlay:
        t = time.perf_counter()
        p = exp.prediction
        title = (f"{exp.method} for '{exp.targets[0]}' | predicted {p.label} "
                 f"({float(p.probabilities.max()):.2f})")
        files["overlay"] = overlay_png(exp.image, exp.primary, out / "overlay.png", title=title,
                                       mask=exp.mask_image())
        summary["timings_s"]["overlay"] = round(time.perf_counter() - t, 4)
    summary["files"] = {k: v.name for k, v in files.items()}
    files["result"] = out / "result.json"
    files["result"].write_text(json.dumps(summary, indent=2))
    return files

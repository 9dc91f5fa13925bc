"""Counterfactual check: replace a region with healthy-looking content and predict again.

If an explanation's region really carries the evidence for the prediction, the prediction should
weaken once that region looks normal. This module measures that change; the report states it as
the explanation's faithfulness ("without this region the prediction would change from X (p) to
Y (q)").

In-fillers
----------
An :class:`InFiller` turns ``(image, region)`` into an image whose region holds plausible healthy
tissue. :class:`TemplateInFiller` is the one shipped now:

1. the region is grown by ``counterfactual_dilation_mm`` (3 mm) so that its rim, which resampling
   and thresholding leave half-lesion, is replaced too;
2. the MNI152 template is warped into the input's space with the inverse of the input's
   registration (:meth:`~xai_core.registration.RegistrationResult.inverse`);
3. its intensities are matched to the input by a robust linear fit ``input ~ a * template + b`` over
   brain voxels in a 3-20 mm shell around the grown region (local, so a bias field is followed),
   refitted once without voxels more than 3 MADs off (oedema, the lesion's rim); with fewer than
   200 shell voxels the fit uses all brain voxels outside the region;
4. the matched template replaces the grown region with a blend weight that is 1 inside the grown
   region and falls off as a Gaussian of sigma ``counterfactual_blend_mm`` (2 mm) outside it,
   cut to 0 below 1 % so that voxels more than about 4 sigma away stay exactly as they were.

A learned in-filler (the MedLIME masked autoencoder, :class:`xai_core.mae.MAEInFiller`) can replace it:
anything with a ``name``, a ``fill(image, region) -> Image`` and a ``describe() -> dict`` plugs into
:func:`counterfactual`.

Batches: :func:`fill_batch` fills ``n`` regions ``(n, K, J, I)`` of one image in one call and returns ``n``
images. An in-filler that has its own ``fill_batch(image, regions)`` (:class:`BatchInFiller`: the MAE
reconstructs the whole batch in one pass, the template in-filler warps the template once) is called
with the whole batch; any other gets one ``fill`` per region.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy import ndimage

from .io import Image
from .mni import load_template
from .registration import RegistrationResult, warp_from_mni
from .settings import Settings

__all__ = ["InFiller", "BatchInFiller", "TemplateInFiller", "CounterfactualResult", "counterfactual", "grow_region",
           "fill_batch"]


@runtime_checkable
class InFiller(Protocol):
    """Replaces a region of an image with in-distribution, lesion-free content."""

    name: str

    def fill(self, image: Image, region: np.ndarray) -> Image:
        """``image`` with ``region`` (bool ``[k, j, i]`` on the image grid) replaced; same geometry."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-ready parameters, for provenance."""
        ...


@runtime_checkable
class BatchInFiller(InFiller, Protocol):
    """An in-filler that fills a batch of regions of one image in one call."""

    def fill_batch(self, image: Image, regions: np.ndarray) -> list[Image]:
        """One image per region of ``regions`` (bool ``(n, K, J, I)`` on the image grid), same geometry."""
        ...


def fill_batch(infiller: InFiller, image: Image, regions: np.ndarray) -> list[Image]:
    """``image`` with each of ``regions`` (bool ``(n, K, J, I)``, or one ``(K, J, I)``) in-filled: the
    in-filler's own ``fill_batch`` when it has one, else one ``fill`` per region."""
    regions = np.asarray(regions, dtype=bool)
    if regions.ndim == image.array.ndim:
        regions = regions[None]
    if regions.shape[1:] != image.array.shape:
        raise ValueError(f"regions of shape {regions.shape[1:]} do not match the image's {image.array.shape}")
    if isinstance(infiller, BatchInFiller):
        return list(infiller.fill_batch(image, regions))
    return [infiller.fill(image, r) for r in regions]


def grow_region(region: np.ndarray, spacing_kji: tuple[float, ...], mm: float) -> np.ndarray:
    """``region`` grown by ``mm`` in physical distance (anisotropic voxels allowed)."""
    if mm <= 0 or not region.any():
        return region.copy()
    # Distance only within the region's bounding box plus the margin: whole-volume EDTs are slow.
    pad = [int(np.ceil(mm / s)) + 1 for s in spacing_kji]
    idx = np.nonzero(region)
    box = tuple(slice(max(0, int(i.min()) - p), min(n, int(i.max()) + p + 1))
                for i, p, n in zip(idx, pad, region.shape, strict=True))
    dist = ndimage.distance_transform_edt(~region[box], sampling=spacing_kji)
    out = np.zeros_like(region, dtype=bool)
    out[box] = dist <= mm
    return out


class TemplateInFiller:
    """Fills a region with the registered, intensity-matched MNI152 template (module docstring).

    Args:
        registration: the image's registration to MNI.
        dilation_mm: growth of the region (default ``Settings.counterfactual_dilation_mm``).
        blend_mm: Gaussian sigma of the blend outside the grown region (default
            ``Settings.counterfactual_blend_mm``).
        settings: where the defaults come from (default ``Settings()``); kept for the warp.
    """

    name = "registered-template"

    def __init__(self, registration: RegistrationResult, dilation_mm: float | None = None,
                 blend_mm: float | None = None, *, settings: Settings | None = None):
        cfg = settings or Settings()
        self.settings = cfg
        self.registration = registration
        self.dilation_mm = cfg.counterfactual_dilation_mm if dilation_mm is None else float(dilation_mm)
        self.blend_mm = cfg.counterfactual_blend_mm if blend_mm is None else float(blend_mm)
        self.last_fit: dict[str, float] | None = None

    def describe(self) -> dict[str, Any]:
        d = {"infiller": self.name, "dilation_mm": self.dilation_mm, "blend_mm": self.blend_mm,
             "registration": self.registration.kind,
             "registration_likely_failed": self.registration.likely_failed}
        if self.last_fit:
            d["intensity_fit"] = self.last_fit
        return d

    def fill(self, image: Image, region: np.ndarray) -> Image:
        return self.fill_batch(image, np.asarray(region, dtype=bool)[None])[0]

    def fill_batch(self, image: Image, regions: np.ndarray) -> list[Image]:
        """One in-filled image per region of ``regions`` (bool ``(n, K, J, I)``); the template is warped once."""
        regions = np.asarray(regions, dtype=bool)
        if regions.shape[1:] != image.array.shape:
            raise ValueError(f"region shape {regions.shape[1:]} does not match image shape {image.array.shape}")
        tpl = None
        out = []
        for region in regions:
            if not region.any():
                out.append(image)
                continue
            if tpl is None:
                tpl = warp_from_mni(load_template(), self.registration, image, "linear", 0.0, settings=self.settings)
            out.append(self._fill_one(image, region, tpl))
        return out

    def _fill_one(self, image: Image, region: np.ndarray, tpl: np.ndarray) -> Image:
        sp = tuple(float(s) for s in image.spacing[::-1])
        grown = grow_region(region, sp, self.dilation_mm)
        a = np.asarray(image.array, dtype=np.float32)
        fill = self._matched(a, tpl, grown, sp)
        # Blend weight: 1 on the grown region, a Gaussian fall-off (sigma blend_mm) outside it.
        w = ndimage.gaussian_filter(grown.astype(np.float32), sigma=[self.blend_mm / s for s in sp])
        w = np.clip(w * 2.0, 0.0, 1.0)  # the smoothed edge sits at 0.5: stretch so the region is fully replaced
        w[grown] = 1.0
        w[w < 0.01] = 0.0  # the Gaussian's far tail: leave the rest of the image exactly as it was
        out = w * fill + (1.0 - w) * a
        return image.with_array(out.astype(image.array.dtype if np.issubdtype(image.array.dtype, np.floating)
                                          else np.float32))

    def _matched(self, a: np.ndarray, tpl: np.ndarray, grown: np.ndarray, sp: tuple[float, ...]) -> np.ndarray:
        """The warped template mapped to the input's intensities by a robust linear fit."""
        brain = tpl > 0.05 * float(tpl.max())
        shell = grow_region(grown, sp, 20.0) & ~grow_region(grown, sp, 3.0) & brain
        if shell.sum() < 200:
            shell = brain & ~grown
        x, y = tpl[shell].astype(np.float64), a[shell].astype(np.float64)
        if x.size < 2 or x.std() == 0:
            self.last_fit = {"slope": 0.0, "intercept": float(np.median(a[~grown])), "voxels": int(x.size)}
            return np.full_like(a, self.last_fit["intercept"])
        slope, intercept = np.polyfit(x, y, 1)
        res = y - (slope * x + intercept)
        mad = np.median(np.abs(res - np.median(res))) * 1.4826
        keep = np.abs(res) <= 3 * mad if mad > 0 else np.ones_like(res, bool)
        if keep.sum() >= 2:
            slope, intercept = np.polyfit(x[keep], y[keep], 1)
        pred = slope * x[keep] + intercept
        ss = float(((y[keep] - y[keep].mean()) ** 2).sum())
        r2 = 1.0 - float(((y[keep] - pred) ** 2).sum()) / ss if ss > 0 else 0.0
        self.last_fit = {"slope": round(float(slope), 4), "intercept": round(float(intercept), 3),
                         "r2": round(r2, 3), "voxels": int(keep.sum())}
        # Outside the template's brain (e.g. an extra-axial region) this gives the fitted background.
        return (slope * tpl + intercept).astype(np.float32)


@dataclass
class CounterfactualResult:
    """The prediction before and after in-filling a region.

    Attributes:
        infiller: how the region was filled (:meth:`InFiller.describe`).
        region_voxels / region_ml: the region as given (before any growth by the in-filler).
        label_before, p_before: predicted class and its calibrated probability on the original.
        label_after, p_after: predicted class and its probability on the in-filled image.
        p_before_class_after: the originally predicted class's probability on the in-filled image.
        change: ``p_before_class_after - p_before`` (negative: the region supported the prediction).
        lesion_probability_before / _after: ``1 - p(none)`` when the model has a ``none`` class.
        probabilities_before / _after: all calibrated class probabilities.
        sentence: the result in one sentence.
    """

    infiller: dict[str, Any]
    region_voxels: int
    region_ml: float
    label_before: str
    p_before: float
    label_after: str
    p_after: float
    p_before_class_after: float
    change: float
    lesion_probability_before: float | None
    lesion_probability_after: float | None
    probabilities_before: dict[str, float]
    probabilities_after: dict[str, float]
    sentence: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sentence(label_before: str, p_before: float, label_after: str, p_after: float, p_same: float) -> str:
    if label_after != label_before:
        return (f"Without this region the prediction would change from {label_before} (p = {p_before:.2f}) "
                f"to {label_after} (p = {p_after:.2f}).")
    if f"{p_same:.2f}" == f"{p_before:.2f}":
        return f"Without this region the prediction would stay {label_before} with p = {p_before:.2f}."
    verb = "fall" if p_same < p_before else "rise"
    return (f"Without this region the prediction would stay {label_before}, its probability would {verb} "
            f"from {p_before:.2f} to {p_same:.2f}.")


def counterfactual(image: Image, region: np.ndarray, model, infiller: InFiller,
                   prediction=None) -> CounterfactualResult:
    """Predict on ``image`` with ``region`` in-filled and compare with the original prediction.

    Args:
        image: the input (any geometry).
        region: bool ``[k, j, i]`` on the image grid (an explanation mask or any region).
        model: a :class:`~xai_core.models.LesionModel` (anything with ``predict(image)`` and ``classes``).
        infiller: an :class:`InFiller`, e.g. ``TemplateInFiller(registration)``.
        prediction: the model's prediction on ``image`` when already known (saves one forward pass).
    """
    region = np.asarray(region, dtype=bool)
    if not region.any():
        raise ValueError("the region is empty: there is nothing to in-fill")
    before = prediction if prediction is not None else model.predict(image)
    filled = infiller.fill(image, region)
    after = model.predict(filled)
    classes = list(model.classes)
    pb, pa = np.asarray(before.probabilities, float), np.asarray(after.probabilities, float)
    ib, ia = int(pb.argmax()), int(pa.argmax())
    lesion_b = lesion_a = None
    if "none" in classes:
        n = classes.index("none")
        lesion_b, lesion_a = round(float(1 - pb[n]), 4), round(float(1 - pa[n]), 4)
    return CounterfactualResult(
        infiller=infiller.describe(), region_voxels=int(region.sum()),
        region_ml=round(float(region.sum()) * float(np.prod(image.spacing)) / 1000.0, 3),
        label_before=classes[ib], p_before=round(float(pb[ib]), 4), label_after=classes[ia],
        p_after=round(float(pa[ia]), 4), p_before_class_after=round(float(pa[ib]), 4),
        change=round(float(pa[ib] - pb[ib]), 4), lesion_probability_before=lesion_b,
        lesion_probability_after=lesion_a,
        probabilities_before={c: round(float(v), 4) for c, v in zip(classes, pb, strict=True)},
        probabilities_after={c: round(float(v), 4) for c, v in zip(classes, pa, strict=True)},
        sentence=_sentence(classes[ib], float(pb[ib]), classes[ia], float(pa[ia]), float(pa[ib])),
    )

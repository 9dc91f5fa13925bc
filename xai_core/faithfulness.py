"""Faithfulness of a saliency map: deletion and insertion curves (MoRF / LeRF), their areas, AOPC.

A map is faithful when the regions it ranks highest are the ones the model's decision rests on.
Region perturbation (Samek et al. 2017) tests this by replacing regions in rank order and watching
the target class's probability:

* **deletion, MoRF** (most relevant first): regions are removed from the image, highest saliency
  first. A faithful map makes the probability fall at once: a small area under the curve, a large
  AOPC (area over the perturbation curve, ``mean_k f(x_0) - f(x_k)``).
* **deletion, LeRF** (least relevant first): the same, lowest saliency first. A faithful map keeps
  the probability up until the relevant regions are reached: a large area.
* **insertion** (Petsiuk et al. 2018): start from the fully filled image and restore regions,
  MoRF (a faithful map brings the probability back at once: a large area) or LeRF (a small area).

ABPC = AUC(deletion LeRF) - AUC(deletion MoRF) (Schulz et al. 2020) summarises both deletion
orders in one number (higher is better, 0 for a random ranking).

Regions and fills (one set of defaults, :class:`~xai_core.settings.Settings`, block "Faithfulness
and sanity"): the model grid is cut into cubes (squares for 2-D inputs) of
``faithfulness_patch_mm``; only cubes that hold foreground take part and only their foreground
voxels are filled, so a step never paints tissue into the background. Cubes are ranked by their mean
saliency (ties by position, so the order is reproducible). Step ``k`` of ``faithfulness_steps``
removes the first ``c_k`` of the ``n`` cubes (:func:`step_counts`): ``round(k n / steps)`` on the
``linear`` schedule, or, on the ``log`` schedule (the default), counts spaced geometrically from 1 cube
up to half of them and mirrored down from ``n``. A lesion covers a few of a brain's ~300 cubes, so on a
linear schedule every method's MoRF curve falls within the first step and every LeRF curve within the
last one; the log schedule samples both ends. Areas are still taken over the removed fraction
(trapezoids on the uneven points); AOPC is the mean drop over the points. The fill is one of

* ``blur``: the image smoothed with a Gaussian of ``faithfulness_blur_mm`` (removes local detail, keeps
  the brightness of the neighbourhood);
* ``mean``: the mean foreground intensity (a flat grey cube);
* ``template``: the MNI152 template registered to the study and matched to its intensities
  (:class:`~xai_core.counterfactual.TemplateInFiller`: healthy anatomy instead of a lesion);
* ``mae``: the shipped masked autoencoder (:mod:`xai_core.mae`, :class:`~xai_core.explain.fills.MAEFill`)
  reconstructs the removed cubes from the visible ones on the model grid (3-D single-channel inputs);
* any :class:`~xai_core.counterfactual.InFiller`, passed in or registered by name with
  :func:`register_infiller`.

The score is the target class's softmax probability (at the model card's temperature); curves are in
probability units, areas over the removed fraction 0..1.

Cost: ``2 (steps + 1)`` forward passes per curve pair (deletion MoRF + LeRF); insertion as many again.
On the default model (64^3, class path only) that is about 0.1 s per forward on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from .counterfactual import InFiller
from .io import Image
from .settings import Settings

__all__ = ["CURVES", "Curve", "FaithfulnessResult", "ArrayFill", "perturbation_curves", "cube_ranking",
           "make_fill", "register_infiller", "registered_infillers", "faithfulness", "aopc", "curve_auc",
           "ScoreFn", "step_counts", "SCHEDULES"]

CURVES = ("deletion_morf", "deletion_lerf", "insertion_morf", "insertion_lerf")
SCHEDULES = ("linear", "log")

# fill(x (C, *S) float32, region (*S) bool) -> (C, *S): the image with ``region`` replaced.
ArrayFill = Callable[[np.ndarray, np.ndarray], np.ndarray]
# score(batch (N, C, *S) float32) -> (N,) probability of the target class.
ScoreFn = Callable[[np.ndarray], np.ndarray]

_INFILLERS: dict[str, Callable[..., InFiller]] = {}


def register_infiller(name: str, factory: Callable[..., InFiller]) -> None:
    """Make ``factory(image=..., registration=..., settings=...) -> InFiller`` available as the fill
    ``name`` (for example the MAE in-filler as ``"mae"``)."""
    _INFILLERS[name.lower()] = factory


def registered_infillers() -> list[str]:
    return sorted(_INFILLERS)


@dataclass
class Curve:
    """One perturbation curve: ``scores[k]`` after step ``k`` (``fractions[k]`` of the cubes)."""

    name: str
    fractions: list[float]
    scores: list[float]

    @property
    def auc(self) -> float:
        return curve_auc(self.fractions, self.scores)

    @property
    def aopc(self) -> float:
        return aopc(self.scores)


def curve_auc(fractions: Sequence[float], scores: Sequence[float]) -> float:
    """Trapezoidal area under ``scores`` over ``fractions`` (0..1): in probability units."""
    x, y = np.asarray(fractions, float), np.asarray(scores, float)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def aopc(scores: Sequence[float]) -> float:
    """Area over the perturbation curve (Samek et al. 2017): ``mean_{k=0..L} (f(x_0) - f(x_k))``."""
    y = np.asarray(scores, float)
    return float(np.mean(y[0] - y))


@dataclass
class FaithfulnessResult:
    """The curves of one map and their summaries.

    Attributes:
        curves: by name (:data:`CURVES`), those that were computed.
        target: the class index scored.
        fill: how removed cubes were filled (``describe()`` of the fill).
        patch_voxels: cube side per spatial axis, model-grid voxels.
        n_cubes: cubes that took part (those holding foreground).
        seconds: wall time of all forwards.
    """

    curves: dict[str, Curve]
    target: int
    fill: dict[str, Any]
    patch_voxels: tuple[int, ...]
    n_cubes: int
    seconds: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Flat numbers for a table: ``auc_<curve>``, ``aopc_morf`` / ``aopc_lerf`` (deletion), ``abpc``."""
        out: dict[str, float] = {}
        for name, c in self.curves.items():
            out[f"auc_{name}"] = c.auc
        if "deletion_morf" in self.curves:
            out["aopc_morf"] = self.curves["deletion_morf"].aopc
        if "deletion_lerf" in self.curves:
            out["aopc_lerf"] = self.curves["deletion_lerf"].aopc
        if "deletion_morf" in self.curves and "deletion_lerf" in self.curves:
            out["abpc"] = out["auc_deletion_lerf"] - out["auc_deletion_morf"]
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = self.summary()
        return d


# ----------------------------------------------------------------------------------------------------------
# Cubes
# ----------------------------------------------------------------------------------------------------------


def _cube_labels(shape: Sequence[int], patch: Sequence[int]) -> tuple[np.ndarray, int]:
    """Integer cube index per voxel ``(*shape)`` for cubes of ``patch`` voxels, and the cube count."""
    grids = np.meshgrid(*[np.arange(s) // p for s, p in zip(shape, patch, strict=True)], indexing="ij")
    counts = [int(np.ceil(s / p)) for s, p in zip(shape, patch, strict=True)]
    return np.ravel_multi_index(grids, counts), int(np.prod(counts))


def cube_ranking(saliency: np.ndarray, patch: Sequence[int], foreground: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cubes of ``patch`` voxels ranked by mean saliency over their foreground voxels.

    Returns ``(labels (*S) int, order (n,) cube ids, most relevant first, scores (n,))``; cubes with no
    foreground are left out of ``order``. Ties keep the cubes' raster order (stable sort).
    """
    sal = np.asarray(saliency, np.float64)
    fg = np.ones(sal.shape, bool) if foreground is None else np.asarray(foreground, bool)
    labels, n = _cube_labels(sal.shape, patch)
    count = np.bincount(labels[fg], minlength=n)
    total = np.bincount(labels[fg], weights=sal[fg], minlength=n)
    ids = np.nonzero(count > 0)[0]
    mean = total[ids] / count[ids]
    order = ids[np.argsort(-mean, kind="stable")]
    return labels, order, total[order] / count[order]


# ----------------------------------------------------------------------------------------------------------
# Fills
# ----------------------------------------------------------------------------------------------------------


def step_counts(n: int, steps: int, schedule: str = "linear") -> list[int]:
    """Cubes removed at each curve point: ``[0, c_1, ..., n]``, non-decreasing.

    ``linear``: ``c_k = round(k n / steps)``, ``steps + 1`` points. ``log``: dense at both ends, where
    the two deletion orders reach the evidence: ``ceil(steps / 2)`` counts geometric from 1 to ``n / 2``,
    their mirror ``n - c``, and ``n``; repeated counts dropped (about ``steps + 1`` points, fewer when
    ``n`` is small). MoRF removes a lesion's few cubes among the first counts, LeRF among the last.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if n < 1:
        raise ValueError("no cubes to remove")
    if schedule == "linear":
        return [int(round(k * n / steps)) for k in range(steps + 1)]
    if schedule == "log":
        if steps == 1:
            return [0, n]
        half = np.rint(np.geomspace(1, n / 2, -(-steps // 2))).astype(int)
        return sorted({0, n, *(int(c) for c in half), *(n - int(c) for c in half)})
    raise ValueError(f"unknown schedule {schedule!r}: use one of {list(SCHEDULES)}")


def _where(x: np.ndarray, region: np.ndarray, fill: np.ndarray) -> np.ndarray:
    return np.where(region[None], fill, x).astype(np.float32)


def make_fill(fill: str | InFiller, x: np.ndarray, *, spacing: Sequence[float], foreground: np.ndarray | None = None,
              settings: Settings | None = None, grid_image: Image | None = None, registration: Any = None
              ) -> tuple[ArrayFill, dict[str, Any]]:
    """The fill function for image ``x (C, *S)`` and its description.

    Args:
        fill: ``'blur'``, ``'mean'``, ``'template'``, a name given to :func:`register_infiller`, or an
            :class:`~xai_core.counterfactual.InFiller` object.
        spacing: voxel size per spatial axis of ``x``, mm (array order).
        foreground: bool ``(*S)``; the mean fill averages over it (default: every voxel).
        grid_image: ``x``'s grid as an :class:`~xai_core.io.Image` (geometry used by in-fillers, which
            see channel 0 only: the volumes here have one channel).
        registration: the study's registration to MNI (the ``template`` fill; registered in-fillers get it too).
    """
    cfg = settings or Settings()
    x = np.asarray(x, np.float32)
    if isinstance(fill, str):
        name = fill.lower()
        if name == "blur":
            sigma = [cfg.faithfulness_blur_mm / s for s in spacing]
            blurred = np.stack([ndimage.gaussian_filter(c, sigma=sigma, mode="nearest") for c in x])
            return (lambda a, r: _where(a, r, blurred)), {"fill": "blur", "sigma_mm": cfg.faithfulness_blur_mm}
        if name == "mean":
            fg = np.ones(x.shape[1:], bool) if foreground is None else np.asarray(foreground, bool)
            means = np.array([float(c[fg].mean()) if fg.any() else float(c.mean()) for c in x], np.float32)
            const = np.broadcast_to(means.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
            return (lambda a, r: _where(a, r, const)), {"fill": "mean", "values": [round(float(m), 6) for m in means]}
        if name == "template":
            if registration is None:
                raise ValueError("the 'template' fill needs the study's registration to MNI152 "
                                 "(xai_core.registration.register_to_mni)")
            from .counterfactual import TemplateInFiller

            infiller: InFiller = TemplateInFiller(registration, settings=cfg)
        elif name in _INFILLERS:
            infiller = _INFILLERS[name](image=grid_image, registration=registration, settings=cfg)
        elif name == "mae":
            return _mae_fill(x)
        else:
            raise ValueError(f"unknown fill {fill!r}: use 'blur', 'mean', 'template', 'mae' or a registered "
                             f"in-filler {registered_infillers()}")
    else:
        infiller = fill
    if not isinstance(infiller, InFiller):
        raise TypeError(f"{type(infiller).__name__} is not an InFiller (name, fill(image, region), describe())")
    if grid_image is None:
        raise ValueError(f"the in-filler {infiller.name!r} needs the grid of the image as an Image (grid_image=)")

    def through_infiller(a: np.ndarray, r: np.ndarray) -> np.ndarray:
        if not r.any():
            return a.astype(np.float32)
        out = a.copy()
        # In-fillers fill one scalar volume; the models here have one input channel.
        out[0] = infiller.fill(grid_image.with_array(np.ascontiguousarray(a[0])), r).array
        return out.astype(np.float32)

    return through_infiller, {"fill": infiller.name, **infiller.describe()}


def _mae_fill(x: np.ndarray) -> tuple[ArrayFill, dict[str, Any]]:
    """The shipped MAE's reconstruction of the removed cubes, on the model grid of ``x (1, K, J, I)``."""
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"the 'mae' fill takes single-channel 3-D inputs (1, K, J, I), got {tuple(x.shape)}")
    from .explain.fills import MAEFill

    mae = MAEFill()

    def by_mae(a: np.ndarray, r: np.ndarray) -> np.ndarray:
        if not r.any():
            return a.astype(np.float32)
        with torch.no_grad():
            out = mae(torch.from_numpy(np.ascontiguousarray(a, np.float32))[None], torch.from_numpy(r)[None])
        return out[0].numpy().astype(np.float32)

    return by_mae, mae.describe()


# ----------------------------------------------------------------------------------------------------------
# Curves
# ----------------------------------------------------------------------------------------------------------


def perturbation_curves(score: ScoreFn, x: np.ndarray, saliency: np.ndarray, *, patch: int | Sequence[int],
                        steps: int, fill: ArrayFill, foreground: np.ndarray | None = None,
                        curves: Sequence[str] = ("deletion_morf", "deletion_lerf"), batch: int = 8,
                        schedule: str = "linear") -> tuple[dict[str, Curve], int]:
    """Deletion / insertion curves of one map, in any number of spatial dimensions.

    Args:
        score: batch ``(N, C, *S)`` -> ``(N,)`` target-class probability.
        x: the unperturbed input ``(C, *S)``.
        saliency: ``(*S)`` map on the same grid (higher = more important; any scale).
        patch: cube side in voxels (one int, or one per spatial axis).
        steps: curve points after the start; step ``k`` has ``c_k`` of the ``n`` cubes removed
            (deletion) or restored (insertion), ``c_k`` from :func:`step_counts` with ``schedule``.
        fill: replaces a region (:func:`make_fill`).
        foreground: bool ``(*S)``; only cubes holding foreground take part, and only their foreground voxels
            are changed (default: all voxels).
        curves: which of :data:`CURVES` to compute.
        batch: perturbed inputs per call of ``score``.
        schedule: ``'linear'`` or ``'log'`` (:func:`step_counts`).

    Returns:
        ``({name: Curve}, number of cubes)``.
    """
    x = np.asarray(x, np.float32)
    sal = np.asarray(saliency)
    if sal.shape != x.shape[1:]:
        raise ValueError(f"saliency shape {sal.shape} does not match the input's spatial shape {x.shape[1:]}")
    unknown = set(curves) - set(CURVES)
    if unknown:
        raise ValueError(f"unknown curves {sorted(unknown)}; choose from {CURVES}")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    p = (patch,) * sal.ndim if isinstance(patch, int | np.integer) else tuple(int(v) for v in patch)
    fg = np.ones(sal.shape, bool) if foreground is None else np.asarray(foreground, bool)
    labels, order, _ = cube_ranking(sal, p, fg)
    n = len(order)
    if n == 0:
        raise ValueError("no foreground: nothing to perturb")
    counts = step_counts(n, steps, schedule)
    fractions = [c / n for c in counts]
    # rank[cube id] = position in the MoRF order (cubes outside the foreground: never touched).
    rank = np.full(int(labels.max()) + 1, n, dtype=np.int64)
    rank[order] = np.arange(n)
    vox_rank = np.where(fg, rank[labels], n)

    def region(c: int, most_first: bool) -> np.ndarray:
        """The foreground voxels of the first ``c`` cubes in MoRF (or LeRF) order."""
        return vox_rank < c if most_first else (vox_rank >= n - c) & (vox_rank < n)

    jobs: list[tuple[str, int]] = []
    images: list[np.ndarray] = []
    for name in curves:
        insertion, most_first = name.startswith("insertion"), name.endswith("morf")
        for c in counts:
            if insertion:
                # Restore the first c cubes: everything else that takes part stays filled.
                removed = fg & (vox_rank < n) & ~region(c, most_first)
            else:
                removed = region(c, most_first)
            jobs.append((name, c))
            images.append(fill(x, removed))
    scores = np.concatenate([np.asarray(score(np.stack(images[i:i + batch])), np.float64).reshape(-1)
                             for i in range(0, len(images), batch)])
    out: dict[str, Curve] = {}
    for name in curves:
        vals = [float(s) for (nm, _), s in zip(jobs, scores, strict=True) if nm == name]
        out[name] = Curve(name=name, fractions=list(fractions), scores=vals)
    return out, n


def faithfulness(model: Any, inputs: Any, saliency: np.ndarray | torch.Tensor, target: int, *,
                 settings: Settings | None = None, fill: str | InFiller | None = None,
                 curves: Sequence[str] = CURVES, foreground: np.ndarray | None = None,
                 registration: Any = None, spacing: Sequence[float] | None = None) -> FaithfulnessResult:
    """Deletion and insertion curves of a map on a model adapter's input.

    Args:
        model: a :class:`~xai_core.models.ModelAdapter` (its ``forward_func()`` scores the perturbed inputs).
        inputs: the :class:`~xai_core.models.ModelInput` the map explains (input 0 is perturbed; further
            inputs and ``additional_forward_args`` are passed unchanged).
        saliency: ``(*S)`` map on input 0's grid (the model grid), e.g. ``Attribution.maps[0, t]``.
        target: class index whose probability is followed.
        settings: patch size, steps, fill, batch, foreground threshold (default ``Settings()``).
        fill: overrides ``settings.faithfulness_fill`` (a name or an InFiller).
        curves: which of :data:`CURVES`.
        foreground: bool ``(*S)`` (default: channel 0 above ``settings.faithfulness_foreground``, the
            pipeline's brain rule on normalised intensity).
        registration: the study's MNI registration (``template`` fill).
        spacing: model-grid voxel size per axis, mm (default: the card's ``grid_spacing_mm``).
    """
    import time

    cfg = settings or Settings()
    x_t = inputs.inputs[0]
    x = x_t[0].detach().float().cpu().numpy()  # (C, *S)
    sal = saliency.detach().float().cpu().numpy() if isinstance(saliency, torch.Tensor) else np.asarray(saliency)
    nd = sal.ndim
    if spacing is None:
        spacing = (float(getattr(model.card, "grid_spacing_mm", 1.0)),) * nd
    fg = (x[0] > cfg.faithfulness_foreground) if foreground is None else np.asarray(foreground, bool)
    patch = tuple(max(1, int(round(cfg.faithfulness_patch_mm / s))) for s in spacing)
    grid_image = None
    if getattr(inputs, "ref", None) is not None and nd == 3:
        grid_image = Image.from_sitk(inputs.ref)
    fill_fn, fill_desc = make_fill(fill or cfg.faithfulness_fill, x, spacing=spacing, foreground=fg, settings=cfg,
                                   grid_image=grid_image, registration=registration)
    forward = model.forward_func()
    rest = tuple(inputs.inputs[1:])
    extra = tuple(getattr(inputs, "additional_forward_args", ()) or ())
    temperature = float(getattr(model.card, "temperature", 1.0) or 1.0)
    device, dtype = x_t.device, x_t.dtype

    @torch.no_grad()
    def score(batch: np.ndarray) -> np.ndarray:
        xb = torch.from_numpy(batch).to(device=device, dtype=dtype)
        more = tuple(r.expand(len(batch), *r.shape[1:]) for r in rest)
        logits = forward(xb, *more, *extra)
        logits = logits if isinstance(logits, torch.Tensor) else logits[0]
        return torch.softmax(logits.float() / temperature, dim=-1)[:, target].cpu().numpy()

    t = time.perf_counter()
    out, n = perturbation_curves(score, x, sal, patch=patch, steps=cfg.faithfulness_steps, fill=fill_fn,
                                 foreground=fg, curves=curves, batch=cfg.faithfulness_batch,
                                 schedule=cfg.faithfulness_schedule)
    return FaithfulnessResult(curves=out, target=int(target), fill=fill_desc, patch_voxels=patch, n_cubes=n,
                              seconds=time.perf_counter() - t,
                              extras={"patch_mm": cfg.faithfulness_patch_mm, "steps": cfg.faithfulness_steps,
                                      "schedule": cfg.faithfulness_schedule})

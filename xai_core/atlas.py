"""Anatomical labelling of a region (explanation mask or ground truth) from the input's own space.

The region and, when given, the saliency map are pulled into MNI152 space with a
:class:`~xai_core.registration.RegistrationResult` (nearest neighbour for the binary mask, linear for
the map) onto the 1 mm template grid, where the Harvard-Oxford max-probability label map
(:func:`xai_core.mni.load_harvard_oxford`, best probability >= 25 %) is read.

Per structure (``StructureOverlap``)
    ``fraction``: share of the mask's MNI voxels whose label is the structure;
    ``volume_ml``: that share of the mask's volume measured on the input grid (so the figure is in
    the patient's millilitres, not the template's);
    ``mean_probability``: mean Harvard-Oxford probability (0..1) of the structure over the overlap.
    At those voxels the structure is the most probable label, so this is the mean of the atlas's
    best probability there: a low value says the region sits where the atlas itself is unsure
    (boundaries), no 4-D probability volume is needed;
    ``saliency_share`` (with a map): share of the map's mass over the template brain that lies in the
    structure, a threshold-free view of where the map points.

Hemisphere
    MNI's midline is x = 0; in LPS x > 0 is the patient's **left** (the atlas's ``Left_`` structures
    lie there). Components are the mask's 26-connected parts in MNI space; those holding at least
    ``atlas_min_component_fraction`` (5 %) of the mask are its significant parts. One significant
    part: the side holding most of its voxels, so a single mass straddling the midline keeps its
    majority side, as the generator's ground truth does (the side of its centre). Several: the
    region is ``bilateral`` when each side holds at least that same 5 % of the mask's voxels (two
    metastases, or a diffuse map), else the side holding most. ``crosses_midline`` is set when a
    significant part has at least ``atlas_crossing_fraction`` (25 %) of its voxels on its smaller
    side; ``left_fraction`` gives the split.

Coordinates
    Centroid and peak are reported in **MNI RAS mm** (x to the right of the patient is negative;
    the convention of MNI coordinate tables and of FSL/SPM viewers): RAS = (-x, -y, z) of LPS.

Lobes
    :data:`LOBES` maps each Harvard-Oxford structure to frontal, parietal, temporal, occipital,
    insula, limbic (cingulate, parahippocampal, subcallosal cortex, hippocampus, amygdala),
    subcortical (deep grey nuclei and the lateral ventricles) or brainstem.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .io import Image
from .mni import HarvardOxford, load_harvard_oxford, load_template
from .registration import RegistrationResult
from .settings import Settings

__all__ = ["LOBES", "lobe_of", "readable_name", "StructureOverlap", "Labelling", "label_region", "lps_to_ras"]

# Harvard-Oxford structure (side prefix removed) -> lobe. Explicit, so a reader can check it.
LOBES: dict[str, str] = {
    # frontal
    "Frontal_Pole": "frontal", "Superior_Frontal_Gyrus": "frontal", "Middle_Frontal_Gyrus": "frontal",
    "Inferior_Frontal_Gyrus_pars_triangularis": "frontal", "Inferior_Frontal_Gyrus_pars_opercularis": "frontal",
    "Precentral_Gyrus": "frontal", "Frontal_Medial_Cortex": "frontal",
    "Juxtapositional_Lobule_Cortex_(formerly_Supplementary_Motor_Cortex)": "frontal",
    "Paracingulate_Gyrus": "frontal",  # medial frontal gyrus (BA 32), not the cingulate proper
    "Frontal_Orbital_Cortex": "frontal", "Frontal_Operculum_Cortex": "frontal",
    "Central_Opercular_Cortex": "frontal",  # subcentral gyrus, counted with the frontal operculum
    # temporal
    "Temporal_Pole": "temporal", "Superior_Temporal_Gyrus_anterior_division": "temporal",
    "Superior_Temporal_Gyrus_posterior_division": "temporal", "Middle_Temporal_Gyrus_anterior_division": "temporal",
    "Middle_Temporal_Gyrus_posterior_division": "temporal",
    "Middle_Temporal_Gyrus_temporooccipital_part": "temporal",
    "Inferior_Temporal_Gyrus_anterior_division": "temporal",
    "Inferior_Temporal_Gyrus_posterior_division": "temporal",
    "Inferior_Temporal_Gyrus_temporooccipital_part": "temporal",
    "Temporal_Fusiform_Cortex_anterior_division": "temporal",
    "Temporal_Fusiform_Cortex_posterior_division": "temporal",
    "Temporal_Occipital_Fusiform_Cortex": "temporal", "Planum_Polare": "temporal",
    "Heschl's_Gyrus_(includes_H1_and_H2)": "temporal", "Planum_Temporale": "temporal",
    # parietal
    "Postcentral_Gyrus": "parietal", "Superior_Parietal_Lobule": "parietal",
    "Supramarginal_Gyrus_anterior_division": "parietal", "Supramarginal_Gyrus_posterior_division": "parietal",
    "Angular_Gyrus": "parietal", "Precuneous_Cortex": "parietal", "Parietal_Operculum_Cortex": "parietal",
    # occipital
    "Lateral_Occipital_Cortex_superior_division": "occipital",
    "Lateral_Occipital_Cortex_inferior_division": "occipital", "Intracalcarine_Cortex": "occipital",
    "Cuneal_Cortex": "occipital", "Lingual_Gyrus": "occipital", "Occipital_Fusiform_Gyrus": "occipital",
    "Supracalcarine_Cortex": "occipital", "Occipital_Pole": "occipital",
    # insula
    "Insular_Cortex": "insula",
    # limbic
    "Cingulate_Gyrus_anterior_division": "limbic", "Cingulate_Gyrus_posterior_division": "limbic",
    "Parahippocampal_Gyrus_anterior_division": "limbic", "Parahippocampal_Gyrus_posterior_division": "limbic",
    "Subcallosal_Cortex": "limbic", "Hippocampus": "limbic", "Amygdala": "limbic",
    # subcortical (the atlas's own spelling "Ventrical" for the left ventricle is kept)
    "Lateral_Ventrical": "subcortical", "Lateral_Ventricle": "subcortical", "Thalamus": "subcortical",
    "Caudate": "subcortical", "Putamen": "subcortical", "Pallidum": "subcortical", "Accumbens": "subcortical",
    # brainstem
    "Brain-Stem": "brainstem",
}


def _base(name: str) -> str:
    for prefix in ("Left_", "Right_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def lobe_of(name: str) -> str:
    """Lobe of a Harvard-Oxford structure name (``KeyError`` for a name outside :data:`LOBES`)."""
    return LOBES[_base(name)]


def readable_name(name: str) -> str:
    """``Left_Superior_Frontal_Gyrus`` -> ``left superior frontal gyrus`` (the atlas's spelling kept)."""
    text = name.replace("_(formerly_Supplementary_Motor_Cortex)", "").replace("_(includes_H1_and_H2)", "")
    text = text.replace("Lateral_Ventrical", "Lateral_Ventricle").replace("Brain-Stem", "brainstem")
    return text.replace("_", " ").lower()


def lps_to_ras(xyz: np.ndarray) -> np.ndarray:
    """LPS mm -> RAS mm (x and y change sign)."""
    return np.asarray(xyz, dtype=float) * np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class StructureOverlap:
    """The part of a region inside one Harvard-Oxford structure (definitions in the module docstring)."""

    name: str  # atlas name, e.g. "Left_Superior_Frontal_Gyrus"
    label: str  # readable, e.g. "left superior frontal gyrus"
    lobe: str
    hemisphere: str  # "left", "right" or "midline" (brainstem)
    volume_ml: float
    fraction: float
    mean_probability: float
    saliency_share: float | None = None


@dataclass
class Labelling:
    """Where a region lies in MNI space.

    Attributes:
        structures: overlaps of at least ``atlas_min_structure_fraction`` of the mask, largest first,
            at most ``atlas_max_structures``.
        lobes: lobe -> share of the mask, largest first (all structures counted).
        hemisphere: ``left``, ``right``, ``bilateral`` or ``none`` (empty region).
        left_fraction: share of the mask's MNI voxels on the patient's left (x_LPS > 0).
        crosses_midline: a component of the mask straddles the midline (module docstring).
        outside_atlas_fraction: share of the mask with no atlas label (white matter, outside the
            brain, or atlas probability below 25 %).
        centroid_mni_ras_mm: centre of the mask in MNI, RAS mm (None when empty).
        peak_mni_ras_mm: the saliency map's maximum over the template brain, RAS mm (None without map).
        peak_structure: atlas structure at the peak (None when unlabelled or no map).
        volume_ml: the mask's volume on the input grid.
        components: connected components of the mask in MNI space.
        mni_voxels: the mask's voxels on the 1 mm MNI grid.
        registration_failed: the registration used was flagged ``likely_failed``.
    """

    structures: list[StructureOverlap]
    lobes: dict[str, float]
    hemisphere: str
    left_fraction: float | None
    crosses_midline: bool
    outside_atlas_fraction: float | None
    centroid_mni_ras_mm: tuple[float, float, float] | None
    peak_mni_ras_mm: tuple[float, float, float] | None
    peak_structure: str | None
    volume_ml: float
    components: int
    mni_voxels: int
    registration_failed: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def top_structure(self) -> str | None:
        return self.structures[0].name if self.structures else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["top_structure"] = self.top_structure
        return d


def _mm(v) -> tuple[float, float, float]:
    return tuple(round(float(x), 1) for x in v)  # type: ignore[return-value]


def _hemisphere(mask_mni: np.ndarray, x_lps_of_i: np.ndarray, *,
                settings: Settings | None = None) -> tuple[str, bool, int]:
    """Side of a non-empty MNI mask (rule in the module docstring), whether a significant part
    crosses the midline, and the number of components (fractions from ``settings``)."""
    cfg = settings or Settings()
    lab, n = ndimage.label(mask_mni, structure=np.ones((3, 3, 3), bool))
    left_col = x_lps_of_i > 0  # along i (the template's i axis is LPS x)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    kk, jj, ii = np.nonzero(lab)
    left = np.bincount(lab[kk, jj, ii] - 1, weights=left_col[ii].astype(float), minlength=n)
    total = float(sizes.sum())
    big = sizes >= cfg.atlas_min_component_fraction * total
    if not big.any():
        big = sizes == sizes.max()
    lf_part = left[big] / sizes[big]
    crossing = bool((np.minimum(lf_part, 1 - lf_part) >= cfg.atlas_crossing_fraction).any())
    if big.sum() == 1:
        return ("left" if lf_part[0] >= 0.5 else "right"), crossing, n
    lf = float(left.sum()) / total
    if min(lf, 1 - lf) >= cfg.atlas_min_component_fraction:
        return "bilateral", crossing, n
    return ("left" if lf >= 0.5 else "right"), crossing, n


def label_region(mask: Image, registration: RegistrationResult, saliency: Image | None = None, *,
                 atlas: HarvardOxford | None = None, settings: Settings | None = None) -> Labelling:
    """Label ``mask`` (any non-zero voxel is in; input grid) with the Harvard-Oxford atlas.

    Args:
        mask: binary region on the input grid (explanation mask or ground truth).
        registration: the input's registration to MNI (:func:`~xai_core.registration.register_to_mni`).
        saliency: optional saliency map on the same grid (peak and per-structure saliency share).
        atlas: the atlas (default :func:`~xai_core.mni.load_harvard_oxford`).
        settings: the ``atlas_*`` limits (default ``Settings()``).

    Returns:
        a :class:`Labelling`; an empty mask gives no structures and hemisphere ``none``.
    """
    cfg = settings or Settings()
    atlas = atlas or load_harvard_oxford()
    template = load_template()
    ref = atlas.reference
    m = np.asarray(mask.array) > 0
    volume_ml = float(m.sum()) * float(np.prod(mask.spacing)) / 1000.0
    notes = []
    if registration.likely_failed:
        notes.append(f"registration likely failed ({registration.reason}): anatomical labels are unreliable")

    mask_img = mask.with_array(m.astype(np.uint8)).to_sitk()
    mask_mni = sitk.GetArrayFromImage(sitk.Resample(mask_img, ref, registration.resampling_transform(settings=cfg),
                                                    sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0
    # The template's i axis is LPS x; the physical x of each i column decides the side.
    if not np.allclose(np.abs(np.reshape(template.GetDirection(), (3, 3))), np.eye(3)):
        raise ValueError("the MNI template grid is not axis-aligned; the midline test assumes it is")
    n_i = ref.GetSize()[0]
    x_of_i = np.array([template.TransformIndexToPhysicalPoint([i, 0, 0])[0] for i in range(n_i)])

    peak = peak_structure = None
    sal_mni = None
    if saliency is not None:
        sal_img = saliency.with_array(np.asarray(saliency.array, dtype=np.float32)).to_sitk()
        sal_mni = sitk.GetArrayFromImage(sitk.Resample(sal_img, ref, registration.resampling_transform(settings=cfg),
                                                       sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        brain = sitk.GetArrayViewFromImage(template) > 0
        sal_mni = np.where(brain, np.clip(sal_mni, 0, None), 0.0)
        if sal_mni.max() > 0:
            pk = np.unravel_index(int(np.argmax(sal_mni)), sal_mni.shape)
            peak = _mm(lps_to_ras(template.TransformIndexToPhysicalPoint([int(v) for v in pk[::-1]])))
            lab_at = int(atlas.labels[pk])
            peak_structure = atlas.names[lab_at - 1] if lab_at else None

    n_vox = int(mask_mni.sum())
    if n_vox == 0:
        if m.any():
            notes.append("the region maps outside the MNI field of view")
        return Labelling(structures=[], lobes={}, hemisphere="none", left_fraction=None, crosses_midline=False,
                         outside_atlas_fraction=None, centroid_mni_ras_mm=None, peak_mni_ras_mm=peak,
                         peak_structure=peak_structure, volume_ml=round(volume_ml, 3), components=0, mni_voxels=0,
                         registration_failed=registration.likely_failed, notes=notes)

    labels_in = atlas.labels[mask_mni].astype(np.int64)
    counts = np.bincount(labels_in, minlength=len(atlas.names) + 1)
    prob_sum = np.bincount(labels_in, weights=atlas.max_prob[mask_mni].astype(float), minlength=len(counts))
    sal_share = None
    if sal_mni is not None:
        total_mass = float(sal_mni.sum())
        if total_mass > 0:
            sal_share = np.bincount(atlas.labels.ravel().astype(np.int64), weights=sal_mni.ravel(),
                                    minlength=len(counts)) / total_mass
    structures = []
    for s in np.argsort(-counts[1:], kind="stable") + 1:
        frac = counts[s] / n_vox
        if counts[s] == 0 or frac < cfg.atlas_min_structure_fraction or len(structures) >= cfg.atlas_max_structures:
            break
        name = atlas.names[s - 1]
        structures.append(StructureOverlap(
            name=name, label=readable_name(name), lobe=lobe_of(name), hemisphere=HarvardOxford.hemisphere_of(name),
            volume_ml=round(float(frac * volume_ml), 3), fraction=round(float(frac), 4),
            mean_probability=round(float(prob_sum[s] / counts[s] / 100.0), 3),
            saliency_share=None if sal_share is None else round(float(sal_share[s]), 4)))
    lobes: dict[str, float] = {}
    for s in np.nonzero(counts[1:])[0] + 1:
        lobe = lobe_of(atlas.names[s - 1])
        lobes[lobe] = lobes.get(lobe, 0.0) + counts[s] / n_vox
    lobes = {k: round(float(v), 4) for k, v in sorted(lobes.items(), key=lambda kv: -kv[1])}

    hemisphere, crossing, n_comp = _hemisphere(mask_mni, x_of_i, settings=cfg)
    kk, jj, ii = np.nonzero(mask_mni)
    centroid = template.TransformContinuousIndexToPhysicalPoint([float(ii.mean()), float(jj.mean()), float(kk.mean())])
    return Labelling(
        structures=structures, lobes=lobes, hemisphere=hemisphere,
        left_fraction=round(float((x_of_i[ii] > 0).mean()), 4), crosses_midline=crossing,
        outside_atlas_fraction=round(float(counts[0] / n_vox), 4),
        centroid_mni_ras_mm=_mm(lps_to_ras(centroid)), peak_mni_ras_mm=peak, peak_structure=peak_structure,
        volume_ml=round(volume_ml, 3), components=n_comp, mni_voxels=n_vox,
        registration_failed=registration.likely_failed, notes=notes)

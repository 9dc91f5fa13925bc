"""Coded concepts: the one place where the system's words meet standard codes.

Everything that leaves the system coded (the findings JSON, DICOM SEG segment descriptions, the
Parametric Map's real-world value mapping) takes its codes from here; nothing else spells a code.

Sources, and why they can be trusted
------------------------------------
Every SNOMED CT (``SCT``) and DICOM (``DCM``) code below except the four CID 217 codes is in
pydicom 2.4's copy of the DICOM code dictionary (``pydicom.sr._concepts_dict``, generated from
PS3.16), in the context groups named beside it: CID 7150 (segmentation property categories),
CID 7159 (lesion segmentation types), CID 7153 (CNS segmentation types), CID 7140 (brain structures),
CID 244 (laterality), CID 7162 (algorithm families). ``tests/test_codes.py`` checks each code and
meaning against that dictionary, so a typo fails the tests. The CID 217 "Visual Explanation" codes
(DCM 130401-130404) are newer than pydicom 2.4's dictionary and are written out explicitly.

Choices (also in ``docs/dicom.md``)
-----------------------------------
* Lesion types (CID 7159 "Lesion Segmentation Types"): glioma -> "Neoplasm, Primary" SCT 86049000
  (the morphologic-abnormality concept DICOM lists; SCT 372087000 is "Primary malignant neoplasm
  (disorder)", a disorder rather than a segmentable structure, and not in CID 7159); meningioma ->
  "Neoplasm" SCT 108369006 (meningiomas are mostly benign, so the *malignant* primary concept would
  overstate it, and "Mass" SCT 4147007 says less than the model does); metastasis ->
  "Neoplasm, Secondary" SCT 14799000; none -> no lesion type (see :func:`segment_coding`).
* Anatomy: a Harvard-Oxford structure gets its own SNOMED code where CID 7153/7140 has one (the deep
  grey nuclei, hippocampus, amygdala, insula, lateral ventricle, brain stem). Cortical gyri have no
  code in those groups; each is coded with its lobe's code and flagged ``scope="lobe"``. A structure
  whose lobe is not one lobe (it straddles two) is marked uncoded, with the reason: a wrong code is
  worse than none. Side is a separate laterality modifier (CID 244), not part of the code.
* Heatmap quantity (CID 217): Grad-CAM and Grad-CAM++ -> 130403 "Gradient-weighted class
  activation"; Score-CAM -> 130402 "Class activation" (it weights activations by class scores, no
  gradients); integrated gradients and RE-LIG -> 130404 "Saliency".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import highdicom

__all__ = [
    "Concept", "StructureCode", "SegmentCoding",
    "MORPHOLOGICALLY_ABNORMAL_STRUCTURE", "SPATIAL_AND_RELATIONAL_CONCEPT", "NEOPLASM", "NEOPLASM_PRIMARY",
    "NEOPLASM_SECONDARY", "MASS", "EDEMA", "NECROSIS", "BRAIN", "LOBE_CODES", "LATERALITY",
    "ARTIFICIAL_INTELLIGENCE", "VISUAL_EXPLANATION", "CLASS_ACTIVATION", "GRADIENT_WEIGHTED_CLASS_ACTIVATION",
    "SALIENCY", "NO_UNITS", "LESION_TYPES", "METHOD_CODES", "STRUCTURES",
    "lesion_type_code", "structure_code", "laterality_code", "method_code", "segment_coding",
]


@dataclass(frozen=True)
class Concept:
    """A coded concept: code value, coding scheme designator and code meaning (DICOM's triplet)."""

    value: str
    scheme: str
    meaning: str

    def as_dict(self) -> dict[str, str]:
        """JSON form used by the findings (``{"value", "scheme", "meaning"}``)."""
        return {"value": self.value, "scheme": self.scheme, "meaning": self.meaning}

    def to_highdicom(self) -> highdicom.sr.CodedConcept:
        """The same concept as a highdicom ``CodedConcept`` (imported here: highdicom is only
        needed by the DICOM writers)."""
        from highdicom.sr import CodedConcept

        return CodedConcept(value=self.value, scheme_designator=self.scheme, meaning=self.meaning)


def _sct(value: str, meaning: str) -> Concept:
    return Concept(value, "SCT", meaning)


def _dcm(value: str, meaning: str) -> Concept:
    return Concept(value, "DCM", meaning)


# Segmentation property categories (CID 7150).
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = _sct("49755003", "Morphologically Abnormal Structure")
SPATIAL_AND_RELATIONAL_CONCEPT = _sct("309825002", "Spatial and Relational Concept")

# Lesion segmentation types (CID 7159).
NEOPLASM = _sct("108369006", "Neoplasm")
NEOPLASM_PRIMARY = _sct("86049000", "Neoplasm, Primary")
NEOPLASM_SECONDARY = _sct("14799000", "Neoplasm, Secondary")
MASS = _sct("4147007", "Mass")
EDEMA = _sct("79654002", "Edema")
NECROSIS = _sct("6574001", "Necrosis")

# Anatomy (CID 7153 "CNS Segmentation Types"). The Harvard-Oxford cortical and subcortical atlas has
# no cerebellum, so no cerebellum code is needed.
BRAIN = _sct("12738006", "Brain")
LOBE_CODES: dict[str, Concept] = {
    "frontal": _sct("83251001", "Frontal lobe"),
    "temporal": _sct("78277001", "Temporal lobe"),
    "parietal": _sct("16630005", "Parietal lobe"),
    "occipital": _sct("31065004", "Occipital lobe"),
    "limbic": _sct("279215006", "Limbic lobe"),
    "insula": _sct("36169008", "Insula"),
    "brainstem": _sct("119238007", "Brain stem"),
    # "subcortical" is the atlas module's group of deep nuclei and ventricles, not a lobe: no code.
}
_THALAMUS = _sct("42695009", "Thalamus")
_HIPPOCAMPUS = _sct("5366008", "Hippocampus")
_AMYGDALA = _sct("4958002", "Amygdala")
_CAUDATE = _sct("11000004", "Caudate nucleus")
_PUTAMEN = _sct("89278009", "Putamen")
_GLOBUS_PALLIDUS = _sct("14738005", "Globus pallidus")
_ACCUMBENS = _sct("427667007", "Nucleus accumbens")
_LATERAL_VENTRICLE = _sct("66720007", "Lateral ventricle")

# Laterality modifiers (CID 244).
LATERALITY: dict[str, Concept] = {
    "left": _sct("7771000", "Left"),
    "right": _sct("24028007", "Right"),
    "bilateral": _sct("51440002", "Bilateral"),
}

# Algorithm family (CID 7162) and the heatmap's quantity (CID 217 "Visual Explanation").
ARTIFICIAL_INTELLIGENCE = _dcm("123110", "Artificial Intelligence")
VISUAL_EXPLANATION = _dcm("130401", "Visual Explanation")
CLASS_ACTIVATION = _dcm("130402", "Class activation")
GRADIENT_WEIGHTED_CLASS_ACTIVATION = _dcm("130403", "Gradient-weighted class activation")
SALIENCY = _dcm("130404", "Saliency")
NO_UNITS = Concept("1", "UCUM", "no units")

# Class of xai_core.data.brain.CLASSES -> lesion segmentation type (None: no lesion).
LESION_TYPES: dict[str, Concept | None] = {
    "none": None,
    "glioma": NEOPLASM_PRIMARY,
    "meningioma": NEOPLASM,
    "metastasis": NEOPLASM_SECONDARY,
}

# Registered explanation method (xai_core.explain.available_methods) -> CID 217 concept.
METHOD_CODES: dict[str, Concept] = {
    "gradcam": GRADIENT_WEIGHTED_CLASS_ACTIVATION,
    "gradcam++": GRADIENT_WEIGHTED_CLASS_ACTIVATION,
    "scorecam": CLASS_ACTIVATION,
    "ig": SALIENCY,
    "relig": SALIENCY,
    # Perturbation surrogates (issue 13): a per-region importance map, neither a class activation nor a gradient.
    "lime": SALIENCY,
    "medlime": SALIENCY,
}


@dataclass(frozen=True)
class StructureCode:
    """How one Harvard-Oxford structure is coded.

    Attributes:
        concept: the SNOMED CT code, or None when the structure is explicitly uncoded.
        scope: ``"structure"`` (the code names the structure itself), ``"lobe"`` (the structure has
            no code of its own; this is its lobe's) or ``"uncoded"``.
        note: why, for ``"lobe"`` and ``"uncoded"``.
    """

    concept: Concept | None
    scope: Literal["structure", "lobe", "uncoded"]
    note: str | None = None


def _own(c: Concept) -> StructureCode:
    return StructureCode(c, "structure")


def _lobe(lobe: str) -> StructureCode:
    return StructureCode(LOBE_CODES[lobe], "lobe", f"no SNOMED CT code of its own in DICOM CID 7153/7140; "
                                                   f"coded as the {lobe} lobe that holds it")


def _uncoded(why: str) -> StructureCode:
    return StructureCode(None, "uncoded", why)


# Harvard-Oxford structure (side prefix removed, the atlas's spelling) -> code. Every key of
# xai_core.atlas.LOBES is here; the lobe used for "lobe" entries is the one atlas.LOBES gives.
STRUCTURES: dict[str, StructureCode] = {
    # frontal lobe gyri
    **{name: _lobe("frontal") for name in (
        "Frontal_Pole", "Superior_Frontal_Gyrus", "Middle_Frontal_Gyrus",
        "Inferior_Frontal_Gyrus_pars_triangularis", "Inferior_Frontal_Gyrus_pars_opercularis",
        "Precentral_Gyrus", "Frontal_Medial_Cortex",
        "Juxtapositional_Lobule_Cortex_(formerly_Supplementary_Motor_Cortex)",
        "Paracingulate_Gyrus", "Frontal_Orbital_Cortex", "Frontal_Operculum_Cortex")},
    # The central operculum (subcentral gyrus) spans the pre- and postcentral gyri: frontal and parietal.
    "Central_Opercular_Cortex": _uncoded("spans the frontal and parietal lobes (subcentral gyrus); no single "
                                         "lobe code fits and it has no code of its own in DICOM CID 7153/7140"),
    # temporal lobe gyri
    **{name: _lobe("temporal") for name in (
        "Temporal_Pole", "Superior_Temporal_Gyrus_anterior_division",
        "Superior_Temporal_Gyrus_posterior_division", "Middle_Temporal_Gyrus_anterior_division",
        "Middle_Temporal_Gyrus_posterior_division", "Middle_Temporal_Gyrus_temporooccipital_part",
        "Inferior_Temporal_Gyrus_anterior_division", "Inferior_Temporal_Gyrus_posterior_division",
        "Inferior_Temporal_Gyrus_temporooccipital_part", "Temporal_Fusiform_Cortex_anterior_division",
        "Temporal_Fusiform_Cortex_posterior_division", "Planum_Polare",
        "Heschl's_Gyrus_(includes_H1_and_H2)", "Planum_Temporale")},
    # The temporo-occipital fusiform cortex lies across the temporal/occipital boundary.
    "Temporal_Occipital_Fusiform_Cortex": _uncoded("lies across the temporal and occipital lobes; no single lobe "
                                                   "code fits and it has no code of its own in DICOM CID 7153/7140"),
    # parietal lobe gyri
    **{name: _lobe("parietal") for name in (
        "Postcentral_Gyrus", "Superior_Parietal_Lobule", "Supramarginal_Gyrus_anterior_division",
        "Supramarginal_Gyrus_posterior_division", "Angular_Gyrus", "Precuneous_Cortex",
        "Parietal_Operculum_Cortex")},
    # occipital lobe gyri
    **{name: _lobe("occipital") for name in (
        "Lateral_Occipital_Cortex_superior_division", "Lateral_Occipital_Cortex_inferior_division",
        "Intracalcarine_Cortex", "Cuneal_Cortex", "Lingual_Gyrus", "Occipital_Fusiform_Gyrus",
        "Supracalcarine_Cortex", "Occipital_Pole")},
    # insula: the insular cortex is the insula (CID 7153)
    "Insular_Cortex": _own(LOBE_CODES["insula"]),
    # limbic lobe: gyri without their own code; hippocampus and amygdala have theirs
    **{name: _lobe("limbic") for name in (
        "Cingulate_Gyrus_anterior_division", "Cingulate_Gyrus_posterior_division",
        "Parahippocampal_Gyrus_anterior_division", "Parahippocampal_Gyrus_posterior_division",
        "Subcallosal_Cortex")},
    "Hippocampus": _own(_HIPPOCAMPUS),
    "Amygdala": _own(_AMYGDALA),
    # deep grey nuclei and ventricles (the atlas spells the left ventricle "Ventrical")
    "Thalamus": _own(_THALAMUS),
    "Caudate": _own(_CAUDATE),
    "Putamen": _own(_PUTAMEN),
    "Pallidum": _own(_GLOBUS_PALLIDUS),
    "Accumbens": _own(_ACCUMBENS),
    "Lateral_Ventrical": _own(_LATERAL_VENTRICLE),
    "Lateral_Ventricle": _own(_LATERAL_VENTRICLE),
    "Brain-Stem": _own(LOBE_CODES["brainstem"]),
}


def _base(name: str) -> str:
    for prefix in ("Left_", "Right_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _side(name: str) -> str | None:
    return "left" if name.startswith("Left_") else "right" if name.startswith("Right_") else None


def structure_code(name: str) -> StructureCode:
    """The coding of a Harvard-Oxford structure name (``Left_Thalamus``; the side prefix is ignored:
    laterality is :func:`laterality_code`). ``KeyError`` for a name the table does not know."""
    return STRUCTURES[_base(name)]


def lesion_type_code(class_name: str) -> Concept | None:
    """Lesion segmentation type of a model class; None for ``"none"`` and for classes that are not
    lesion types (a model with other classes)."""
    return LESION_TYPES.get(class_name)


def laterality_code(hemisphere: str | None) -> Concept | None:
    """CID 244 modifier for ``"left"``, ``"right"``, ``"bilateral"``; None for midline or none."""
    return LATERALITY.get(hemisphere or "")


def method_code(method: str) -> Concept:
    """CID 217 concept of an explanation method's heatmap. ``KeyError`` for a method without one:
    a new method must be given its code here (a test checks every registered method)."""
    try:
        return METHOD_CODES[method]
    except KeyError:
        raise KeyError(f"no DICOM CID 217 code for explanation method {method!r}; add it to "
                       "xai_core.codes.METHOD_CODES") from None


@dataclass(frozen=True)
class SegmentCoding:
    """The codes of one SEG segment description.

    Attributes:
        category: segmented property category (CID 7150).
        type: segmented property type (CID 7151).
        anatomic_region: anatomic region, or None when unknown or uncoded.
        laterality: modifier of the anatomic region (CID 244), or None.
    """

    category: Concept
    type: Concept
    anatomic_region: Concept | None = None
    laterality: Concept | None = None


def segment_coding(class_name: str, method: str, structure: str | None = None) -> SegmentCoding:
    """Codes for a segment that shows where ``method``'s map for ``class_name`` is high.

    A lesion class gives category "Morphologically Abnormal Structure" and its lesion type. For a
    class that is no lesion (``"none"``) the segment is not an abnormality: its category is
    "Spatial and Relational Concept" and its type the heatmap's CID 217 concept (the region the
    model's evidence lies in). ``structure`` (a Harvard-Oxford name, e.g. the findings' top
    structure) gives the anatomic region and its side prefix the laterality; without a coded
    structure the region is the brain.
    """
    lesion = lesion_type_code(class_name)
    if lesion is not None:
        category, kind = MORPHOLOGICALLY_ABNORMAL_STRUCTURE, lesion
    else:
        category, kind = SPATIAL_AND_RELATIONAL_CONCEPT, method_code(method)
    region, side = BRAIN, None
    if structure is not None:
        try:
            coded = structure_code(structure).concept
        except KeyError:
            coded = None
        if coded is not None:
            region = coded
            side = laterality_code(_side(structure))
    return SegmentCoding(category=category, type=kind, anatomic_region=region, laterality=side)

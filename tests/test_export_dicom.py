"""DICOM out (xai_core.export_dicom): SEG and Parametric Map objects read back with pydicom and
highdicom, frame by frame, against the source series they were made from.

Series are written with the project's own writer (``xai_core.io.write_image`` to a folder) on small
volumes: one axial, one oblique and anisotropic (every axis tilted). Checked for each object:
every frame's position and orientation equal those of the source image it references (1e-4 mm),
the referenced SOP instance UIDs are exactly the series', the codes are present, and the pixels of
each frame equal the slice of the volume at that source image (exactly, float32 for the map).
"""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from xai_core import codes as C
from xai_core import export_dicom as X
from xai_core.io import Image, read_image, write_image

TOL_MM = 1e-4
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
PM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.30"


def _rotation(seed: int) -> np.ndarray:
    """A proper rotation with no axis-aligned column (as in tests/test_io.py)."""
    rng = np.random.default_rng(seed)
    while True:
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        if np.abs(q).max() < 0.95:
            return q


def _volume(shape_kji=(9, 14, 12), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    return (5.0 * k - 2.0 * j + i + rng.normal(0.0, 3.0, k.shape)).astype(np.float32)


GEOMETRIES = {
    "axial": dict(spacing=(1.0, 1.0, 2.0), origin=(-6.0, -7.0, -9.0), direction=tuple(np.eye(3).ravel())),
    "oblique": dict(spacing=(0.9, 1.3, 3.1), origin=(-97.3, 121.7, -60.2), direction=tuple(_rotation(3).ravel())),
}


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def series(request, tmp_path_factory):
    """(folder, image as read back, source datasets by SOP instance UID) for one geometry."""
    g = GEOMETRIES[request.param]
    folder = tmp_path_factory.mktemp(f"series_{request.param}") / "dicom"
    write_image(Image(_volume(), **g), folder, dicom_uid=request.param)
    # Reverse the file names so that name order is the opposite of slice order: sorting by name fails.
    files = sorted(folder.glob("*.dcm"))
    for n, p in enumerate(files):
        p.rename(folder / f"tmp_{n:04d}.dcm")
    for n, p in enumerate(sorted(folder.glob("tmp_*.dcm"))):
        p.rename(folder / f"img_{len(files) - 1 - n:04d}.dcm")
    image = read_image(folder)
    by_uid = {}
    for p in folder.iterdir():
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        by_uid[ds.SOPInstanceUID] = ds
    return folder, image, by_uid


def _levels(image: Image) -> np.ndarray:
    """Nested uint8 levels like the pipeline's: 1 = top 50 %, 2 = top 25 %, 3 = top 10 % of voxels."""
    a = image.array
    cuts = np.percentile(a, [50, 75, 90])
    return np.digitize(a, cuts).astype(np.uint8)


def _source_slice(image: Image, ds) -> int:
    """Index k of the image slice at a source dataset's position."""
    ijk = image.physical_to_index([float(v) for v in ds.ImagePositionPatient])
    k = int(round(ijk[2]))
    np.testing.assert_allclose(ijk, [0, 0, k], atol=1e-3)
    return k


def _frame_geometry(obj, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(ImagePositionPatient, ImageOrientationPatient) of frame n, per-frame or shared."""
    pf = obj.PerFrameFunctionalGroupsSequence[n]
    shared = obj.SharedFunctionalGroupsSequence[0]
    pos = pf.PlanePositionSequence[0].ImagePositionPatient
    ori = (pf if "PlaneOrientationSequence" in pf else shared).PlaneOrientationSequence[0].ImageOrientationPatient
    return np.asarray([float(v) for v in pos]), np.asarray([float(v) for v in ori])


def _assert_references(obj, by_uid) -> None:
    refs = {i.ReferencedSOPInstanceUID for s in obj.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert refs == set(by_uid)
    src = next(iter(by_uid.values()))
    assert obj.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert obj.StudyInstanceUID == src.StudyInstanceUID
    assert obj.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert obj.SeriesInstanceUID != src.SeriesInstanceUID


def _assert_reader_volume(obj, nk: int) -> None:
    """The check that failed in dcmqi issue 430 (an oblique highdicom SEG that Slicer could not
    load): a reader builds one volume from the frames' orientation, pixel spacing and spacing between
    slices, origin at the lowest frame; every frame must then fall exactly on one of its slices."""
    pos = np.asarray([_frame_geometry(obj, n)[0] for n in range(int(obj.NumberOfFrames))])
    ori = _frame_geometry(obj, 0)[1]
    row, col = ori[:3], ori[3:]
    normal = np.cross(row, col)
    step = float(obj.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices)
    d = pos - pos[np.argmin(pos @ normal)]
    np.testing.assert_allclose(d @ row, 0.0, atol=TOL_MM)
    np.testing.assert_allclose(d @ col, 0.0, atol=TOL_MM)
    k = d @ normal / step
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    assert set(np.round(k).astype(int)) == set(range(nk))


def _codes(seq) -> set[tuple[str, str]]:
    return {(c.CodingSchemeDesignator, c.CodeValue) for c in seq}


# --------------------------------------------------------------------------------------- SEG


def test_source_series_is_in_slice_order_and_checked(series):
    folder, image, _ = series
    datasets = X.source_series(folder, image)
    for k, ds in enumerate(datasets):
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], image.index_to_physical((0, 0, k)),
                                   atol=TOL_MM)
    # Shuffled datasets come back in the same order.
    shuffled = [datasets[i] for i in np.random.default_rng(0).permutation(len(datasets))]
    assert [d.SOPInstanceUID for d in X.source_series(shuffled, image)] == [d.SOPInstanceUID for d in datasets]
    # An image off the series' grid is refused: shifted by half a slice, or one slice short.
    shifted = Image(image.array, image.spacing, tuple(np.add(image.origin, image.direction_matrix[:, 2])),
                    image.direction)
    with pytest.raises(ValueError, match="positions"):
        X.source_series(folder, shifted)
    short = Image(image.array[1:], image.spacing, image.origin, image.direction)
    with pytest.raises(ValueError, match="grid"):
        X.source_series(folder, short)


def test_levels_seg_reads_back_frame_aligned(series, tmp_path):
    import highdicom as hd

    folder, image, by_uid = series
    levels = _levels(image)
    coding = C.segment_coding("glioma", "gradcam++", "Left_Thalamus")
    segments = [X.Segment(f"Saliency top {p} %", coding, min_value=n) for n, p in enumerate((50, 25, 10), start=1)]
    algo = X.AlgorithmInfo("gradcam++", "1.2.0", "brain-lesion-3d", "0123456789abcdef0123", {"layer": "down4"})
    out = X.write_seg(image.with_array(levels), folder, tmp_path / "levels.seg.dcm", segments=segments,
                      algorithm=algo, content_label="levels")

    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == SEG_SOP_CLASS and ds.SegmentationType == "BINARY"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian  # uncompressed
    nk = image.size[2]
    assert int(ds.NumberOfFrames) == nk * len(segments)  # empty frames kept: every slice, every segment
    _assert_references(ds, by_uid)
    seen = set()
    for n in range(int(ds.NumberOfFrames)):
        pf = ds.PerFrameFunctionalGroupsSequence[n]
        der = pf.DerivationImageSequence[0]
        assert _codes(der.DerivationCodeSequence) == {("DCM", "113076")}
        uid = der.SourceImageSequence[0].ReferencedSOPInstanceUID
        src = by_uid[uid]
        pos, ori = _frame_geometry(ds, n)
        np.testing.assert_allclose(pos, [float(v) for v in src.ImagePositionPatient], atol=TOL_MM)
        np.testing.assert_allclose(ori, [float(v) for v in src.ImageOrientationPatient], atol=TOL_MM)
        seg_no = int(pf.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        seen.add((uid, seg_no))
    assert seen == {(u, s) for u in by_uid for s in (1, 2, 3)}
    _assert_reader_volume(ds, nk)

    # Pixels, through highdicom's reader: frame for source image k == levels[k] >= n.
    seg = hd.seg.segread(out)
    assert {u[2] for u in seg.get_source_image_uids()} == set(by_uid)
    uids = list(by_uid)
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2, 3])
    for row, uid in enumerate(uids):
        k = _source_slice(image, by_uid[uid])
        for s in (1, 2, 3):
            np.testing.assert_array_equal(px[row, :, :, s - 1].astype(bool), levels[k] >= s)

    # Codes: category, type, anatomic region with laterality, algorithm family.
    for item in ds.SegmentSequence:
        assert _codes(item.SegmentedPropertyCategoryCodeSequence) == {("SCT", "49755003")}
        assert _codes(item.SegmentedPropertyTypeCodeSequence) == {("SCT", "86049000")}
        region = item.AnatomicRegionSequence[0]
        assert (region.CodingSchemeDesignator, region.CodeValue) == ("SCT", "42695009")
        assert _codes(region.AnatomicRegionModifierSequence) == {("SCT", "7771000")}
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        alg = item.SegmentationAlgorithmIdentificationSequence[0]
        assert _codes(alg.AlgorithmFamilyCodeSequence) == {("DCM", "123110")}
        assert alg.AlgorithmName == "gradcam++" and alg.AlgorithmVersion == "1.2.0"
    assert [i.SegmentLabel for i in ds.SegmentSequence] == ["Saliency top 50 %", "Saliency top 25 %",
                                                            "Saliency top 10 %"]
    assert ds.ContentLabel == "LEVELS" and ds.DeviceSerialNumber == "0123456789abcdef"


def test_long_labels_are_cut_at_a_word_boundary():
    label = "Saliency top 5 % - left inferior temporal gyrus posterior division"  # 66 characters
    assert X._lo(label) == "Saliency top 5 % - left inferior temporal gyrus posterior"
    assert X._lo("x" * 70) == "x" * 64 and X._lo("a " + "x" * 70) == ("a " + "x" * 70)[:64]
    assert X._lo("left insula \u2013 top 5 %") == "left insula ? top 5 %"  # ASCII only: no character set needed


def test_seg_refuses_a_float_map(series, tmp_path):
    folder, image, _ = series
    with pytest.raises(ValueError, match="integer"):
        X.write_seg(image.with_array(image.array * 0.37), folder, tmp_path / "x.seg.dcm",
                    segments=[X.Segment("x", C.segment_coding("none", "ig"))],
                    algorithm=X.AlgorithmInfo("ig", "1", "m"))


def test_corrected_label_exports_as_semiautomatic_seg(series, tmp_path):
    folder, image, by_uid = series
    label = (image.array > np.percentile(image.array, 80)).astype(np.uint8)
    out = X.export_label(image.with_array(label), folder, tmp_path / "label.seg.dcm", label_class="metastasis",
                         method="gradcam++", model_version="1.2.0", structure="Brain-Stem",
                         parameters={"user": "reader1"})
    ds = pydicom.dcmread(out)
    _assert_references(ds, by_uid)
    (item,) = ds.SegmentSequence
    assert item.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert _codes(item.SegmentedPropertyTypeCodeSequence) == {("SCT", "14799000")}
    assert _codes(item.AnatomicRegionSequence) == {("SCT", "119238007")}
    assert "AnatomicRegionModifierSequence" not in item.AnatomicRegionSequence[0]  # midline: no side
    params = item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert "provenance=corrected saliency" in params and "user=reader1" in params
    import highdicom as hd

    seg = hd.seg.segread(out)
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(by_uid), segment_numbers=[1])
    for row, uid in enumerate(by_uid):
        np.testing.assert_array_equal(px[row, :, :, 0], label[_source_slice(image, by_uid[uid])])


# ------------------------------------------------------------------------------ Parametric Map


def test_parametric_map_round_trips_the_saliency(series, tmp_path):
    folder, image, by_uid = series
    a = image.array
    sal = image.with_array(((a - a.min()) / (a.max() - a.min())).astype(np.float32))
    out = X.write_parametric_map(sal, folder, tmp_path / "saliency.pm.dcm", "scorecam", target="glioma")
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == PM_SOP_CLASS
    assert ds.BitsAllocated == 32 and "FloatPixelData" in ds
    _assert_references(ds, by_uid)
    frames = ds.pixel_array
    assert frames.dtype == np.float32 and frames.shape == (image.size[2], image.size[1], image.size[0])
    positions = {tuple(np.round([float(v) for v in s.ImagePositionPatient], 3)): s for s in by_uid.values()}
    matched = set()
    for n in range(int(ds.NumberOfFrames)):
        pos, ori = _frame_geometry(ds, n)
        src = positions[tuple(np.round(pos, 3))]
        np.testing.assert_allclose(pos, [float(v) for v in src.ImagePositionPatient], atol=TOL_MM)
        np.testing.assert_allclose(ori, [float(v) for v in src.ImageOrientationPatient], atol=TOL_MM)
        k = _source_slice(image, src)
        matched.add(k)
        # Stored values, after the real-world value mapping (identity), equal the map exactly.
        rwvm = ds.PerFrameFunctionalGroupsSequence[n].get("RealWorldValueMappingSequence") or \
            ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
        m = rwvm[0]
        value = frames[n] * float(m.RealWorldValueSlope) + float(m.RealWorldValueIntercept)
        np.testing.assert_array_equal(value.astype(np.float32), sal.array[k])
    assert matched == set(range(image.size[2]))
    _assert_reader_volume(ds, image.size[2])
    m = (ds.PerFrameFunctionalGroupsSequence[0].get("RealWorldValueMappingSequence")
         or ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence)[0]
    q = m.QuantityDefinitionSequence[0]
    assert _codes(q.ConceptNameCodeSequence) == {("SCT", "246205007")}  # "Quantity"
    assert _codes(q.ConceptCodeSequence) == {("DCM", "130402")}  # Score-CAM: class activation
    assert q.ConceptCodeSequence[0].CodeMeaning == "Class activation"
    assert _codes(m.MeasurementUnitsCodeSequence) == {("UCUM", "1")}
    assert float(m.DoubleFloatRealWorldValueFirstValueMapped) == 0.0
    assert float(m.DoubleFloatRealWorldValueLastValueMapped) == 1.0


def test_parametric_map_refuses_a_method_without_a_code(series, tmp_path):
    folder, image, _ = series
    with pytest.raises(KeyError, match="CID 217"):
        X.write_parametric_map(image, folder, tmp_path / "x.pm.dcm", "made-up")


# ------------------------------------------------------------------ explanation and command line


@pytest.fixture(scope="module")
def head_series(tmp_path_factory):
    """A small oblique head-like series (a bright ellipsoid with a blob), as a DICOM folder."""
    shape = (24, 36, 32)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = ((k / 0.9) ** 2 + (j / 0.9) ** 2 + (i / 0.9) ** 2 < 1) * 600.0
    blob = ((k - 0.2) ** 2 + (j + 0.3) ** 2 + (i - 0.25) ** 2 < 0.06) * 400.0
    arr = (head + blob + np.random.default_rng(0).normal(0, 10, shape)).astype(np.float32)
    folder = tmp_path_factory.mktemp("head") / "dicom"
    write_image(Image(arr, (5.5, 5.0, 6.5), (-80.0, -90.0, -70.0), tuple(_rotation(5).ravel())), folder,
                dicom_uid="head")
    return folder


@pytest.fixture(scope="module")
def lit_target(head_series, default_model):
    """A lesion class whose Grad-CAM mask on the toy head is not empty. The toy is no brain, so which
    class lights up depends on the weights; these tests are about the DICOM files, not the model."""
    from xai_core.pipeline import explain

    image = read_image(head_series)
    for c in default_model.classes[1:]:
        exp = explain(image, "gradcam", model=default_model, target=c)
        if not exp.mask.empty:
            return c, exp
    pytest.fail("no class gives a non-empty Grad-CAM mask on the toy head")


def test_write_dicom_outputs_for_an_explanation(lit_target, tmp_path):
    _, exp = lit_target
    findings = {"location": {"top_structure": "Right_Putamen"},
                "levels": [{"level": 4, "top_structure": "Left_Hippocampus"}]}
    (tmp_path / "findings.json").write_text(json.dumps(findings))  # as xai explain --report writes it
    files = X.write_dicom_outputs(exp, None, tmp_path, findings=tmp_path / "findings.json")  # source: exp.image
    assert {k: v.name for k, v in files.items()} == {"mask_seg": "mask.seg.dcm", "levels_seg": "levels.seg.dcm",
                                                     "saliency_pm": "saliency.pm.dcm"}
    lesion = C.lesion_type_code(exp.targets[0])
    mask = pydicom.dcmread(files["mask_seg"])
    (item,) = mask.SegmentSequence
    want_type = lesion.value if lesion else "130403"  # "none": the Grad-CAM concept
    assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == want_type
    assert _codes(item.AnatomicRegionSequence) == {("SCT", "89278009")}  # putamen
    assert _codes(item.AnatomicRegionSequence[0].AnatomicRegionModifierSequence) == {("SCT", "24028007")}
    assert "right putamen" in item.SegmentLabel
    levels = pydicom.dcmread(files["levels_seg"])
    assert len(levels.SegmentSequence) == len(exp.mask.level_thresholds) == 4
    assert [i.SegmentLabel.split(" - ")[0] for i in levels.SegmentSequence] == [
        f"Saliency top {p:g} %" for p in (20, 10, 5, 1)]
    # Level 4 has its own anatomy in the findings, the others fall back to the top structure.
    assert _codes(levels.SegmentSequence[3].AnatomicRegionSequence) == {("SCT", "5366008")}
    assert _codes(levels.SegmentSequence[0].AnatomicRegionSequence) == {("SCT", "89278009")}
    pm = pydicom.dcmread(files["saliency_pm"])
    q = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].QuantityDefinitionSequence[0]
    assert _codes(q.ConceptCodeSequence) == {("DCM", "130403")}
    assert float(np.abs(np.sort(pm.pixel_array.ravel()) - np.sort(exp.primary.array.ravel())).max()) == 0.0


def test_cli_explain_writes_dicom_and_export_seg(head_series, lit_target, tmp_path, monkeypatch):
    from xai_core.cli import main

    out = tmp_path / "out"
    assert main(["explain", str(head_series), "--method", "gradcam", "--target", lit_target[0],
                 "--out", str(out)]) == 0
    for name in ("mask.seg.dcm", "levels.seg.dcm", "saliency.pm.dcm", "mask.nii.gz"):
        assert (out / name).is_file(), name
    label = tmp_path / "label.nii.gz"
    image = read_image(out / "mask.nii.gz")
    write_image(image, label)
    seg = tmp_path / "corrected.seg.dcm"
    assert main(["export-seg", str(label), "--source", str(head_series), "--out", str(seg), "--method", "gradcam",
                 "--label-class", "meningioma", "--structure", "Left_Amygdala"]) == 0
    ds = pydicom.dcmread(seg)
    assert ds.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert _codes(ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence) == {("SCT", "108369006")}
    assert _codes(ds.SegmentSequence[0].AnatomicRegionSequence) == {("SCT", "4958002")}
    # A label that is not on the series' grid is one clear error line, exit code 2.
    write_image(Image(image.array[1:], image.spacing, image.origin, image.direction), tmp_path / "bad.nii.gz")
    assert main(["export-seg", str(tmp_path / "bad.nii.gz"), "--source", str(head_series),
                 "--out", str(tmp_path / "bad.seg.dcm")]) == 2

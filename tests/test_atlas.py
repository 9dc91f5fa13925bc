"""Atlas labelling from the input's own space: structures, sides, lobes and MNI coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from xai_core.atlas import LOBES, label_region, lobe_of, lps_to_ras, readable_name
from xai_core.io import Image
from xai_core.mni import load_harvard_oxford, load_template
from xai_core.registration import register_to_mni


def _oblique_moved_template() -> tuple[Image, sitk.AffineTransform]:
    """The template through a known affine (7 degrees, 5 mm, scale 0.96) on an oblique 2.2 mm grid.
    Returns the image and the map from its points to template points."""
    tpl = load_template()
    centre = np.array(tpl.TransformContinuousIndexToPhysicalPoint([90.0, 108.0, 80.0]))
    c, s = np.cos(np.deg2rad(7)), np.sin(np.deg2rad(7))
    a = sitk.AffineTransform(3)
    a.SetCenter(centre.tolist())
    a.SetMatrix((np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) * 0.96).ravel().tolist())
    a.SetTranslation([5.0, 3.0, -4.0])
    c2, s2 = np.cos(np.deg2rad(-15)), np.sin(np.deg2rad(-15))
    d = np.array([[1, 0, 0], [0, c2, -s2], [0, s2, c2]])
    spacing, size = np.array([2.2, 2.2, 2.2]), np.array([90, 105, 85])
    ref = sitk.Image(size.tolist(), sitk.sitkFloat32)
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection(d.ravel().tolist())
    ref.SetOrigin((centre - d @ (spacing * (size - 1) / 2)).tolist())
    return Image.from_sitk(sitk.Resample(tpl, ref, a, sitk.sitkLinear, 0.0)), a


def _structure_on_input(image: Image, a: sitk.AffineTransform, names: list[str]) -> np.ndarray:
    """Bool mask on ``image``'s grid of the given atlas structures (label map pulled through ``a``)."""
    atlas = load_harvard_oxford()
    ids = [atlas.names.index(n) + 1 for n in names]
    lab = sitk.GetImageFromArray(np.isin(atlas.labels, ids).astype(np.uint8))
    lab.CopyInformation(load_template())
    return sitk.GetArrayFromImage(sitk.Resample(lab, image.reference(), a, sitk.sitkNearestNeighbor, 0)) > 0


@pytest.fixture(scope="module")
def case():
    image, a = _oblique_moved_template()
    reg = register_to_mni(image)
    assert not reg.likely_failed, reg.reason
    return image, a, reg


def test_every_atlas_structure_has_a_lobe_and_a_readable_name():
    names = load_harvard_oxford().names
    lobes = {lobe_of(n) for n in names}
    assert lobes == {"frontal", "parietal", "temporal", "occipital", "insula", "limbic", "subcortical", "brainstem"}
    assert lobe_of("Left_Cingulate_Gyrus_anterior_division") == "limbic"
    assert lobe_of("Right_Precentral_Gyrus") == "frontal" and lobe_of("Brain-Stem") == "brainstem"
    assert readable_name("Left_Lateral_Ventrical") == "left lateral ventricle"
    assert len(LOBES) >= len({n.removeprefix("Left_").removeprefix("Right_") for n in names})


@pytest.mark.parametrize("name,side,lobe", [("Left_Middle_Frontal_Gyrus", "left", "frontal"),
                                            ("Right_Temporal_Pole", "right", "temporal"),
                                            ("Right_Thalamus", "right", "subcortical")])
def test_a_structure_drawn_in_native_space_is_labelled_as_itself(case, name, side, lobe):
    image, a, reg = case
    m = _structure_on_input(image, a, [name])
    lab = label_region(image.with_array(m.astype(np.uint8)), reg)
    top = lab.structures[0]
    assert lab.top_structure == name and top.fraction > 0.7
    assert top.lobe == lobe and next(iter(lab.lobes)) == lobe
    assert lab.hemisphere == side and top.hemisphere == side
    assert 0 < top.mean_probability <= 1
    # Native volume: the share times the mask's volume on the input grid.
    assert top.volume_ml == pytest.approx(top.fraction * m.sum() * 2.2**3 / 1000, rel=1e-3)
    # RAS x grows towards the patient's right, so a left structure has x < 0.
    assert (lab.centroid_mni_ras_mm[0] < 0) == (side == "left")


def test_structures_on_both_sides_are_bilateral_and_saliency_peaks_where_it_should(case):
    image, a, reg = case
    m = _structure_on_input(image, a, ["Left_Occipital_Pole", "Right_Precentral_Gyrus"])
    # A saliency blob centred in the right precentral gyrus, in native space.
    pre = _structure_on_input(image, a, ["Right_Precentral_Gyrus"])
    kji = np.argwhere(pre)
    centre = kji[np.argmin(np.linalg.norm(kji - kji.mean(0), axis=1))]  # a voxel of the structure near its middle
    grid = np.indices(image.array.shape).transpose(1, 2, 3, 0)
    sal = np.exp(-np.sum(((grid - centre) * 2.2) ** 2, axis=-1) / (2 * 6.0**2)).astype(np.float32)
    lab = label_region(image.with_array(m.astype(np.uint8)), reg, image.with_array(sal))
    names = [s.name for s in lab.structures]
    assert set(names[:2]) == {"Left_Occipital_Pole", "Right_Precentral_Gyrus"}
    assert lab.hemisphere == "bilateral" and lab.components >= 2
    assert 0.1 < lab.left_fraction < 0.9
    assert lab.peak_structure == "Right_Precentral_Gyrus"
    by_name = {s.name: s for s in lab.structures}
    assert by_name["Right_Precentral_Gyrus"].saliency_share > by_name["Left_Occipital_Pole"].saliency_share
    # The peak, mapped from native space by the registration, is where the blob's centre is.
    peak_native = image.index_to_physical(centre[::-1].astype(float))
    assert np.linalg.norm(lps_to_ras(reg.to_mni(peak_native)) - np.asarray(lab.peak_mni_ras_mm)) < 3.0


def test_an_empty_mask_labels_nothing(case):
    image, _, reg = case
    lab = label_region(image.with_array(np.zeros(image.array.shape, np.uint8)), reg)
    assert lab.structures == [] and lab.hemisphere == "none" and lab.centroid_mni_ras_mm is None
    assert lab.to_dict()["top_structure"] is None


def test_ground_truth_of_a_generated_oblique_study_matches_the_manifest():
    from xai_core.data.brain import make_study

    image, mask, info = make_study(5151, 14)  # held-out seed; oblique, anisotropic glioma study
    assert info["geometry"] == "oblique" and info["label"] != "none"
    lab = label_region(mask, register_to_mni(image))
    assert lab.top_structure == info["top_structure"]
    assert lab.hemisphere == info["hemisphere"]

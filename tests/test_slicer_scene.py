"""XAIExplain scene logic on slicer-core (real MRML and Segmentations logic, no Qt), synthetic data only."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

MODULE_DIR = Path(__file__).resolve().parents[1] / "slicer_extension" / "XAIExplain"
sys.path.insert(0, str(MODULE_DIR))

from XAIExplainLib.headless import headless_scene  # noqa: E402
from XAIExplainLib.scene import (  # noqa: E402
    HEAT_COLOR_NODE_NAME,
    MASK_COLOR,
    heat_rgb,
    level_rgb,
    ras_from_lps_geometry,
)
from XAIExplainLib.schema import ReplyError  # noqa: E402
from XAIExplainLib.selftest import (  # noqa: E402
    make_server_outputs,
    oblique_ijk_to_ras,
    run_scene_self_test,
    synthetic_input,
)


@pytest.fixture
def xs():
    return headless_scene()


@pytest.fixture
def loaded(xs, tmp_path):
    """An oblique input node, the server's files for it, and the nodes made from them."""
    node = xs.add_volume(synthetic_input(), oblique_ijk_to_ras(), "input")
    uploaded = xs.write_volume(node, tmp_path / "input.nii.gz")
    result, files = make_server_outputs(uploaded, tmp_path / "server")
    nodes = xs.import_explanation(result, files, node, opacity=0.6, threshold=0.25)
    return node, result, files, nodes


@pytest.mark.parametrize("left_handed", [False, True], ids=["right-handed", "left-handed"])
def test_round_trip_heatmap_segments_edit_export(xs, tmp_path, left_handed):
    """Upload geometry, heatmap and segments voxel for voxel, Segment Editor edit, export, label file."""
    summary = run_scene_self_test(xs, tmp_path, left_handed=left_handed)
    assert summary["edited_voxels"] != summary["mask_voxels"]


def test_lps_to_ras_conversion_matches_itk_reading_of_slicer_files(xs, tmp_path):
    m = oblique_ijk_to_ras(spacing=(0.5, 0.75, 3.0), angles_deg=(30, 5, -40))
    node = xs.add_volume(synthetic_input((5, 6, 7)), m, "v")
    img = sitk.ReadImage(str(xs.write_volume(node, tmp_path / "v.nii.gz")))
    assert np.allclose(ras_from_lps_geometry(img.GetSpacing(), img.GetOrigin(), img.GetDirection()), m, atol=1e-4)
    # ITK's LPS origin is RAS with x and y negated.
    assert np.allclose(img.GetOrigin(), [-m[0, 3], -m[1, 3], m[2, 3]], atol=1e-4)


def test_heatmap_is_the_foreground_layer_with_heat_colours(xs, loaded):
    node, _, files, nodes = loaded
    heat = nodes.heatmap
    assert xs.same_grid(heat, node)
    assert np.allclose(xs.ijk_to_ras(heat), xs.ijk_to_ras(node), atol=1e-4)
    assert np.array_equal(xs.array(heat), sitk.GetArrayFromImage(sitk.ReadImage(str(files["saliency"]))))
    comps = xs.composite_nodes()
    assert len(comps) == 3
    for comp in comps:
        assert comp.GetForegroundVolumeID() == heat.GetID()
        assert comp.GetBackgroundVolumeID() == node.GetID()
        assert comp.GetForegroundOpacity() == pytest.approx(0.6)
    dn = heat.GetDisplayNode()
    lut = xs.scene.GetNodeByID(dn.GetColorNodeID())
    assert lut.GetName() == HEAT_COLOR_NODE_NAME and lut.GetNumberOfColors() == 256
    rgba = [0.0] * 4
    lut.GetColor(255, rgba)
    assert rgba[:3] == pytest.approx(heat_rgb(1.0), abs=1 / 255)  # the table stores 8-bit colours
    assert (dn.GetWindow(), dn.GetLevel()) == pytest.approx((1.0, 0.5))
    assert dn.GetApplyThreshold() and dn.GetLowerThreshold() == pytest.approx(0.25)
    xs.set_opacity(0.2)
    xs.set_threshold(heat, 0.7)
    assert all(c.GetForegroundOpacity() == pytest.approx(0.2) for c in comps)
    assert dn.GetLowerThreshold() == pytest.approx(0.7)
    # A second explanation reuses the colour table instead of piling up copies.
    xs.style_heatmap(heat)
    assert xs.scene.GetNodesByClassByName("vtkMRMLColorTableNode", HEAT_COLOR_NODE_NAME).GetNumberOfItems() == 1


def test_heat_ramp_runs_dark_to_bright():
    lum = [0.2126 * r + 0.7152 * g + 0.0722 * b for r, g, b in (heat_rgb(t) for t in np.linspace(0, 1, 11))]
    assert all(b > a for a, b in zip(lum, lum[1:], strict=False))
    assert heat_rgb(-1) == heat_rgb(0) and heat_rgb(2) == heat_rgb(1)


def test_levels_are_nested_named_and_coloured_along_the_ramp(xs, loaded):
    node, _, files, nodes = loaded
    segm = nodes.segmentation.GetSegmentation()
    names = [segm.GetSegment(s).GetName() for s in nodes.level_segment_ids]
    assert names == ["Saliency top 20 % – Left central opercular cortex", "Saliency top 10 %",
                     "Saliency top 5 % – Left insular cortex", "Saliency top 1 % – Left insular cortex"]
    colours = [segm.GetSegment(s).GetColor() for s in nodes.level_segment_ids]
    assert [c == pytest.approx(heat_rgb(0.3 + 0.7 * n / 4)) for n, c in enumerate(colours, 1)] == [True] * 4
    assert [c == pytest.approx(level_rgb(n, 4)) for n, c in enumerate(colours, 1)] == [True] * 4
    lum = [0.2126 * r + 0.7152 * g + 0.0722 * b for r, g, b in colours]
    assert lum == sorted(lum) and len(set(lum)) == 4  # least to most salient: darker to brighter
    mask = segm.GetSegment(nodes.mask_segment_id)
    assert mask.GetName() == "Salient region – Left insular cortex" and mask.GetColor() == pytest.approx(MASK_COLOR)
    arrays = [xs.segment_array(nodes.segmentation, s, node) for s in nodes.level_segment_ids]
    for wide, narrow in zip(arrays, arrays[1:], strict=False):
        assert narrow.sum() < wide.sum() and not (narrow & ~wide).any()  # nested: overlap kept
    levels = sitk.GetArrayFromImage(sitk.ReadImage(str(files["levels"])))
    assert np.array_equal(arrays[-1], (levels == 4).astype(np.uint8))
    dn = nodes.segmentation.GetDisplayNode()
    assert dn.GetSegmentOpacity2DFill(nodes.level_segment_ids[0]) == 0.0
    assert dn.GetSegmentOpacity2DFill(nodes.mask_segment_id) == pytest.approx(0.4)


def test_without_findings_segments_are_named_by_percent(xs, tmp_path):
    node = xs.add_volume(synthetic_input(), oblique_ijk_to_ras(), "input")
    uploaded = xs.write_volume(node, tmp_path / "input.nii.gz")
    result, files = make_server_outputs(uploaded, tmp_path / "server", with_findings=False)
    nodes = xs.import_explanation(result, files, node)
    segm = nodes.segmentation.GetSegmentation()
    assert [segm.GetSegment(s).GetName() for s in nodes.level_segment_ids + [nodes.mask_segment_id]] == [
        "Saliency top 20 %", "Saliency top 10 %", "Saliency top 5 %", "Saliency top 1 %",
        f"Salient region ({100 * result['mask']['fraction_of_brain']:.2g} % of brain)"]
    assert nodes.heatmap.GetName() == "XAI Grad-CAM++ (glioma) saliency"


def test_a_reply_of_another_schema_makes_no_nodes(xs, tmp_path):
    node = xs.add_volume(synthetic_input(), oblique_ijk_to_ras(), "input")
    uploaded = xs.write_volume(node, tmp_path / "input.nii.gz")
    result, files = make_server_outputs(uploaded, tmp_path / "server")
    old_style = {k: v for k, v in result.items() if k not in ("method_title", "mask")}
    before = xs.scene.GetNumberOfNodes()
    with pytest.raises(ReplyError, match="method_title is missing; mask is missing"):
        xs.import_explanation(old_style, files, node)
    assert xs.scene.GetNumberOfNodes() == before


def test_export_merges_chosen_segments_on_the_reference_grid(xs, loaded):
    node, _, files, nodes = loaded
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(files["mask"]))) > 0
    levels = sitk.GetArrayFromImage(sitk.ReadImage(str(files["levels"])))
    label = xs.export_label(nodes.segmentation, [nodes.mask_segment_id, nodes.level_segment_ids[0]], node)
    assert xs.same_grid(label, node) and label.IsA("vtkMRMLLabelMapVolumeNode")
    got = xs.array(label)
    assert got.dtype == np.uint8
    assert np.array_equal(got, (mask | (levels >= 1)).astype(np.uint8))
    with pytest.raises(KeyError, match="no segment 'nope'"):
        xs.export_label(nodes.segmentation, ["nope"], node)
    with pytest.raises(ValueError, match="no segment chosen"):
        xs.export_label(nodes.segmentation, [], node)


def test_segment_editor_edit_is_undoable(xs, loaded):
    node, _, files, nodes = loaded
    before = xs.segment_array(nodes.segmentation, nodes.mask_segment_id, node)
    everything = np.ones(before.shape, np.uint8)
    xs.edit_segment(nodes.segmentation, nodes.mask_segment_id, everything, node, mode="remove")
    assert xs.segment_array(nodes.segmentation, nodes.mask_segment_id, node).sum() == 0
    assert xs.editor_logic().CanUndo()
    xs.editor_logic().Undo()
    assert np.array_equal(xs.segment_array(nodes.segmentation, nodes.mask_segment_id, node), before)
    block = np.zeros(before.shape, np.uint8)
    block[0:2, 0:2, 0:2] = 1
    xs.edit_segment(nodes.segmentation, nodes.mask_segment_id, block, node, mode="set")
    assert np.array_equal(xs.segment_array(nodes.segmentation, nodes.mask_segment_id, node), block)
    with pytest.raises(ValueError, match="mode must be one of"):
        xs.edit_segment(nodes.segmentation, nodes.mask_segment_id, block, node, mode="paint")


def test_permuted_axes_are_reindexed_exactly(xs, tmp_path):
    """A file holding the input grid with i and k swapped (same voxels in space) lands on the input's
    index order exactly; a real geometry change is refused."""
    node = xs.add_volume(synthetic_input(), oblique_ijk_to_ras(), "input")
    uploaded = xs.write_volume(node, tmp_path / "input.nii.gz")
    _, files = make_server_outputs(uploaded, tmp_path / "server")
    heat_img = sitk.ReadImage(str(files["saliency"]))
    permuted = sitk.PermuteAxes(heat_img, [2, 1, 0])
    sitk.WriteImage(permuted, str(tmp_path / "permuted.nii.gz"))
    loaded = xs.load_volume(tmp_path / "permuted.nii.gz", "permuted")
    assert not xs.same_grid(loaded, node)
    xs.conform_to_reference(loaded, node)
    assert xs.same_grid(loaded, node)
    assert np.array_equal(xs.array(loaded), sitk.GetArrayFromImage(heat_img))

    shifted = sitk.Image(heat_img)
    shifted.SetOrigin([o + 0.5 for o in heat_img.GetOrigin()])
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nii.gz"))
    with pytest.raises(ValueError, match="not on the input image's grid"):
        xs.import_explanation({}, {"saliency": tmp_path / "shifted.nii.gz"}, node)


def test_empty_mask_still_gives_a_segment_to_paint_into(xs):
    node = xs.add_volume(synthetic_input(), oblique_ijk_to_ras(), "input")
    seg = xs.new_segmentation("s", node)
    sid = xs.add_binary_segment(seg, np.zeros((12, 14, 16), np.uint8), node, "Saliency mask", MASK_COLOR)
    assert seg.GetSegmentation().GetSegment(sid).GetName() == "Saliency mask"
    assert xs.segment_array(seg, sid, node).sum() == 0
    with pytest.raises(ValueError, match="is not the reference grid"):
        xs.add_binary_segment(seg, np.zeros((3, 3, 3)), node, "x", MASK_COLOR)


def test_content_id_names_the_voxels_and_geometry(xs):
    a = synthetic_input()
    one = xs.add_volume(a, oblique_ijk_to_ras(), "T1 brain (axial)")
    same = xs.add_volume(a.copy(), oblique_ijk_to_ras(), "T1 brain (axial)")
    moved = xs.add_volume(a, oblique_ijk_to_ras(origin=(0.0, 0.0, 0.0)), "T1 brain (axial)")
    b = a.copy()
    b[0, 0, 0] += 1
    edited = xs.add_volume(b, oblique_ijk_to_ras(), "T1 brain (axial)")
    ids = [xs.content_id(n) for n in (one, same, moved, edited)]
    assert ids[0] == ids[1] and len(set(ids)) == 3
    assert re.fullmatch(r"slicer_T1_brain_axial_[0-9a-f]{12}", ids[0])  # a plain id the server accepts


def test_missing_and_unreadable_files_are_named(xs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        xs.load_volume(tmp_path / "absent.nii.gz", "x")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(OSError, match="could not read this volume file"):
        xs.load_volume(bad, "x")

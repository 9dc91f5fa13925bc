"""Scene round trip on synthetic data, shared by the module's Slicer self-test and the pytest suite.

An oblique, anisotropic input volume is written the way the module uploads it; a stand-in for the
server reads it with SimpleITK (as the server does) and writes a heatmap, nested levels and a mask
on the same LPS grid; the module loads them, the mask segment is edited through the Segment Editor
logic and exported, and the exported label is read back with SimpleITK. Every step is compared voxel
for voxel and matrix for matrix, so a sign flip or a k/i swap anywhere fails loudly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .scene import XAIScene, ras_from_lps_geometry

__all__ = ["LEVELS_PERCENT", "make_server_outputs", "oblique_ijk_to_ras", "run_scene_self_test",
           "synthetic_input"]

LEVELS_PERCENT = [20.0, 10.0, 5.0, 1.0]
GEOMETRY_TOL = 1e-4


def oblique_ijk_to_ras(spacing=(0.9, 1.3, 2.2), angles_deg=(17.0, -11.0, 23.0),
                       origin=(-31.5, 12.25, 40.0), left_handed: bool = False) -> np.ndarray:
    """An IJK→RAS matrix with rotations about all three axes and anisotropic spacing."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rot = rz @ ry @ rx
    if left_handed:
        rot = rot @ np.diag([1.0, 1.0, -1.0])
    m = np.eye(4)
    m[:3, :3] = rot * np.asarray(spacing, dtype=float)[None, :]
    m[:3, 3] = origin
    return m


def synthetic_input(shape=(12, 14, 16), seed: int = 0) -> np.ndarray:
    """An int16 ``[k, j, i]`` head-like volume: a bright ellipsoid with texture on a dark background."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    head = (k ** 2 + j ** 2 + i ** 2) < 0.8
    return (head * 800 + rng.integers(0, 60, shape)).astype(np.int16)


def make_server_outputs(input_path: str | os.PathLike, out_dir: str | os.PathLike,
                        peak_kji=(7, 5, 10)) -> tuple[dict[str, Any], dict[str, Path]]:
    """What the server would return for ``input_path``: files on the input's LPS grid, plus result JSON.

    The heatmap is a Gaussian around voxel ``peak_kji``, so its position pins down the voxel order.
    """
    import SimpleITK as sitk

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    img = sitk.ReadImage(str(input_path))
    shape = sitk.GetArrayViewFromImage(img).shape
    k, j, i = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    d2 = (k - peak_kji[0]) ** 2 / 6.0 + (j - peak_kji[1]) ** 2 / 10.0 + (i - peak_kji[2]) ** 2 / 14.0
    heat = np.exp(-d2 / 2.0).astype(np.float32)
    levels = np.zeros(shape, np.uint8)
    for n, t in enumerate((0.15, 0.35, 0.6, 0.85), start=1):
        levels[heat >= t] = n
    mask = (heat >= 0.35).astype(np.uint8)

    def write(a: np.ndarray, name: str) -> Path:
        im = sitk.GetImageFromArray(a)
        im.CopyInformation(img)
        sitk.WriteImage(im, str(out / name))
        return out / name

    files = {"saliency": write(heat, "saliency.nii.gz"), "levels": write(levels, "levels.nii.gz"),
             "mask": write(mask, "mask.nii.gz")}
    result = {
        "result_id": "selftest",
        "method": "gradcam++",
        "targets": ["glioma"],
        "prediction": {"label": "glioma", "probabilities": {"glioma": 0.81, "healthy": 0.12, "metastasis": 0.07}},
        "mask": {"empty": False, "voxels": int(mask.sum()), "fraction_of_brain": float(mask.mean()),
                 "levels_percent": LEVELS_PERCENT},
        "findings": {"levels": [{"level": 4, "anatomy": [{"name": "Left_Insular_Cortex", "fraction": 0.7},
                                                         {"name": "Left_Putamen", "fraction": 0.2}]}]},
        "image": {"size": list(img.GetSize()), "spacing": list(img.GetSpacing()),
                  "origin": list(img.GetOrigin()), "direction": list(img.GetDirection())},
    }
    (out / "result.json").write_text(json.dumps(result))
    return result, files


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise AssertionError(message)


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, float) - np.asarray(b, float)).max())


def run_scene_self_test(xs: XAIScene, workdir: str | os.PathLike, left_handed: bool = False) -> dict[str, Any]:
    """The whole round trip in ``xs``'s scene; raises AssertionError naming the first mismatch.

    Returns what was checked (numbers), for logs.
    """
    import SimpleITK as sitk

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    ijk_to_ras = oblique_ijk_to_ras(left_handed=left_handed)
    volume = synthetic_input()
    node = xs.add_volume(volume, ijk_to_ras, "XAI selftest input")

    # 1. Upload path: the module writes the node; the server reads it with ITK (LPS).
    uploaded = xs.write_volume(node, work / "input.nii.gz")
    itk = sitk.ReadImage(str(uploaded))
    from_itk = ras_from_lps_geometry(itk.GetSpacing(), itk.GetOrigin(), itk.GetDirection())
    err = _max_abs(from_itk, ijk_to_ras)
    _check(err < GEOMETRY_TOL, f"uploaded file's ITK geometry differs from the node's IJK-to-RAS by {err:.2e}")
    _check(np.array_equal(sitk.GetArrayFromImage(itk), volume), "uploaded voxels differ from the node's")

    # 2. Results from the "server" on the same LPS grid, into the scene.
    result, files = make_server_outputs(uploaded, work / "server")
    heat = sitk.GetArrayFromImage(sitk.ReadImage(str(files["saliency"])))
    levels = sitk.GetArrayFromImage(sitk.ReadImage(str(files["levels"])))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(files["mask"])))
    nodes = xs.import_explanation(result, files, node)
    err = _max_abs(xs.ijk_to_ras(nodes.heatmap), ijk_to_ras)
    _check(err < GEOMETRY_TOL, f"heatmap IJK-to-RAS differs from the input's by {err:.2e}")
    _check(np.array_equal(xs.array(nodes.heatmap), heat), "heatmap voxels differ from the server's file")
    peak = np.unravel_index(int(np.argmax(xs.array(nodes.heatmap))), volume.shape)
    _check(tuple(int(p) for p in peak) == (7, 5, 10), f"heatmap peak at voxel {peak}, expected (7, 5, 10)")

    # 3. Nested levels: one segment each, overlap kept.
    _check(len(nodes.level_segment_ids) == 4, f"expected 4 level segments, got {len(nodes.level_segment_ids)}")
    for n, sid in enumerate(nodes.level_segment_ids, start=1):
        got = xs.segment_array(nodes.segmentation, sid, node)
        _check(np.array_equal(got, (levels >= n).astype(np.uint8)), f"level {n} segment differs from levels >= {n}")
    got_mask = xs.segment_array(nodes.segmentation, nodes.mask_segment_id, node)
    _check(np.array_equal(got_mask, mask), "mask segment differs from the server's mask")

    # 4. Correction: erase the lower half of the slices, paint a block elsewhere (Segment Editor logic).
    erase = np.zeros(volume.shape, np.uint8)
    erase[: volume.shape[0] // 2] = 1
    paint = np.zeros(volume.shape, np.uint8)
    paint[9:11, 10:13, 1:4] = 1
    xs.edit_segment(nodes.segmentation, nodes.mask_segment_id, erase, node, mode="remove")
    xs.edit_segment(nodes.segmentation, nodes.mask_segment_id, paint, node, mode="add")
    expected = ((mask > 0) & (erase == 0)) | (paint > 0)
    _check(expected.sum() != mask.sum(), "the test edit changed nothing")

    # 5. Export on the input grid, write for upload, read back as the server would.
    label_node = xs.export_label(nodes.segmentation, [nodes.mask_segment_id], node)
    _check(xs.same_grid(label_node, node), "exported label is not on the input grid")
    _check(np.array_equal(xs.array(label_node), expected.astype(np.uint8)), "exported label differs from the edit")
    label_path = xs.write_volume(label_node, work / "label.nii.gz")
    back = sitk.ReadImage(str(label_path))
    _check(np.array_equal(sitk.GetArrayFromImage(back), expected.astype(np.uint8)),
           "label file voxels differ from the edit")
    for what, a, b in (("spacing", back.GetSpacing(), itk.GetSpacing()), ("origin", back.GetOrigin(), itk.GetOrigin()),
                       ("direction", back.GetDirection(), itk.GetDirection())):
        err = _max_abs(a, b)
        _check(err < GEOMETRY_TOL, f"label file {what} differs from the uploaded image's by {err:.2e}")
    return {"shape": volume.shape, "mask_voxels": int(mask.sum()), "edited_voxels": int(expected.sum()),
            "segments": [nodes.segmentation.GetSegmentation().GetSegment(s).GetName()
                         for s in nodes.level_segment_ids + [nodes.mask_segment_id]]}

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

__all__ = ["LEVELS_PERCENT", "make_server_outputs", "oblique_ijk_to_ras", "run_scene_self_test", "sample_result",
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


def make_server_outputs(input_path: str | os.PathLike, out_dir: str | os.PathLike, peak_kji=(7, 5, 10),
                        with_findings: bool = True) -> tuple[dict[str, Any], dict[str, Path]]:
    """What the server would return for ``input_path``: files on the input's LPS grid, plus the reply
    (:func:`sample_result`, with or without findings).

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
    geometry = {"size": list(img.GetSize()), "spacing": list(img.GetSpacing()), "origin": list(img.GetOrigin()),
                "direction": list(img.GetDirection())}
    result = sample_result(geometry, voxels=int(mask.sum()), fraction=float(mask.mean()),
                           with_findings=with_findings)
    (out / "result.json").write_text(json.dumps(result))
    return result, files


def _structure(name: str, label: str, lobe: str, side: str, ml: float, fraction: float) -> dict[str, Any]:
    return {"name": name, "label": label, "lobe": lobe, "hemisphere": side, "volume_ml": ml, "fraction": fraction,
            "mean_probability": 0.71, "saliency_share": round(fraction * 0.9, 4)}


def sample_result(geometry: dict[str, Any], voxels: int = 120, fraction: float = 0.03,
                  with_findings: bool = True) -> dict[str, Any]:
    """A complete explanation reply of the result schema (``ExplanationResult``, findings included
    unless ``with_findings`` is False), as the server sends it for a ``gradcampp`` request with
    ``report: true``. The tests validate it with the project's pydantic models, so it stays a real reply."""
    probabilities = {"none": 0.05, "glioma": 0.81, "meningioma": 0.07, "metastasis": 0.07}
    model = {"name": "brain-lesion-3d", "version": "1.2.0", "weights_sha256": "0" * 64}
    mask = {"empty": False, "reason": None, "threshold": 0.42, "percentile": 96.8, "voxels": voxels,
            "volume_ml": round(voxels * 0.0026, 3), "fraction_of_brain": fraction, "components": 1,
            "levels_percent": LEVELS_PERCENT, "levels_encoding": "nested: level n = top levels_percent[n-1] %"}
    result: dict[str, Any] = {
        "schema_version": "2.0", "task": "gradcampp", "image_id": "selftest", "result_id": "selftest",
        "prediction": {"label": "glioma", "probabilities": probabilities, "calibration": "temperature scaling",
                       "temperature": 1.0, "logits": [-1.2, 2.1, -0.9, -0.9],
                       "lesion_volume_ml_segmentation_head": 14.2},
        "method": "gradcam++", "method_title": "Grad-CAM++", "targets": ["glioma"], "params": {"target": "predicted"},
        "saliency": {"flat": [False], "peak_index_ijk": [10, 5, 7], "peak_lps_mm": [1.0, 2.0, 3.0],
                     "display": "minmax", "raw_max": [0.8], "convergence_delta": None, "extras": {}},
        "mask": mask, "image": geometry, "timings_s": {"explain": 0.5}, "model": model,
        "software": {"xai_core": "selftest"},
        "artifacts": {k: f"/xai/results/selftest/{k}.nii.gz" for k in ("saliency", "levels", "mask")},
        "findings": None, "report": None,
    }
    if not with_findings:
        return result
    structures = [_structure("Left_Insular_Cortex", "left insular cortex", "insula", "left", 1.9, 0.61),
                  _structure("Left_Central_Opercular_Cortex", "left central opercular cortex", "frontal", "left",
                             0.8, 0.25)]
    level_top = {1: "Left_Central_Opercular_Cortex", 3: "Left_Insular_Cortex", 4: "Left_Insular_Cortex"}
    result["findings"] = {
        "schema_version": "1.1",
        "study": {"size": geometry["size"], "spacing_mm": geometry["spacing"], "origin_lps_mm": geometry["origin"],
                  "direction": geometry["direction"]},
        "model": {**model, "classes": list(probabilities)},
        "prediction": {"label": "glioma", "probabilities": probabilities, "calibration": "temperature scaling",
                       "temperature": 1.0, "lesion_volume_ml_segmentation_head": 14.2},
        "explanation": {"method": "gradcam++", "targets": ["glioma"], "params": {"target": "predicted"},
                        "flat": [False], "peak_lps_mm": [1.0, 2.0, 3.0]},
        "mask": {k: mask[k] for k in ("empty", "reason", "voxels", "volume_ml", "fraction_of_brain", "components",
                                      "threshold", "percentile")},
        "registration": {"kind": "affine", "metric": "mattes", "metric_value": -0.61, "ncc": 0.93, "dice": 0.95,
                         "det": 1.02, "likely_failed": False, "reason": None, "seconds": 2.1, "stop": "converged"},
        "location": {"region": "gradcam++ explanation mask of glioma", "structures": structures,
                     "top_structure": "Left_Insular_Cortex", "lobes": {"insula": 0.61, "frontal": 0.25},
                     "hemisphere": "left", "left_fraction": 1.0, "crosses_midline": False,
                     "outside_atlas_fraction": 0.14, "centroid_mni_ras_mm": [-38.0, 4.0, 2.0],
                     "peak_mni_ras_mm": [-39.0, 5.0, 1.0], "peak_structure": "Left_Insular_Cortex",
                     "volume_ml": mask["volume_ml"], "components": 1, "notes": []},
        "counterfactual": {"status": "done", "label_before": "glioma", "p_before": 0.81, "label_after": "none",
                           "p_after": 0.12, "change": -0.69,
                           "sentence": "In-filling the region with healthy tissue lowers the probability of "
                                       "glioma from 0.81 to 0.12."},
        "levels": [{"level": n, "percent": p, "voxels": 10 * (5 - n), "volume_ml": 0.1 * (5 - n),
                    "top_structure": level_top.get(n), "hemisphere": "left" if n in level_top else "none",
                    "structures": [level_top[n]] if n in level_top else []}
                   for n, p in enumerate(LEVELS_PERCENT, start=1)],
        "quality_flags": [{"code": "mostly_unlabelled", "severity": "info",
                           "message": "14 % of the region lies outside every atlas structure"}],
        "software": {"xai_core": "selftest"},
    }
    result["report"] = ("# Draft report\n\n## Findings\n\n- **Prediction:** glioma (p = 0.81).\n\n"
                        "| structure | lobe |\n|---|---|\n| left insular cortex | insula |\n")
    return result


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
    segmentation = nodes.segmentation.GetSegmentation()
    names = [segmentation.GetSegment(s).GetName() for s in nodes.level_segment_ids + [nodes.mask_segment_id]]
    want = ["Saliency top 20 % – Left central opercular cortex", "Saliency top 10 %",
            "Saliency top 5 % – Left insular cortex", "Saliency top 1 % – Left insular cortex",
            "Salient region – Left insular cortex"]
    _check(names == want, f"segment names {names}, expected {want}")
    # Colour ramp: each level brighter (more salient) than the one around it.
    brightness = [sum(segmentation.GetSegment(s).GetColor()) for s in nodes.level_segment_ids]
    _check(brightness == sorted(brightness) and len(set(brightness)) == 4, f"level colours not a ramp: {brightness}")

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

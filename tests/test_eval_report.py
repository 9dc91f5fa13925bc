"""The evaluation report (xai_core.eval_report) from known rows: the headline numbers are the means of the
cases, every figure and CSV is written; and `xai evaluate` end to end on a tiny model."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from xai_core.eval_report import headline_markdown, headline_rows, write_report
from xai_core.settings import Settings


def _result(methods=("gradcam", "scorecam"), n=4):
    rng = np.random.default_rng(0)
    cases, curves, sanity, examples = [], [], [], []
    for m_i, m in enumerate(methods):
        for s in range(n):
            morf = [1.0] + list(np.linspace(0.3, 0.0, 4) + 0.1 * m_i)
            lerf = [1.0, 1.0, 0.9, 0.8, 0.1]
            cases.append({"study_id": f"s{s}", "label": "glioma", "format": "nifti", "method": m, "target": "glioma",
                          "predicted": "glioma", "p_target": 0.9, "mask_empty": False, "mask_voxels": 10,
                          "seconds": 1.0 + m_i, "dice": 0.5 + 0.1 * m_i + 0.01 * s, "iou": 0.4, "auprc": 0.6,
                          "pointing_game": float(s % 2), "auc_deletion_morf": 0.2 + 0.1 * m_i,
                          "auc_deletion_lerf": 0.8, "aopc_morf": 0.7, "aopc_lerf": 0.1, "abpc": 0.6 - 0.1 * m_i})
            for name, sc in (("deletion_morf", morf), ("deletion_lerf", lerf)):
                curves.append({"study_id": f"s{s}", "method": m, "curve": name,
                               "fractions": [0, 0.25, 0.5, 0.75, 1.0], "scores": sc})
        for s in range(2):
            steps = [{"layer": "original", "rank_correlation": 1.0, "ssim": 1.0, "flat": False}] + [
                {"layer": f"l{i}", "rank_correlation": 0.9 if m == "scorecam" else 0.1 / (i + 1), "ssim": 0.5,
                 "flat": False} for i in range(3)]
            sanity.append({"method": m, "target": 1, "steps": steps, "threshold": 0.5, "study_id": f"s{s}",
                           "final_rank_correlation": steps[-1]["rank_correlation"],
                           "passed": steps[-1]["rank_correlation"] < 0.5, "model": {"name": "x", "version": "1"}})
        img = rng.random((20, 24)).astype(np.float32)
        truth = np.zeros((20, 24), bool)
        truth[5:9, 6:10] = True
        examples.append({"study_id": "s0", "method": m, "label": "glioma", "target": "glioma", "k": 3, "image": img,
                         "saliency": img, "truth": truth, "mask": truth, "aspect": 1.0})
    return {"cases": cases, "curves": curves, "sanity": sanity, "examples": examples, "n_studies": n,
            "engine": {"engine": "local", "workers": 1, "wall_s": 12.0}}


def test_report_files_and_headline_numbers(tmp_path):
    res = _result()
    cfg = Settings(sanity_verdicts=tmp_path / "verdicts.json")
    paths = write_report(res, tmp_path / "r", command="xai evaluate --data d", data="d", settings=cfg)
    for key in ("report", "metrics_png", "curves_png", "sanity_plot", "overlays_png", "per_study", "curves",
                "sanity_cases", "headline"):
        assert paths[key].is_file() and paths[key].stat().st_size > 100, key
    head = {r["method"]: r for r in headline_rows(res["cases"], res["sanity"])}
    assert head["gradcam"]["dice"] == pytest.approx(np.mean([0.5, 0.51, 0.52, 0.53]))
    assert head["scorecam"]["auc_deletion_morf"] == pytest.approx(0.3)
    assert head["gradcam"]["sanity_rank_correlation"] == pytest.approx(0.1 / 3)
    assert head["scorecam"]["seconds"] == pytest.approx(2.0)
    text = paths["report"].read_text()
    assert headline_markdown(list(head.values())) in text
    assert "xai evaluate --data d" in text and "![curves](curves.png)" in text and "failed_sanity_check" in text
    with open(paths["curves"], newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * 4 * 2 * 5
    with open(paths["per_study"], newline="") as f:
        assert len(list(csv.DictReader(f))) == 8


def test_report_without_faithfulness_or_sanity(tmp_path):
    res = _result()
    for c in res["cases"]:
        for k in ("auc_deletion_morf", "auc_deletion_lerf", "aopc_morf", "aopc_lerf", "abpc"):
            c.pop(k)
    res.update(curves=[], sanity=[], examples=[])
    paths = write_report(res, tmp_path, settings=Settings(sanity_verdicts=tmp_path / "v.json"))
    assert "curves_png" not in paths and "–" in paths["report"].read_text()


def test_xai_evaluate_and_sanity_commands_on_a_tiny_model(tmp_path, monkeypatch):
    """The CLI end to end: report.md with its figures, then `xai sanity` on one image and `xai explain-batch`."""
    spec = importlib.util.spec_from_file_location("xai_server_utils_report",
                                                  Path(__file__).with_name("server_utils.py"))
    su = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = su
    spec.loader.exec_module(su)
    from xai_core.cli import main
    from xai_core.io import write_image

    su.make_tiny_model(tmp_path / "w", seed=1)
    data = tmp_path / "data"
    data.mkdir()
    lines = ["study_id,label,label_index,image,mask,format,top_structure,structures,hemisphere,volume_ml,n_lesions,"
             "size,spacing,origin,direction,seed,index"]
    for n in range(3):
        img, mask = su.synthetic_study((26, 30, 28), (6.0, 6.0, 6.0), (-80.0, -90.0, -80.0), seed=n)
        write_image(img, data / f"s{n}.nii.gz")
        write_image(mask, data / f"m{n}.nii.gz")
        lines.append(f's{n},glioma,1,s{n}.nii.gz,m{n}.nii.gz,nifti,x,"[]",left,1.0,1,"[28, 30, 26]","[6, 6, 6]",'
                     f'"[0, 0, 0]","[1, 0, 0, 0, 1, 0, 0, 0, 1]",0,{n}')
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("XAI_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("XAI_USER_WEIGHTS_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("XAI_SANITY_VERDICTS", str(tmp_path / "verdicts.json"))
    monkeypatch.setenv("XAI_FAITHFULNESS_STEPS", "4")
    out = tmp_path / "eval"
    assert main(["evaluate", "--methods", "gradcam", "gradcam++", "--data", str(data), "--out", str(out),
                 "--sanity-studies", "1", "--examples", "2"]) == 0
    text = (out / "report.md").read_text()
    assert "| gradcam |" in text and "| gradcam++ |" in text
    for png in ("metrics.png", "curves.png", "sanity_cascade.png", "overlays.png"):
        assert (out / png).stat().st_size > 5_000, png
    assert (tmp_path / "verdicts.json").is_file()

    assert main(["sanity", str(data / "s0.nii.gz"), "--methods", "gradcam", "--out", str(tmp_path / "san")]) == 0
    assert (tmp_path / "san" / "sanity_cascade.png").is_file() and (tmp_path / "san" / "sanity.md").is_file()
    assert main(["sanity", "--methods", "gradcam", "--out", str(tmp_path / "san2")]) == 2  # neither IMAGE nor --data

    images = tmp_path / "images"
    images.mkdir()
    for n in range(2):
        (images / f"s{n}.nii.gz").write_bytes((data / f"s{n}.nii.gz").read_bytes())
    assert main(["explain-batch", str(images), "--out", str(tmp_path / "batch"), "--methods", "gradcam"]) == 0
    with open(tmp_path / "batch" / "batch.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["study_id"] for r in rows] == ["s0", "s1"]
    assert (tmp_path / "batch" / "s1" / "gradcam" / "saliency.nii.gz").is_file()


def test_curves_of_studies_with_different_cube_counts_are_plotted(tmp_path):
    """Studies differ in their number of cubes, so on the log schedule their curves have different points
    (and, for small brains, fewer of them): the figure interpolates them onto one grid."""
    from xai_core.eval_report import _on_grid, plot_curves
    from xai_core.faithfulness import step_counts

    curves = []
    for sid, n in (("a", 300), ("b", 40)):
        counts = step_counts(n, 20, "log")
        fr = [c / n for c in counts]
        for order in ("morf", "lerf"):
            # MoRF falls after the first 2 % of cubes; LeRF only when the last 2 % go.
            scores = [1.0 if (f < 0.02 if order == "morf" else f <= 0.98) else 0.0 for f in fr]
            curves.append({"study_id": sid, "method": "m", "curve": f"deletion_{order}", "fractions": fr,
                           "scores": scores})
    assert len(curves[0]["fractions"]) != len(curves[2]["fractions"])
    path = plot_curves(curves, tmp_path / "curves.png")
    assert path.stat().st_size > 1000
    grid = np.array([0.005, 0.5])
    morf = _on_grid([c for c in curves if c["curve"] == "deletion_morf"], grid, lerf=False)
    lerf = _on_grid([c for c in curves if c["curve"] == "deletion_lerf"], grid, lerf=True)
    assert morf.shape == (2, 2) and (morf[:, 1] == 0).all() and morf[0, 0] == 1.0
    assert (lerf[:, 1] == 1.0).all()  # half the cubes still in place: the evidence is not yet removed

"""AOPC of VQA explanations with paired statistics, and ``xai evaluate --task vqa`` (issue 12, item 4).

The AOPC tests use toy forward functions whose answer probability is a known function of the
pixels, so the curve and its area can be computed by hand; the CLI test runs the tiny random-weight
``brain-vqa`` (tests/vqa_tiny.py) on a small SLAKE-layout folder written here.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from tests.vqa_tiny import tiny_vqa_model
from xai_core.cli import main
from xai_core.vqa_faithfulness import (
    AOPCSettings,
    aopc,
    aopc_from_curve,
    bootstrap_mean_ci,
    bootstrap_ratio_ci,
    compare,
    deletion_batch,
    deletion_counts,
    patch_scores,
    wilcoxon_p,
)

S, PATCH = 16, 4  # a 4 x 4 grid of 16 patches


def _weights() -> torch.Tensor:
    """Per-patch weights of the toy model, (4, 4): patch p weighs p + 1 (the last patch most)."""
    return torch.arange(1, 17, dtype=torch.float64).view(4, 4)


def _toy_forward(batch: torch.Tensor) -> torch.Tensor:
    """f(x) = sum over patches of w_p * mean(x over patch p) / sum(w): 1 on an all-ones image, and
    deleting patch p (fill 0) lowers f by exactly w_p / sum(w)."""
    means = batch[:, 0].double().reshape(-1, 4, PATCH, 4, PATCH).mean(dim=(2, 4))
    w = _weights()
    return (means * w).sum(dim=(1, 2)) / w.sum()


def _map_of(per_patch: torch.Tensor) -> torch.Tensor:
    """A (S, S) map that is constant on each patch."""
    return per_patch.repeat_interleave(PATCH, 0).repeat_interleave(PATCH, 1)


def test_patch_scores_counts_and_deletion_batch():
    m = _map_of(_weights())
    np.testing.assert_allclose(patch_scores(m, PATCH), (np.arange(1, 17) * PATCH * PATCH))
    np.testing.assert_allclose(patch_scores(-m, PATCH, absolute=True), patch_scores(m, PATCH))
    # Edge patches when S is not a multiple of the patch: a 5 x 5 map in 4-px patches is 2 x 2.
    np.testing.assert_allclose(patch_scores(np.ones((5, 5)), 4), [16, 4, 4, 1])
    np.testing.assert_array_equal(deletion_counts(196, 49, 0.25), np.arange(50))
    np.testing.assert_array_equal(deletion_counts(16, 4, 1.0), [0, 4, 8, 12, 16])
    x = torch.rand(1, 1, S, S, generator=torch.Generator().manual_seed(0)) + 1
    b = deletion_batch(x, np.array([15, 0, 3]), np.array([0, 1, 3]), PATCH, fill=0.0)
    assert b.shape == (3, 1, S, S)
    torch.testing.assert_close(b[0], x[0])
    assert (b[1, 0, 12:, 12:] == 0).all() and (b[1] == 0).sum() == PATCH * PATCH  # patch 15 only
    assert (b[2, 0, :4, :4] == 0).all() and (b[2, 0, :4, 12:] == 0).all() and (b[2] == 0).sum() == 3 * PATCH ** 2
    m2 = deletion_batch(x, np.array([5]), np.array([0, 1]), PATCH, fill="mean")
    torch.testing.assert_close(m2[1, 0, 4:8, 4:8], torch.full((4, 4), float(x.mean())))


def test_aopc_deleting_every_patch_on_a_hand_computable_toy():
    """Patches deleted one by one, most relevant first: f_k = 1 - (sum of the k largest w) / sum(w), so
    AOPC = 1/17 * sum_k (sum of the k largest w) / 136 with w = 1..16, exactly."""
    x = torch.ones(1, 1, S, S, dtype=torch.float64)
    s = AOPCSettings(patch=PATCH, steps=16, fraction=1.0, fill=0.0)
    res = aopc(_toy_forward, x, _map_of(_weights()), s)
    w = np.arange(16, 0, -1)
    expected_curve = 1 - np.concatenate([[0], np.cumsum(w)]) / w.sum()
    np.testing.assert_allclose(res["curve"], expected_curve, atol=1e-12)
    expected = np.mean(np.concatenate([[0], np.cumsum(w)]) / w.sum())
    assert res["aopc"] == pytest.approx(expected, abs=1e-12)
    assert res["curve"][-1] == pytest.approx(0.0, abs=1e-12)  # everything deleted
    assert aopc_from_curve([0.8, 0.5, 0.2]) == pytest.approx((0 + 0.3 + 0.6) / 3)


def test_aopc_of_the_true_relevance_beats_its_reverse_and_random():
    x = torch.ones(1, 1, S, S, dtype=torch.float64)
    s = AOPCSettings(patch=PATCH, steps=4, fraction=0.5)
    good = aopc(_toy_forward, x, _map_of(_weights()), s)["aopc"]
    reverse = aopc(_toy_forward, x, _map_of(-_weights()), s)["aopc"]  # signed: the weakest patches first
    assert good > reverse > 0
    rand = [aopc(_toy_forward, x, settings=s, order=np.random.default_rng(i).permutation(16))["aopc"]
            for i in range(20)]
    assert reverse < np.mean(rand) < good
    # Ranked by magnitude, the negated map is as good as the map itself.
    s_abs = AOPCSettings(patch=PATCH, steps=4, fraction=0.5, rank="absolute")
    assert aopc(_toy_forward, x, _map_of(-_weights()), s_abs)["aopc"] == pytest.approx(good)


def test_aopc_settings_are_checked():
    for bad in ({"patch": 0}, {"steps": 0}, {"fraction": 0.0}, {"fraction": 1.5}, {"fill": "blur"},
                {"rank": "both"}):
        with pytest.raises(ValueError):
            AOPCSettings(**bad)


def test_bootstrap_ci_contains_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 30), rng.normal(1.0, 1.0, 3000)
    m1, lo1, hi1 = bootstrap_mean_ci(small, n_boot=2000)
    m2, lo2, hi2 = bootstrap_mean_ci(large, n_boot=2000)
    assert lo1 < m1 < hi1 and lo2 < m2 < hi2
    assert m1 == pytest.approx(small.mean()) and lo2 < 1.0 < hi2
    assert (hi2 - lo2) < (hi1 - lo1) / 5  # sqrt(100) = 10 times narrower, up to resampling noise
    assert bootstrap_mean_ci(small, n_boot=500, seed=3) == bootstrap_mean_ci(small, n_boot=500, seed=3)
    assert all(np.isnan(bootstrap_mean_ci([])))


def test_ratio_ci_is_paired_and_brackets_the_ratio():
    rng = np.random.default_rng(1)
    b = rng.uniform(0.1, 0.5, 200)
    a = 1.3 * b + rng.normal(0, 0.01, 200)  # a tracks b case by case
    r, lo, hi = bootstrap_ratio_ci(a, b, n_boot=2000)
    assert r == pytest.approx(a.mean() / b.mean())
    assert lo < r < hi and 1.25 < lo and hi < 1.35
    # Pairing matters: shuffling a breaks the case-by-case link and widens the interval.
    _, lo_u, hi_u = bootstrap_ratio_ci(rng.permutation(a), b, n_boot=2000)
    assert (hi_u - lo_u) > 3 * (hi - lo)
    with pytest.raises(ValueError):
        bootstrap_ratio_ci(a, b[:10])


def test_wilcoxon_p_small_for_a_shift_large_for_equal():
    rng = np.random.default_rng(2)
    b = rng.uniform(0, 1, 200)
    assert wilcoxon_p(b + 0.1 + rng.normal(0, 0.05, 200), b) < 1e-6
    assert wilcoxon_p(b + rng.normal(0, 0.05, 200), b) > 0.01
    assert wilcoxon_p(b, b) == 1.0
    c = compare(1.3 * b + 0.01, b, n_boot=1000)
    assert c["ratio"] > 1.25 and c["ratio_ci_low"] > 1 and c["p_wilcoxon"] < 1e-6
    assert c["gain"] == pytest.approx(c["ratio"] - 1) and c["share_a_greater"] == 1.0


# ---------------------------------------------------------------------------------------------- the CLI

QUESTIONS = [("is there a lesion on this slice", "yes", "CLOSED", "presence"),
             ("normal or abnormal?", "abnormal", "CLOSED", "normality"),
             ("which plane is this slice in", "axial", "OPEN", "plane"),
             ("what kind of lesion is this", "glioma", "OPEN", "kind")]


def _slake_folder(root) -> None:
    """3 images (40 x 48 px, a dark head with a bright blob), 4 questions each, in every split."""
    rng = np.random.default_rng(0)
    records, qid = {"train": [], "validation": [], "test": []}, 0
    for i in range(3):
        img = (rng.uniform(0, 60, (40, 48)) * (np.hypot(*np.mgrid[-20:20, -24:24]) < 18)).astype(np.uint8)
        img[10 + 5 * i:18 + 5 * i, 14:24] = 240
        folder = root / "imgs" / f"case{i}_axial0"
        folder.mkdir(parents=True)
        PILImage.fromarray(img).save(folder / "source.png")
        for q, ans, atype, qtype in QUESTIONS:
            rec = {"img_id": i, "qid": qid, "img_name": f"case{i}_axial0/source.png", "question": q, "answer": ans,
                   "answer_type": atype, "content_type": "Abnormality", "location": "Brain", "modality": "MRI",
                   "base_type": "vqa", "q_lang": "en", "question_type": qtype, "phrasing_held_out": False}
            for split in records:
                records[split].append({**rec, "qid": qid})
                qid += 1
    for split, recs in records.items():
        (root / f"{split}.json").write_text(json.dumps(recs))


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("vqa_aopc")
    tiny_vqa_model(base / "weights")
    _slake_folder(base / "slake")
    return base


def test_cli_evaluate_vqa_prints_the_table_and_writes_the_files(tiny_setup, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["evaluate", "--task", "vqa", "--methods", "relig", "ig", "--data", str(tiny_setup / "slake"),
               "--weights-dir", str(tiny_setup / "weights"), "--cases", "5", "--aopc-steps", "4",
               "--aopc-fraction", "1", "--param", "n_steps=4", "--param", "n_samples=2", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for needle in ("accuracy, overall", "accuracy, closed", "accuracy, open", "AOPC, relig (5 cases)",
                   "AOPC, ig (5 cases)", "random order (control)", "relative gain relig / ig", "Wilcoxon", "1.29x"):
        assert needle in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"]["overall"]["n"] == 12 and summary["params"]["n_steps"] == 4
    assert summary["counts"] == [0, 4, 8, 12, 16]  # 32 px tiny model, 8 px patches: 16 patches
    c = summary["stats"]["comparison"]
    assert c["a"] == "relig" and c["b"] == "ig" and 0 <= c["p_wilcoxon"] <= 1
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and len({r["qid"] for r in rows}) == 5
    assert {"aopc_relig", "aopc_ig", "aopc_absolute_relig", "aopc_random", "f0", "correct"} <= set(rows[0])
    mean = np.mean([float(r["aopc_relig"]) for r in rows])
    assert summary["stats"]["methods"]["relig"]["mean"] == pytest.approx(mean)
    with open(out / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert len(curves) == 5 * (2 * 2 + 1) * 5  # cases x (methods x rankings + random) x (L + 1)
    # Every curve starts at the clean image's probability of the answer given.
    f0 = {r["qid"]: float(r["f0"]) for r in rows}
    for c0 in (c for c in curves if c["step"] == "0"):
        assert float(c0["f"]) == pytest.approx(f0[c0["qid"]], abs=1e-5)
    assert "By question type" in (out / "report.md").read_text()


def test_cli_evaluate_vqa_bad_input_is_one_line_exit_2(tiny_setup, tmp_path, capsys):
    base = ["evaluate", "--task", "vqa", "--weights-dir", str(tiny_setup / "weights"), "--out", str(tmp_path)]
    for extra in (["--data", str(tmp_path / "missing")],
                  ["--data", str(tiny_setup / "slake"), "--cases", "0"],
                  ["--data", str(tiny_setup / "slake"), "--aopc-fill", "blurred"],
                  ["--data", str(tiny_setup / "slake"), "--aopc-fraction", "2"],
                  ["--data", str(tiny_setup / "slake"), "--model", "no-such-model"]):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("xai evaluate: error:") and "\n" not in err


def test_evaluation_quadrature_comes_from_the_settings(tiny_setup, tmp_path, monkeypatch, capsys):
    """Both methods run at IG's path steps and RE-LIG's noisy samples of the process's Settings (env
    ``XAI_VQA_*``), unless ``--param`` says otherwise."""
    from xai_core.settings import Settings
    from xai_core.vqa_faithfulness import evaluation_params

    assert evaluation_params() == {"n_steps": 32, "n_samples": 8}
    assert evaluation_params(Settings(vqa_ig_n_steps=6, vqa_relig_n_samples=3)) == {"n_steps": 6, "n_samples": 3}
    monkeypatch.setenv("XAI_VQA_IG_N_STEPS", "3")
    monkeypatch.setenv("XAI_VQA_RELIG_N_SAMPLES", "2")
    out = tmp_path / "out"
    rc = main(["evaluate", "--task", "vqa", "--methods", "relig", "ig", "--data", str(tiny_setup / "slake"),
               "--weights-dir", str(tiny_setup / "weights"), "--cases", "2", "--aopc-steps", "2",
               "--aopc-fraction", "1", "--param", "n_samples=1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["params"] == {"n_steps": 3, "n_samples": 1}

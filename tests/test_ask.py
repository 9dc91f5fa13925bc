"""Asking (``xai_core.ask``, ``xai ask``): a question about one patient-plane slice of a volume.

A tiny random-weight brain-vqa model (``tests/vqa_tiny.py``) answers; the checks are on what must hold
whatever the weights: the files, the heatmap volume's geometry (an oblique volume included), the
heatmap lying exactly on the slab of the requested slice, one score per question token (none for
ig), the answer being the model's own, and one-line errors with exit code 2.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from xai_core.cli import main
from xai_core.io import Image, write_image
from xai_core.schema import VQAAnswer


def _load_helper(name: str):
    # By file path: the monailabel wheel installs a top-level ``tests`` package that could shadow ours.
    spec = importlib.util.spec_from_file_location(f"xai_test_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


su = _load_helper("server_utils")
vt = _load_helper("vqa_tiny")

QUESTION = "Is there a lesion?"
FAST = {"relig": ["--param", "n_samples=2", "--param", "n_steps=4"]}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vqa_weights")
    vt.tiny_vqa_model(folder)
    return folder


@pytest.fixture(scope="module")
def model(weights):
    from xai_core.models import load

    return load("brain-vqa", device="cpu", weights_dir=weights)


@pytest.fixture(scope="module")
def oblique() -> Image:
    """A head-like volume, anisotropic voxels, direction rotated 25 degrees about (1, 2, 3)."""
    return vt.oblique_volume(seed=1)


@pytest.fixture
def cli_env(weights, tmp_path, monkeypatch):
    """The CLI reads its weight folders from the environment (Settings): the tiny model only."""
    monkeypatch.setenv("XAI_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("XAI_USER_WEIGHTS_DIR", str(tmp_path / "no_user_weights"))
    monkeypatch.setenv("XAI_DEVICE", "cpu")


def read_volume(path: Path) -> Image:
    # sitk directly: read_image refuses constant volumes, and a heatmap is mostly zeros.
    return Image.from_sitk(sitk.ReadImage(str(path)))


def lps_of_voxels(image: Image, mask: np.ndarray) -> np.ndarray:
    """LPS mm of the voxel centres where ``mask`` (k, j, i) is true, shape (N, 3)."""
    kji = np.argwhere(mask)
    return image.index_to_physical(kji[:, ::-1].astype(float))


def slab_of(image: Image, axis: int, position_mm: float) -> tuple[np.ndarray, float]:
    """Voxels whose centre lies on the slice's slab, computed here from the volume alone: along LPS
    ``axis`` one voxel of the volume extends sum_k |D[axis, k]| * spacing_k mm."""
    thickness = float(np.abs(image.direction_matrix[axis]) @ np.asarray(image.spacing, float))
    kji = np.argwhere(np.ones(image.array.shape, bool))
    coord = image.index_to_physical(kji[:, ::-1].astype(float))[:, axis]
    d = coord - position_mm
    return ((d >= -thickness / 2) & (d < thickness / 2)).reshape(image.array.shape), thickness


def assert_same_geometry(got: Image, ref: Image, tol: float = 1e-4) -> None:
    assert got.size == ref.size
    np.testing.assert_allclose(got.spacing, ref.spacing, atol=tol)
    np.testing.assert_allclose(got.origin, ref.origin, atol=tol)
    np.testing.assert_allclose(got.direction, ref.direction, atol=tol)


def test_cli_ask_writes_the_answer_and_a_heatmap_on_the_requested_oblique_slice(oblique, model, cli_env, tmp_path,
                                                                                capsys):
    src = write_image(oblique, tmp_path / "oblique.nii.gz")
    out = tmp_path / "out"
    code = main(["ask", str(src), QUESTION, "--plane", "coronal", "--slice-mm", "3", "--method", "relig",
                 *FAST["relig"], "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"answer.json", "saliency.nii.gz", "tokens.json", "overlay.png"}
    answer = json.loads((out / "answer.json").read_text())
    VQAAnswer.model_validate(answer)
    assert answer["files"] == {"saliency": "saliency.nii.gz", "tokens": "tokens.json", "overlay": "overlay.png",
                               "answer": "answer.json"}

    # The answer is the model's own on that slice, with its top 5 in order.
    x = model.prepare(oblique, question=QUESTION, plane="coronal", slice_mm=3.0)
    pred = model.predict(x)
    assert answer["answer"] == pred.answer and answer["answer_type"] == model.answer_type(pred.answer)
    assert [t["answer"] for t in answer["top"]] == [a for a, _ in pred.top]
    np.testing.assert_allclose([t["probability"] for t in answer["top"]], [p for _, p in pred.top], atol=1e-5)
    assert answer["confidence"] == answer["top"][0]["probability"]
    assert answer["model"] == {"name": "brain-vqa", "version": "0.0.1-test",
                               "weights_sha256": model.card.weights_sha256 or None}
    assert answer["slice"]["plane"] == "coronal" and answer["slice"]["axis"] == "P"
    assert answer["slice"]["position_mm"] == 3.0

    # The heatmap volume has the input's geometry, rotated direction included.
    sal = read_volume(out / "saliency.nii.gz")
    assert_same_geometry(sal, oblique)
    assert sal.array.dtype == np.float32 and 0 <= sal.array.min() and sal.array.max() <= 1 + 1e-6

    # Every non-zero voxel is on the coronal slab at P = 3 mm, and the slab is (nearly) filled.
    slab, thickness = slab_of(oblique, 1, 3.0)
    assert answer["slice"]["thickness_mm"] == pytest.approx(thickness, abs=1e-3)
    nonzero = sal.array > 0
    assert nonzero.sum() > 100
    assert not (nonzero & ~slab).any(), "heatmap voxels off the requested slice"
    assert nonzero.sum() >= 0.9 * slab.sum()
    p = lps_of_voxels(sal, nonzero)[:, 1]
    assert p.min() >= 3.0 - thickness / 2 - 1e-3 and p.max() < 3.0 + thickness / 2 + 1e-3
    peak = np.unravel_index(int(np.argmax(sal.array)), sal.array.shape)[::-1]
    np.testing.assert_allclose(answer["saliency"]["peak_lps_mm"], sal.index_to_physical(peak), atol=1e-2)
    assert answer["saliency"]["nonzero_voxels"] == int(nonzero.sum())

    # One score per question token, in the tokenizer's order; [CLS] and [SEP] are their own baseline.
    tokens = json.loads((out / "tokens.json").read_text())
    assert tokens["question"] == QUESTION and tokens["method"] == "relig"
    assert [t["token"] for t in tokens["tokens"]] == model.tokenise(QUESTION)[2] == x.meta["tokens"]
    assert tokens["tokens"] == answer["tokens"]
    scores = {t["token"]: t["score"] for t in tokens["tokens"]}
    assert scores["[CLS]"] == 0.0 and scores["[SEP]"] == 0.0
    assert any(abs(t["score"]) > 0 for t in tokens["tokens"][1:-1])

    png = (out / "overlay.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "xai ask" not in capsys.readouterr().err


def test_ig_scores_no_tokens_and_follows_slice_mm(oblique, model, tmp_path):
    from xai_core.ask import ask, write_answer

    res = ask(oblique, QUESTION, plane="coronal", slice_mm=-6.0, method="ig", model=model,
              method_kwargs={"n_steps": 4}, overlay=False)
    files = write_answer(res, tmp_path)
    assert set(files) == {"saliency", "tokens", "answer"}
    assert res.answer.tokens == [] and json.loads(files["tokens"].read_text())["tokens"] == []
    assert res.answer.method == "ig" and res.answer.saliency.layer is None  # the pixels themselves
    slab, _ = slab_of(oblique, 1, -6.0)
    nonzero = read_volume(files["saliency"]).array > 0
    assert nonzero.sum() > 100 and not (nonzero & ~slab).any()


def test_the_overlay_is_drawn_only_when_asked_and_drawn_later_is_the_same_picture(oblique, model, tmp_path,
                                                                                   monkeypatch):
    import xai_core.ask as ask_mod

    calls = []
    real = ask_mod.overlay_png
    monkeypatch.setattr(ask_mod, "overlay_png", lambda result, *a, **k: calls.append(1) or real(result, *a, **k))
    res = ask_mod.ask(oblique, QUESTION, plane="coronal", slice_mm=3.0, method="relig", model=model,
                      method_kwargs={"n_samples": 2, "n_steps": 4}, overlay=False)
    assert calls == [] and res.overlay_png is None and "overlay" not in res.answer.timings_s
    folder = tmp_path / "result"
    files = ask_mod.write_answer(res, folder)
    assert "overlay" not in files and not (folder / "overlay.png").exists()
    assert ask_mod.write_overlay_source(res, folder) == folder / ask_mod.OVERLAY_SOURCE

    path = ask_mod.draw_overlay(folder)
    assert path == folder / "overlay.png" and calls == [1]
    # The same bytes as the picture drawn at once: the kept slice, heatmap, window and answer are exact.
    assert path.read_bytes() == real(res) and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(folder.glob(".overlay.*"))  # no temporary file left behind
    assert ask_mod.draw_overlay(tmp_path / "not_a_vqa_result") is None

    # A damaged source or answer is a ValueError naming the file, never a picture of garbage.
    import shutil

    import numpy as np

    good = (folder / ask_mod.OVERLAY_SOURCE).read_bytes()
    damaged = {ask_mod.OVERLAY_SOURCE: [good[: len(good) // 2], b"not an archive"], "answer.json": [b"{"]}
    for name, contents in damaged.items():
        for content in contents:
            broken = tmp_path / "broken"
            shutil.rmtree(broken, ignore_errors=True)
            shutil.copytree(folder, broken)
            (broken / "overlay.png").unlink()
            (broken / name).write_bytes(content)
            with pytest.raises(ValueError, match=f"{name} is damaged"):
                ask_mod.draw_overlay(broken)
            assert not (broken / "overlay.png").exists()
    np.savez(broken / ask_mod.OVERLAY_SOURCE, slice_image=np.zeros((4, 4)))  # no window
    (broken / "answer.json").write_bytes((folder / "answer.json").read_bytes())
    with pytest.raises(ValueError, match="is damaged"):
        ask_mod.draw_overlay(broken)


def test_explainer_defaults_come_from_the_settings_passed_in(oblique, model, monkeypatch):
    from xai_core.ask import ask
    from xai_core.settings import Settings

    assert (Settings().vqa_relig_n_samples, Settings().vqa_relig_n_steps, Settings().vqa_ig_n_steps) == (8, 16, 32)
    passed = []
    real = model.explainer
    monkeypatch.setattr(model, "explainer", lambda method, **kw: passed.append((method, kw)) or real(method, **kw))
    small = Settings(vqa_relig_n_samples=1, vqa_relig_n_steps=3, vqa_ig_n_steps=5)
    res = ask(oblique, QUESTION, plane="coronal", slice_mm=3.0, method="relig", model=model, overlay=False,
              settings=small)
    assert passed[-1] == ("relig", {"n_samples": 1, "n_steps": 3}) and res.answer.params == passed[-1][1]
    # A request's own parameters still win over the settings.
    res = ask(oblique, QUESTION, plane="coronal", slice_mm=3.0, method="relig", model=model, overlay=False,
              settings=small, method_kwargs={"n_steps": 2})
    assert passed[-1] == ("relig", {"n_samples": 1, "n_steps": 2})
    # Read from the environment like every other setting.
    monkeypatch.setenv("XAI_VQA_IG_N_STEPS", "6")
    res = ask(oblique, QUESTION, plane="coronal", slice_mm=3.0, method="ig", model=model, overlay=False,
              settings=Settings())
    assert passed[-1] == ("ig", {"n_steps": 6}) and res.answer.params == {"n_steps": 6}
    with pytest.raises(ValueError, match="vqa_relig_n_samples"):
        Settings(vqa_relig_n_samples=0)  # outside the explainer's own bounds


def test_method_none_answers_on_the_centre_slice_without_a_heatmap(model, tmp_path):
    from xai_core.ask import ask, write_answer

    image, _ = su.synthetic_study((16, 20, 18), (2.0, 2.0, 2.5), (-17.0, -19.0, -20.0), seed=2)
    # "$" would start a matplotlib formula (and "$x^$" fail to parse) if the overlay did not draw text as text.
    res = ask(image, "  which side is the lesion on $x^$  ", plane="Axial", method="none", model=model)
    # Centre along S: origin + (size - 1) / 2 voxels of 2.5 mm (identity direction).
    assert res.answer.slice.position_mm == pytest.approx(-20.0 + 7.5 * 2.5)
    assert res.answer.question == "which side is the lesion on $x^$" and res.answer.slice.plane == "axial"
    assert res.saliency is None and res.answer.saliency is None and res.answer.tokens == []
    files = write_answer(res, tmp_path)
    assert set(files) == {"tokens", "overlay", "answer"}


def test_cli_errors_are_one_line_and_exit_code_2(oblique, cli_env, tmp_path, capsys):
    src = write_image(oblique, tmp_path / "oblique.nii.gz")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not an image")
    out = str(tmp_path / "o")
    cases = [
        ([str(garbage), QUESTION], "garbage.nii.gz"),
        ([str(tmp_path / "missing.nii.gz"), QUESTION], "missing.nii.gz"),
        ([str(src), "   "], "question is empty"),
        ([str(src), QUESTION, "--plane", "oblique"], "plane must be one of axial, coronal, sagittal"),
        ([str(src), QUESTION, "--method", "gradcam"], "method must be one of relig, ig, none"),
        ([str(src), QUESTION, "--slice-mm", "abc"], "slice_mm must be a number"),
        ([str(src), QUESTION, "--plane", "axial", "--slice-mm", "500"], "outside the volume"),
        ([str(src), QUESTION, "--model", "no-such-model"], "unknown model 'no-such-model'"),
    ]
    for argv, words in cases:
        code = main(["ask", *argv, "--out", out])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("xai ask: error:") and words in lines[0], (argv, err)
    assert not Path(out).exists()  # nothing was written for a refused request

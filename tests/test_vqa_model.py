"""brain-vqa (issue 12, items 2 and 4): local checkpoints, running above the training resolution,
RE-LIG on the VQA model against captum, token scores, and the training command on a tiny folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from xai_core.models import load
from xai_core.models.brain_vqa import IMAGE_LAYER, TOKEN_LAYER, load_encoders, load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from vqa_tiny import tiny_vqa_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqa_tiny")
    tiny_vqa_model(folder)
    return load("brain-vqa", device="cpu", weights_dir=folder)


def _slice_input(model, question: str = "Is there a lesion in this image?", seed: int = 0):
    rng = np.random.default_rng(seed)
    png = (rng.random((40, 48)) * 120).astype(np.uint8)
    png[10:20, 30:40] = 250  # a bright blob on one side
    return model.prepare_slice(png, question)


# ------------------------------------------------------------------------------- checkpoints

def test_local_clip_and_bert_checkpoints_load(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast, CLIPConfig, CLIPModel

    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
               patch_size=8, num_channels=3)
    # PubMedCLIP ships a whole CLIP model (vision_model.* and text_model.* weights).
    clip = CLIPModel(CLIPConfig(vision_config=vis, text_config=dict(hidden_size=32, intermediate_size=64,
                                                                    num_hidden_layers=1, num_attention_heads=2,
                                                                    vocab_size=99), projection_dim=16))
    clip.save_pretrained(tmp_path / "pubmedclip")
    bert = BertModel(BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=40))
    bert.save_pretrained(tmp_path / "biolinkbert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "there", "a", "lesion", "?"]
    # BioLinkBERT's tokenizer files: vocab.txt and tokenizer_config.json (no tokenizer.json).
    (tmp_path / "biolinkbert" / "vocab.txt").write_text("\n".join(words))
    (tmp_path / "biolinkbert" / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 512}))

    vision, text = load_encoders(tmp_path / "pubmedclip", tmp_path / "biolinkbert")
    ref = clip.vision_model.embeddings.patch_embedding.weight
    assert torch.equal(vision.embeddings.patch_embedding.weight, ref)  # the checkpoint's weights, not fresh ones
    assert torch.equal(text.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    tok = load_tokenizer(tmp_path / "biolinkbert")
    assert tok("Is there a lesion?")["input_ids"] == [2, 5, 6, 7, 8, 9, 3]
    BertTokenizerFast(vocab=str(tmp_path / "biolinkbert" / "vocab.txt")).save_pretrained(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved")("lesion?")["input_ids"] == [2, 8, 9, 3]

    from xai_core.train_vqa import VQATrainSettings, build_net

    net = build_net(VQATrainSettings(fusion_dim=32, heads=2), vocab=30, answers=4,
                    vision_dir=str(tmp_path / "pubmedclip"), text_dir=str(tmp_path / "biolinkbert"))
    assert net.run_size == 32  # twice the checkpoint's 16 px
    out = net(torch.rand(2, 1, 32, 32), torch.tensor([[2, 5, 8, 3], [2, 6, 9, 3]]))  # one channel, RGB encoder
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_encoders(tmp_path / "no-such-folder")


def test_model_trained_at_one_resolution_runs_at_twice_it(tiny):
    net = tiny.net
    size = net.vision.config.image_size
    assert net.run_size == 2 * size
    x = _slice_input(tiny)
    assert x.tensor.shape == (1, 1, 2 * size, 2 * size)
    p = net.vision.config.patch_size
    grids = {}
    shapes: list[torch.Size] = []

    def record(_m, _a, out) -> None:  # returns None: the layer's output is kept as it is
        shapes.append(out.shape[-2:])

    for s in (size, 2 * size):
        h = net.get_submodule(IMAGE_LAYER).register_forward_hook(record)
        try:
            tokens = net.encode_image(F.interpolate(x.tensor, size=(s, s)))
        finally:
            h.remove()
        assert tokens.shape[1] == 1 + (s // p) ** 2
        grids[s] = shapes[-1]
    assert grids == {size: (size // p, size // p), 2 * size: (2 * size // p, 2 * size // p)}
    # At twice the size the learned position grid is interpolated (bicubic), not truncated or repeated.
    emb = net.vision.embeddings
    pos = emb.position_embedding.weight[1:].reshape(1, size // p, size // p, -1).permute(0, 3, 1, 2)
    want = F.interpolate(pos, size=(2 * size // p, 2 * size // p), mode="bicubic", align_corners=False)
    got = emb.interpolate_pos_encoding(torch.zeros(1, 1 + (2 * size // p) ** 2, pos.shape[1]), 2 * size, 2 * size)
    assert torch.allclose(got[0, 1:], want.flatten(2).transpose(1, 2)[0], atol=1e-5)
    assert tiny.predict(x).probabilities.shape == (len(tiny.classes),)


# ------------------------------------------------------------------------------- RE-LIG

def test_relig_on_vqa_equals_captum_composition(tiny):
    from captum.attr import LayerIntegratedGradients

    x = _slice_input(tiny)
    pred = tiny.predict(x)
    n_samples, n_steps, frac = 3, 8, 0.1
    att = tiny.explainer("relig", n_samples=n_samples, n_steps=n_steps, stdev_fraction=frac, seed=5).attribute(
        x.inputs, target=[[pred.answer_index]], additional_forward_args=x.additional_forward_args)
    net = tiny.net
    ids, mask = x.additional_forward_args
    lig = LayerIntegratedGradients(net, [net.get_submodule(IMAGE_LAYER), net.get_submodule(TOKEN_LAYER)])
    x0 = x.tensor
    sigma = frac * float(x0.max() - x0.min())
    gen = torch.Generator().manual_seed(5)
    img = tok = 0
    for _ in range(n_samples):  # captum's NoiseTunnel would noise the token ids too (captum issue 1281)
        noisy = x0 + torch.randn(x0.shape, generator=gen) * sigma
        a_img, a_tok = lig.attribute((noisy, ids), baselines=(torch.zeros_like(x0), tiny.reference_ids(ids)),
                                     additional_forward_args=(mask,), target=pred.answer_index, n_steps=n_steps,
                                     method="gausslegendre")
        img, tok = img + a_img / n_samples, tok + a_tok / n_samples
    assert att.layer_raw.shape == (1, 1, *img.shape[1:])
    scale = float(img.abs().max())
    assert scale > 0
    assert float((att.layer_raw[:, 0] - img).abs().max()) < 1e-3 * scale
    tok_ours = att.aux_raw[TOKEN_LAYER][:, 0]
    assert float((tok_ours - tok).abs().max()) < 1e-3 * float(tok.abs().max())


def test_token_scores_and_completeness(tiny):
    x = _slice_input(tiny, "is the lesion on the left side")
    pred = tiny.predict(x)
    att = tiny.explainer("relig", n_samples=1, stdev_fraction=0.0, n_steps=64).attribute(
        x.inputs, target=[[pred.answer_index]], additional_forward_args=x.additional_forward_args)
    scores = tiny.token_scores(att, x)
    assert [s["token"] for s in scores] == x.meta["tokens"] and x.meta["tokens"][0] == "[CLS]"
    # [CLS] and [SEP] are their own baseline: no path, no attribution.
    assert scores[0]["score"] == 0.0 and scores[-1]["score"] == 0.0
    assert any(abs(s["score"]) > 0 for s in scores[1:-1])
    # Completeness along the joint path: image + question attributions = f(x) - f(baseline).
    ids, mask = x.additional_forward_args
    with torch.no_grad():
        f_x = tiny.net(x.tensor, ids, mask)[0, pred.answer_index]
        f_b = tiny.net(torch.zeros_like(x.tensor), tiny.reference_ids(ids), mask)[0, pred.answer_index]
    total = float(att.layer_raw.sum() + att.aux_raw[TOKEN_LAYER].sum())
    assert total == pytest.approx(float(f_x - f_b), abs=2e-3 + 0.02 * abs(float(f_x - f_b)))
    # Vanilla IG on the pixels (the baseline method) attributes no token.
    ig = tiny.explainer("ig", n_steps=8).attribute(x.inputs, target=[[pred.answer_index]],
                                                   additional_forward_args=x.additional_forward_args)
    assert tiny.token_scores(ig, x) == [] and ig.raw[0].shape == (1, 1, *x.tensor.shape[1:])


# ------------------------------------------------------------------------------- training

def _toy_slake(root: Path, n_images: int = 24) -> None:
    """Images with a bright square on the left or right half, or none; questions on presence and side."""
    rng = np.random.default_rng(0)
    splits: dict[str, list] = {"train": [], "validation": [], "test": []}
    qid = 0
    for i in range(n_images):
        split = "train" if i < n_images * 2 // 3 else ("validation" if i % 2 else "test")
        img = (rng.random((32, 32)) * 60).astype(np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        side = ("left", "right", None)[i % 3]
        if side:
            c = 22 if side == "left" else 4  # radiological: the patient's left is on the screen's right
            img[12:20, c:c + 6] = 240
            mask[12:20, c:c + 6] = 255
        d = root / "imgs" / f"toy{i}"
        d.mkdir(parents=True)
        PILImage.fromarray(img).save(d / "source.png")
        PILImage.fromarray(mask).save(d / "mask.png")
        base = dict(img_id=i, img_name=f"toy{i}/source.png", location="Brain", modality="MRI", base_type="vqa",
                    q_lang="en")
        qs = [("is there a lesion", "yes" if side else "no", "CLOSED", "presence", "Abnormality")]
        if side:
            qs.append(("which side is the lesion on", side, "OPEN", "side_open", "Position"))
        for q, a, t, qt, ct in qs:
            splits[split].append(dict(base, qid=qid, question=q, answer=a, answer_type=t, content_type=ct,
                                      question_type=qt, phrasing=0, phrasing_held_out=split == "test" and qid % 2))
            qid += 1
    for name, recs in splits.items():
        (root / f"{name}.json").write_text(json.dumps(recs))


def test_train_command_writes_a_loadable_model(tmp_path):
    from xai_core.train_vqa import VQATrainSettings, train_brain_vqa

    _toy_slake(tmp_path / "toy")
    cfg = VQATrainSettings(pretrain_size=16, run_size=32, vision_hidden=32, vision_layers=1, text_hidden=32,
                           text_layers=1, heads=2, fusion_dim=32, fusion_layers=1, vocab_size=60,
                           mlm_minutes=0.02, clip_minutes=0.02, vqa_minutes=0.05, clip_batch=8, vqa_images=4)
    logs: list[str] = []
    card_path = train_brain_vqa(tmp_path / "toy", tmp_path / "run", cfg, version="0.1.0", log=logs.append)
    card = json.loads(card_path.read_text())
    assert card["kind"] == "vqa" and card["version"] == "0.1.0" and card["classes"] == ["left", "no", "right", "yes"]
    assert card["layers"] == {"relig": IMAGE_LAYER, "relig_tokens": TOKEN_LAYER}
    m = card["metrics"]
    assert m["run_size"]["pixels"] == 32 and m["pretrain_size"]["pixels"] == 16
    n_test = m["run_size"]["overall"]["n"]
    assert n_test == card["training"]["test_questions"] > 0
    assert m["run_size"]["closed"]["n"] + m["run_size"]["open"]["n"] == n_test
    assert 0 < m["run_size"]["held_out_phrasings"]["overall"]["n"] < n_test
    assert set(card["training"]["stages"]) == {"mlm", "clip", "vqa"}
    assert any("clip step" in line or "clip: done" in line for line in logs)
    model = load("brain-vqa", device="cpu", weights_dir=card_path.parent)
    pred = model.predict(model.prepare_slice(np.zeros((20, 30), np.uint8), "is there a lesion"))
    assert pred.answer in card["classes"] and pred.answer_type in ("OPEN", "CLOSED")
    assert len(pred.top) == 4 and pred.top[0][1] == pytest.approx(pred.confidence)
    # --resume skips the finished stages (their checkpoints are reloaded, not retrained).
    logs.clear()
    train_brain_vqa(tmp_path / "toy", tmp_path / "run", cfg, version="0.1.0", resume=True, log=logs.append)
    assert any("mlm: resumed" in line for line in logs) and any("clip: resumed" in line for line in logs)

"""``xai train brain-vqa``: tokenizer, masked-LM, CLIP-style and VQA training of :mod:`.models.brain_vqa`.

Four stages on a SLAKE-layout folder (``xai data make-vqa`` output or a real SLAKE copy), each
checkpointed under ``out/`` so that ``--resume`` continues after the last finished one:

1. ``tokenizer.json``: WordPiece on the train questions and captions;
2. ``mlm.pt``: the question encoder, masked language modelling (15 % of tokens) on the same text;
3. ``clip.pt``: image and text encoders trained contrastively (CLIP, Radford et al. 2021) on
   (slice, caption) pairs at the low resolution ``pretrain_size``. Captions are written from the
   slice's train answers (plane, lesion kind, side, lobe, structure, size), so identical captions
   are all positives of each other (soft targets), not negatives;
4. ``vqa.pt``: the whole network on the VQA records at ``run_size`` (twice ``pretrain_size``, the
   position embeddings interpolated), best validation accuracy kept.

Each stage has a wall-time budget in minutes; its learning rate follows a cosine of the elapsed
fraction of that budget (so a run always ends on time, at the cost of bitwise reproducibility).
The card records held-out accuracy (overall, closed, open, per content type, per question type, on
held-out phrasings) at both resolutions.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data.slake import VQARecord, load_slake
from .models.brain_vqa import BrainVQANet, load_encoders, load_tokenizer, to_model_image, train_tokenizer

Log = Callable[[str], None]


@dataclass
class VQATrainSettings:
    """Sizes, budgets and optimiser of a ``brain-vqa`` training run (defaults: 2 CPU cores, ~50 min)."""

    pretrain_size: int = 56
    run_size: int = 112
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    heads: int = 4
    fusion_dim: int = 128
    fusion_layers: int = 2
    vocab_size: int = 1000
    mlm_minutes: float = 2.0
    clip_minutes: float = 10.0
    vqa_minutes: float = 35.0
    clip_lr_scale: float = 2.0
    aux_weight: float = 1.0
    clip_batch: int = 96
    vqa_images: int = 24
    questions_per_image: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.01
    label_smoothing: float = 0.05
    seed: int = 0
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ data

class VQAData:
    """A SLAKE-layout folder in memory: records per split and every image at both sizes.

    ``images[size]`` is ``(N, 1, size, size)`` uint8; ``masks[size]`` the lesion masks beside them
    (``mask.png``, 0/1; zero where ``has_mask`` is False); ``index[img_name]`` the row of an image.
    """

    def __init__(self, root: str | Path, sizes: tuple[int, ...]):
        self.root = Path(root)
        self.splits = load_slake(root)
        names = sorted({r.img_name for recs in self.splits.values() for r in recs})
        self.index = {n: i for i, n in enumerate(names)}
        self.images: dict[int, torch.Tensor] = {}
        self.masks: dict[int, torch.Tensor] = {}
        arrays = [_read_png(self.root / "imgs" / n) for n in names]
        # A SLAKE image folder holds mask.png beside the image (make-vqa: the lesion, 0/255).
        mask_paths = [(self.root / "imgs" / n).with_name("mask.png") for n in names]
        self.has_mask = torch.tensor([m.is_file() for m in mask_paths])
        masks = [_read_png(m) if m.is_file() else np.zeros_like(a) for m, a in zip(mask_paths, arrays, strict=True)]
        for s in sizes:
            self.images[s] = torch.cat([(to_model_image(a, s)[0] * 255).round().to(torch.uint8) for a in arrays])
            self.masks[s] = torch.cat([(to_model_image(m, s)[0] > 0.5).to(torch.uint8) for m in masks])

    def rows(self, records: list[VQARecord]) -> torch.Tensor:
        return torch.tensor([self.index[r.img_name] for r in records])


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image as PILImage

    with PILImage.open(path) as im:
        return np.asarray(im.convert("L"))


def caption(records: list[VQARecord]) -> str:
    """A caption for one image from its (train) answers: plane, then lesion, side, lobe, structure, size."""
    by = {r.extra.get("question_type"): r.answer for r in records}
    parts = [f"{by['plane']} slice" if "plane" in by else "brain slice"]
    if by.get("presence") == "no" or by.get("normality") == "normal":
        return f"{parts[0]}, normal brain, no lesion"
    kind = by.get("kind", "lesion")
    side = by.get("side_open")
    desc = f"{by['size']} {kind}" if "size" in by else kind
    parts.append(f"{desc} on the {side}" if side in ("left", "right") else f"{desc} on both sides" if side else desc)
    if "lobe" in by:
        parts.append(f"{by['lobe']} lobe")
    if "structure" in by:
        parts.append(f"in the {by['structure']}")
    return ", ".join(parts)


def captions_by_image(records: list[VQARecord]) -> dict[str, str]:
    groups: dict[str, list[VQARecord]] = defaultdict(list)
    for r in records:
        groups[r.img_name].append(r)
    return {k: caption(v) for k, v in groups.items()}


def _augment(x: torch.Tensor, gen: torch.Generator,
             mask: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``(B, 1, S, S)`` float 0..1: intensity gamma and contrast, and a shift of up to 1/28 of the side
    (never a flip: left and right are answers); ``mask`` ``(B, 1, S, S)`` gets the same shift."""
    b, _, s, _ = x.shape
    gamma = torch.exp(torch.empty(b, 1, 1, 1).uniform_(-0.35, 0.35, generator=gen))
    scale = torch.empty(b, 1, 1, 1).uniform_(0.8, 1.2, generator=gen)
    x = (x.clamp_min(0) ** gamma * scale).clamp(0, 1)
    m = max(1, s // 28)
    padded = F.pad(x, (m, m, m, m))
    padded_m = F.pad(mask.float(), (m, m, m, m)) if mask is not None else None
    out = torch.empty_like(x)
    out_m = torch.empty_like(x) if mask is not None else None
    offs = torch.randint(0, 2 * m + 1, (b, 2), generator=gen)
    for i in range(b):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy:dy + s, dx:dx + s]
        if padded_m is not None:
            out_m[i] = padded_m[i, :, dy:dy + s, dx:dx + s]
    return out if mask is None else (out, out_m)


class PatchLesionHead(torch.nn.Module):
    """Training-only auxiliary head: each image patch token ``(B, 1 + g*g, D)`` predicts the fraction of
    its patch covered by lesion (``mask`` ``(B, 1, S, S)`` pooled over ``patch`` pixels). Dense
    supervision teaches the small ViT, trained on a few thousand slices, where lesions are: without it
    the answers of the first run hardly depended on the image (presence 0.56 on validation)."""

    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.lin = torch.nn.Linear(dim, 1)

    def loss(self, tokens: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        frac = F.avg_pool2d(mask.float(), self.patch).flatten(1)  # (B, g*g)
        logits = self.lin(tokens[:, 1:]).squeeze(-1)
        per = F.binary_cross_entropy_with_logits(logits, frac, reduction="none").mean(1)
        return (per * valid.float()).sum() / valid.float().sum().clamp_min(1)


def _lr_at(peak: float, frac: float, warm: float = 0.05) -> float:
    if frac < warm:
        return peak * frac / warm
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warm) / (1 - warm))))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


# ------------------------------------------------------------------------------------------ stages

def _texts(records: list[VQARecord], caps: dict[str, str]) -> list[str]:
    return [r.question for r in records] + list(caps.values())


def _tokenise(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def stage_mlm(net: BrainVQANet, tok, texts: list[str], minutes: float, cfg: VQATrainSettings, log: Log) -> dict:
    """Masked language modelling of ``net.text`` on ``texts`` for ``minutes``."""
    from transformers import BertForMaskedLM

    mlm = BertForMaskedLM(net.text.config)
    mlm.bert.load_state_dict(net.text.state_dict(), strict=False)
    ids_all, mask_all = _tokenise(tok, sorted(set(texts)))
    opt = torch.optim.AdamW(mlm.parameters(), lr=cfg.lr * 2, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    start, step, losses = time.time(), 0, []
    mlm.train()
    while (frac := (time.time() - start) / (minutes * 60)) < 1:
        rows = torch.randint(0, len(ids_all), (64,), generator=gen)
        ids, mask = ids_all[rows].clone(), mask_all[rows]
        pick = (torch.rand(ids.shape, generator=gen) < 0.15) & ~torch.isin(ids, special)
        labels = torch.where(pick, ids, torch.full_like(ids, -100))
        r = torch.rand(ids.shape, generator=gen)
        ids[pick & (r < 0.8)] = tok.mask_token_id
        rand_tok = torch.randint(len(special), tok.vocab_size, ids.shape, generator=gen)
        ids[pick & (r >= 0.8) & (r < 0.9)] = rand_tok[pick & (r >= 0.8) & (r < 0.9)]
        _set_lr(opt, _lr_at(cfg.lr * 2, frac))
        loss = mlm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        step += 1
        if step % 50 == 0:
            log(f"mlm step {step}: loss {np.mean(losses[-50:]):.3f} ({frac * 100:.0f} % of {minutes} min)")
    net.text.load_state_dict(mlm.bert.state_dict(), strict=False)
    return {"steps": step, "final_loss": round(float(np.mean(losses[-50:])), 4)}


def stage_clip(net: BrainVQANet, tok, data: VQAData, records: list[VQARecord], minutes: float,
               cfg: VQATrainSettings, log: Log) -> dict:
    """CLIP-style contrastive training of both encoders on (slice, caption) pairs at the low size."""
    caps = captions_by_image(records)
    names = sorted(caps)
    rows = torch.tensor([data.index[n] for n in names])
    cap_ids = {c: i for i, c in enumerate(sorted(set(caps.values())))}
    cap_of = torch.tensor([cap_ids[caps[n]] for n in names])
    ids_all, mask_all = _tokenise(tok, sorted(cap_ids))
    dim = cfg.fusion_dim
    v_proj = torch.nn.Linear(net.vision.config.hidden_size, dim)
    t_proj = torch.nn.Linear(net.text.config.hidden_size, dim)
    scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    aux = PatchLesionHead(net.vision.config.hidden_size, net.vision.config.patch_size)
    params = [*net.vision.parameters(), *net.text.parameters(), *v_proj.parameters(), *t_proj.parameters(), scale,
              *aux.parameters()]
    lr = cfg.lr * cfg.clip_lr_scale
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    images, masks = data.images[cfg.pretrain_size], data.masks[cfg.pretrain_size]
    start, step, losses = time.time(), 0, []
    net.train()
    while (frac := (time.time() - start) / (minutes * 60)) < 1:
        pick = torch.randperm(len(names), generator=gen)[:cfg.clip_batch]
        x, mk = _augment(images[rows[pick]].float() / 255, gen, masks[rows[pick]])
        c = cap_of[pick]
        uniq, inv = torch.unique(c, return_inverse=True)
        vout = net.vision(pixel_values=x)
        img = F.normalize(v_proj(vout.pooler_output), dim=-1)
        txt = F.normalize(t_proj(net.text(input_ids=ids_all[uniq], attention_mask=mask_all[uniq])
                                 .last_hidden_state[:, 0]), dim=-1)
        logits = scale.exp().clamp(max=100) * img @ txt.T  # (B images, U distinct captions)
        loss_i = F.cross_entropy(logits, inv)
        # Text side: each caption's positives are all the images with it (soft targets).
        same = (inv[None, :] == torch.arange(len(uniq))[:, None]).float()
        loss_t = -(same / same.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
        loss = (loss_i + loss_t) / 2 + cfg.aux_weight * aux.loss(vout.last_hidden_state, mk,
                                                                 data.has_mask[rows[pick]])
        _set_lr(opt, _lr_at(lr, frac))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        step += 1
        if step % 20 == 0:
            log(f"clip step {step}: loss {np.mean(losses[-20:]):.3f} ({frac * 100:.0f} % of {minutes} min)")
    net.eval()
    return {"steps": step, "final_loss": round(float(np.mean(losses[-20:])), 4), "pairs": len(names),
            "distinct_captions": len(cap_ids)}


def _batches(records: list[VQARecord], data: VQAData, answers: dict[str, int], cfg: VQATrainSettings,
             gen: torch.Generator):
    """Mini-batches of ``vqa_images`` images with up to ``questions_per_image`` of their questions."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.img_name].append(i)
    names = sorted(groups)
    order = torch.randperm(len(names), generator=gen).tolist()
    for s in range(0, len(order), cfg.vqa_images):
        chunk = [names[j] for j in order[s:s + cfg.vqa_images]]
        qs, img_idx = [], []
        for k, n in enumerate(chunk):
            mine = groups[n]
            sel = torch.randperm(len(mine), generator=gen)[:cfg.questions_per_image].tolist()
            qs += [records[mine[j]] for j in sel]
            img_idx += [k] * len(sel)
        yield chunk, qs, torch.tensor(img_idx), torch.tensor([answers[r.answer] for r in qs])


@torch.no_grad()
def predict_records(net: BrainVQANet, tok, data: VQAData, records: list[VQARecord], size: int,
                    batch: int = 128) -> np.ndarray:
    """Answer indices for ``records`` at image size ``size``."""
    net.eval()
    out = []
    images = data.images[size]
    for s in range(0, len(records), batch):
        chunk = records[s:s + batch]
        ids, mask = _tokenise(tok, [r.question for r in chunk])
        rows = data.rows(chunk)
        uniq, inv = torch.unique(rows, return_inverse=True)
        logits = net.forward_indexed(images[uniq].float() / 255, inv, ids, mask)
        out.append(logits.argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def accuracy_table(records: list[VQARecord], predicted: list[str]) -> dict[str, Any]:
    """Exact-match accuracy: overall, closed, open, per content type, per question type, and on the
    held-out phrasings (overall, closed, open); each entry ``{"accuracy", "n"}``."""
    def acc(sel: list[int]) -> dict[str, Any]:
        return {"accuracy": round(float(np.mean([predicted[i] == records[i].answer for i in sel])), 4) if sel
                else None, "n": len(sel)}

    idx = range(len(records))
    held = [i for i in idx if records[i].extra.get("phrasing_held_out")]
    table: dict[str, Any] = {
        "overall": acc(list(idx)),
        "closed": acc([i for i in idx if records[i].answer_type == "CLOSED"]),
        "open": acc([i for i in idx if records[i].answer_type == "OPEN"]),
        "held_out_phrasings": {"overall": acc(held),
                               "closed": acc([i for i in held if records[i].answer_type == "CLOSED"]),
                               "open": acc([i for i in held if records[i].answer_type == "OPEN"])},
        "seen_phrasings": acc([i for i in idx if not records[i].extra.get("phrasing_held_out")]),
        "content_type": {}, "question_type": {},
    }
    for key, attr in (("content_type", lambda r: r.content_type), ("question_type",
                                                                   lambda r: r.extra.get("question_type", ""))):
        for v in sorted({attr(r) for r in records}):
            table[key][v] = acc([i for i in idx if attr(records[i]) == v])
    return table


def stage_vqa(net: BrainVQANet, tok, data: VQAData, answers: list[str], minutes: float, cfg: VQATrainSettings,
              log: Log, out: Path) -> dict:
    """The whole network on the VQA records at ``run_size``; the best validation epoch is kept."""
    index = {a: i for i, a in enumerate(answers)}
    train = [r for r in data.splits["train"] if r.answer in index]
    val = data.splits["validation"]
    enc_params = [*net.vision.parameters(), *net.text.parameters()]
    enc_ids = {id(p) for p in enc_params}
    aux = PatchLesionHead(net.vision.config.hidden_size, net.vision.config.patch_size)
    rest = [p for p in net.parameters() if id(p) not in enc_ids] + list(aux.parameters())
    opt = torch.optim.AdamW([{"params": enc_params, "lr_scale": 0.5}, {"params": rest, "lr_scale": 1.0}],
                            lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    images, masks = data.images[cfg.run_size], data.masks[cfg.run_size]
    start, step, epoch, best, history = time.time(), 0, 0, -1.0, []
    done = False
    while not done:
        net.train()
        losses = []
        for chunk, qs, img_idx, y in _batches(train, data, index, cfg, gen):
            frac = (time.time() - start) / (minutes * 60)
            if frac >= 1:
                done = True
                break
            rows = [data.index[n] for n in chunk]
            x, mk = _augment(images[rows].float() / 255, gen, masks[rows])
            ids, mask = _tokenise(tok, [r.question for r in qs])
            tokens = net.encode_image(x)
            logits = net.fuse(tokens[img_idx], net.encode_text(ids, mask), mask)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if cfg.aux_weight:
                loss = loss + cfg.aux_weight * aux.loss(tokens, mk, data.has_mask[rows])
            _set_lr(opt, _lr_at(cfg.lr, frac))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            losses.append(float(loss))
            step += 1
            if step % 25 == 0:
                log(f"vqa epoch {epoch} step {step}: loss {np.mean(losses[-25:]):.3f} "
                    f"({frac * 100:.0f} % of {minutes} min)")
        pred = predict_records(net, tok, data, val, cfg.run_size)
        val_acc = float(np.mean([answers[p] == r.answer for p, r in zip(pred, val, strict=True)])) if val else 0.0
        history.append({"epoch": epoch, "steps": step, "loss": round(float(np.mean(losses)) if losses else 0, 4),
                        "val_accuracy": round(val_acc, 4), "minutes": round((time.time() - start) / 60, 2)})
        log(f"vqa epoch {epoch}: validation accuracy {val_acc:.4f}")
        if val_acc > best:
            best = val_acc
            torch.save(net.state_dict(), out / "vqa.pt")
        epoch += 1
    net.load_state_dict(torch.load(out / "vqa.pt", weights_only=True))
    return {"steps": step, "epochs": epoch, "best_val_accuracy": round(best, 4), "history": history,
            "train_questions": len(train)}


# ------------------------------------------------------------------------------------------ the command

def build_net(cfg: VQATrainSettings, vocab: int, answers: int, vision_dir: str | None = None,
              text_dir: str | None = None) -> BrainVQANet:
    """A fresh network of ``cfg``'s sizes, with real local encoders swapped in when given."""
    vision = dict(hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.heads, image_size=cfg.pretrain_size,
                  patch_size=cfg.patch_size, num_channels=1)
    text = dict(vocab_size=vocab, hidden_size=cfg.text_hidden, num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.heads, intermediate_size=2 * cfg.text_hidden, max_position_embeddings=64)
    net = BrainVQANet(vision, text, answers, run_size=cfg.run_size, fusion_dim=cfg.fusion_dim,
                      fusion_layers=cfg.fusion_layers, fusion_heads=cfg.heads)
    real_v, real_t = load_encoders(vision_dir, text_dir)
    if real_v is not None or real_t is not None:
        net.vision = real_v or net.vision
        net.text = real_t or net.text
        net.build_fusion(answers, cfg.run_size if real_v is None else 2 * real_v.config.image_size, cfg.fusion_dim,
                         cfg.fusion_layers, cfg.heads)
    return net


def arch_kwargs(net: BrainVQANet, answers: int, cfg: VQATrainSettings) -> dict[str, Any]:
    """What :class:`BrainVQANet` needs to be rebuilt (the encoders' configs as plain dicts)."""
    keys_v = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
              "patch_size", "num_channels", "hidden_act", "layer_norm_eps")
    keys_t = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps", "pad_token_id")
    return {"vision": {k: getattr(net.vision.config, k) for k in keys_v},
            "text": {k: getattr(net.text.config, k) for k in keys_t},
            "answers": answers, "run_size": net.run_size, "fusion_dim": cfg.fusion_dim,
            "fusion_layers": cfg.fusion_layers, "fusion_heads": cfg.heads}


def train_brain_vqa(data_dir: str | Path, out_dir: str | Path, cfg: VQATrainSettings | None = None, *,
                    version: str = "1.0.0", resume: bool = False, vision_dir: str | None = None,
                    text_dir: str | None = None, weights_dir: str | Path | None = None,
                    command: str = "", log: Log | None = None) -> Path:
    """Train ``brain-vqa`` on ``data_dir``; checkpoints in ``out_dir``; the card, weights and tokenizer
    go to ``weights_dir`` (default ``out_dir``) as ``brain-vqa.{json,pt,tokenizer.json}``. Returns the
    card path."""
    cfg = cfg or VQATrainSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    data = VQAData(data_dir, (cfg.pretrain_size, cfg.run_size))
    train = data.splits["train"]
    log(f"data: {len(data.index)} images, " + ", ".join(f"{k} {len(v)}" for k, v in data.splits.items()))
    caps = captions_by_image(train)
    answers = sorted({r.answer for r in train})
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if resume and state_path.exists() else {"stages": {}}

    tok_path = out / "tokenizer.json"
    if text_dir is not None:
        tok = load_tokenizer(text_dir)
        tok.save_pretrained(str(out / "tokenizer"))
        tok_path = out / "tokenizer" / "tokenizer.json"
    elif resume and tok_path.exists():
        tok = load_tokenizer(tok_path)
    else:
        tok = train_tokenizer(_texts(train, caps), cfg.vocab_size)
        tok.backend_tokenizer.save(str(tok_path))
    net = build_net(cfg, tok.vocab_size if text_dir is None else net_vocab(text_dir), len(answers),
                    vision_dir, text_dir)

    def stage(name: str, fn: Callable[[], dict]) -> None:
        ck = out / f"{name}.pt"
        if name in state["stages"] and ck.exists():
            net.load_state_dict(torch.load(ck, weights_only=True))
            log(f"{name}: resumed from {ck}")
            return
        t = time.time()
        info = fn()
        info["seconds"] = round(time.time() - t, 1)
        if name != "vqa":
            torch.save(net.state_dict(), ck)
        state["stages"][name] = info
        state_path.write_text(json.dumps(state, indent=1))
        log(f"{name}: done in {info['seconds']} s")

    if text_dir is None:
        stage("mlm", lambda: stage_mlm(net, tok, _texts(train, caps), cfg.mlm_minutes, cfg, log))
    if vision_dir is None:
        stage("clip", lambda: stage_clip(net, tok, data, train, cfg.clip_minutes, cfg, log))
    stage("vqa", lambda: stage_vqa(net, tok, data, answers, cfg.vqa_minutes, cfg, log, out))

    test = data.splits["test"]
    metrics: dict[str, Any] = {}
    for size, key in ((net.run_size, "run_size"), (net.vision.config.image_size, "pretrain_size")):
        pred = [answers[i] for i in predict_records(net, tok, data, test, size)] if size in data.images else None
        if pred is None:
            continue
        metrics[key] = {"pixels": size, **accuracy_table(test, pred)}
    log(f"test accuracy at {net.run_size} px: {metrics['run_size']['overall']}, closed "
        f"{metrics['run_size']['closed']}, open {metrics['run_size']['open']}")
    answer_types: dict[str, str] = {}
    for r in train:
        answer_types.setdefault(r.answer, r.answer_type)
    dest = Path(weights_dir) if weights_dir else out
    dest.mkdir(parents=True, exist_ok=True)
    return write_model(net, tok, answers, answer_types, cfg, dest, version=version, metrics=metrics,
                       training={"data": str(data_dir), "command": command, "stages": state["stages"],
                                 "settings": asdict(cfg), "minutes": round((time.time() - t0) / 60, 1),
                                 "vision_checkpoint": vision_dir, "text_checkpoint": text_dir,
                                 "test_questions": len(test)})


def net_vocab(text_dir: str | Path) -> int:
    from transformers import BertConfig

    return BertConfig.from_pretrained(str(text_dir), local_files_only=True).vocab_size


def write_model(net: BrainVQANet, tok, answers: list[str], answer_types: dict[str, str], cfg: VQATrainSettings,
                dest: Path, *, version: str, metrics: dict, training: dict, name: str = "brain-vqa") -> Path:
    """``dest/<name>.pt`` (float16 weights), ``<name>.tokenizer.json`` and the card ``<name>.json``."""
    from .models import ModelCard, sha256
    from .models.brain_vqa import IMAGE_LAYER, TOKEN_LAYER

    pt = dest / f"{name}.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}, pt)
    tok.backend_tokenizer.save(str(dest / f"{name}.tokenizer.json"))
    card = ModelCard(name=name, version=version, kind="vqa", architecture="BrainVQANet",
                     arch_kwargs=arch_kwargs(net, len(answers), cfg), classes=answers, grid_size=net.run_size,
                     grid_spacing_mm=0.0, cam_layer=IMAGE_LAYER,
                     layers={"relig": IMAGE_LAYER, "relig_tokens": TOKEN_LAYER},
                     calibration="none (softmax of the answer logits)", weights_sha256=sha256(pt),
                     training={**training, "answer_types": answer_types}, metrics=metrics)
    path = dest / f"{name}.json"
    path.write_text(card.model_dump_json(indent=1))
    return path

"""``brain-vqa``: a medical visual-question-answering network (the seed paper's layout, small).

Three parts, as in the paper that explains a Med-VQA model with RE-LIG:

* **image encoder**: a transformers :class:`~transformers.CLIPVisionModel` on one channel, pretrained
  CLIP-style at a low resolution (``vision.image_size``) and run for VQA at ``run_size`` (twice it)
  with interpolated position embeddings, as the paper runs PubMedCLIP above its training size;
* **question encoder**: a :class:`~transformers.BertModel` with a WordPiece tokenizer (``tokenizers``)
  trained on the project's question and caption text, pretrained by masked language modelling;
* **fusion**: :class:`CoAttention` layers (text attends to the image, the image to the text), then an
  answer classifier over the answer vocabulary (``answers``).

Shapes: ``forward(pixel_values (B, 1, S, S) in 0..1, input_ids (B, L) int64, attention_mask (B, L))
-> answer logits (B, A)``. Explanations attribute at ``vision.embeddings.patch_embedding`` (output
``(B, D, S/p, S/p)``: the image embedding) and ``text.embeddings.word_embeddings`` (``(B, L, D)``:
the question embedding); :data:`IMAGE_LAYER` and :data:`TOKEN_LAYER` name them.

Local checkpoints of real encoders (PubMedCLIP's CLIP layout, BioLinkBERT's BERT layout) load with
:func:`load_encoders`; nothing is downloaded (``local_files_only``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast

__all__ = ["BrainVQANet", "CoAttention", "IMAGE_LAYER", "TOKEN_LAYER", "train_tokenizer", "load_tokenizer",
           "load_encoders", "to_model_image", "SPECIAL_TOKENS", "MAX_QUESTION_TOKENS"]

IMAGE_LAYER = "vision.embeddings.patch_embedding"
TOKEN_LAYER = "text.embeddings.word_embeddings"
SPECIAL_TOKENS = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}
MAX_QUESTION_TOKENS = 32


class _Attention(nn.Module):
    """Multi-head cross-attention ``(B, Nq, D) x (B, Nk, D) -> (B, Nq, D)``; ``key_padding`` ``(B, Nk)``
    is 1 where a key is padding."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        b, nq, d = q.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], h, d // h).transpose(1, 2)

        mask = None if key_padding is None else (~key_padding.bool())[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(split(self.q(q)), split(self.k(kv)), split(self.v(kv)), attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(b, nq, d))


class CoAttention(nn.Module):
    """One co-attention layer: the question tokens attend to the image tokens (then a feed-forward
    block), and the image tokens attend to the question tokens (pre-norm residual blocks).

    ``forward(img (B, N, D), txt (B, L, D), txt_mask (B, L) 1 = token) -> (img, txt)``. The image side
    has no feed-forward block: it runs once per question and is the cost of the fusion.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_t, self.ln_i, self.ln_i_kv, self.ln_t_kv, self.ln_ff = (nn.LayerNorm(dim) for _ in range(5))
        self.t2i = _Attention(dim, heads)
        self.i2t = _Attention(dim, heads)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, img: torch.Tensor, txt: torch.Tensor,
                txt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img_n = self.ln_i_kv(img)
        txt = txt + self.t2i(self.ln_t(txt), img_n)
        txt = txt + self.ff(self.ln_ff(txt))
        img = img + self.i2t(self.ln_i(img), self.ln_t_kv(txt), key_padding=1 - txt_mask)
        return img, txt


class BrainVQANet(nn.Module):
    """CLIP vision encoder + BERT question encoder + co-attention + answer classifier.

    Args:
        vision: :class:`~transformers.CLIPVisionConfig` keyword arguments (``num_channels`` 1; its
            ``image_size`` is the pretraining resolution).
        text: :class:`~transformers.BertConfig` keyword arguments (``vocab_size`` = the tokenizer's).
        answers: size of the answer vocabulary.
        run_size: the side in pixels VQA runs at (default twice ``vision["image_size"]``); other sizes
            work too (position embeddings are interpolated whenever the size differs from training).
        fusion_dim, fusion_layers, fusion_heads: the co-attention stack.
    """

    def __init__(self, vision: dict[str, Any], text: dict[str, Any], answers: int, run_size: int | None = None,
                 fusion_dim: int = 128, fusion_layers: int = 2, fusion_heads: int = 4):
        super().__init__()
        self.vision = CLIPVisionModel(CLIPVisionConfig(**vision))
        self.text = BertModel(BertConfig(**text), add_pooling_layer=False)
        self.build_fusion(answers, run_size, fusion_dim, fusion_layers, fusion_heads)

    def build_fusion(self, answers: int, run_size: int | None, fusion_dim: int, fusion_layers: int,
                     fusion_heads: int) -> None:
        """(Re)build the parts after the encoders (used after swapping in pretrained encoders)."""
        vd, td = self.vision.config.hidden_size, self.text.config.hidden_size
        self.run_size = int(run_size or 2 * self.vision.config.image_size)
        self.img_proj = nn.Linear(vd, fusion_dim)
        self.txt_proj = nn.Linear(td, fusion_dim)
        self.fusion = nn.ModuleList(CoAttention(fusion_dim, fusion_heads) for _ in range(fusion_layers))
        self.pool = _Attention(fusion_dim, fusion_heads)
        self.head = nn.Sequential(nn.LayerNorm(2 * fusion_dim), nn.Linear(2 * fusion_dim, fusion_dim), nn.GELU(),
                                  nn.Linear(fusion_dim, answers))

    # -- encoders ---------------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tokens ``(B, 1 + (S/p)^2, D_v)`` (class token first, after the post-layernorm). A
        one-channel image is repeated for an RGB encoder (a real PubMedCLIP checkpoint)."""
        size = pixel_values.shape[-1]
        channels = self.vision.config.num_channels
        if pixel_values.shape[1] == 1 and channels > 1:
            pixel_values = pixel_values.expand(-1, channels, -1, -1)
        out = self.vision(pixel_values=pixel_values,
                          interpolate_pos_encoding=size != self.vision.config.image_size)
        return self.vision.post_layernorm(out.last_hidden_state)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Question tokens ``(B, L, D_t)``."""
        return self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    # -- fusion -----------------------------------------------------------------------------------------

    def fuse(self, img: torch.Tensor, txt: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Answer logits ``(B, A)`` from encoded image ``(B, N, D_v)`` and question ``(B, L, D_t)``."""
        mask = attention_mask.to(img.dtype)
        img, txt = self.img_proj(img), self.txt_proj(txt)
        for layer in self.fusion:
            img, txt = layer(img, txt, mask)
        q = txt[:, :1]  # the [CLS] token asks the image
        pooled = self.pool(q, img)[:, 0]
        return self.head(torch.cat([txt[:, 0], pooled], dim=-1))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.fuse(self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask), attention_mask)

    def forward_indexed(self, pixel_values: torch.Tensor, image_index: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        """Training shortcut: ``pixel_values (M, 1, S, S)`` are encoded once and question ``i`` is asked
        about image ``image_index[i]``; equals :meth:`forward` on the gathered images."""
        img = self.encode_image(pixel_values)[image_index]
        return self.fuse(img, self.encode_text(input_ids, attention_mask), attention_mask)


# ------------------------------------------------------------------------------------------ the tokenizer

def train_tokenizer(texts: list[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A lower-casing BERT WordPiece tokenizer trained on ``texts`` (``tokenizers``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=1,
                                                              special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                            ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_QUESTION_TOKENS, **SPECIAL_TOKENS)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The tokenizer saved as ``tokenizer.json`` (a file), or a local tokenizer folder (a real BERT
    checkpoint's: ``vocab.txt`` / ``tokenizer.json``)."""
    p = Path(path)
    if p.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    return PreTrainedTokenizerFast(tokenizer_file=str(p), model_max_length=MAX_QUESTION_TOKENS, **SPECIAL_TOKENS)


def load_encoders(vision_dir: str | os.PathLike | None = None,
                  text_dir: str | os.PathLike | None = None) -> tuple[CLIPVisionModel | None, BertModel | None]:
    """Local real checkpoints: a CLIP vision tower (a PubMedCLIP / CLIP folder, full CLIP or vision-only
    layout) and a BERT encoder (a BioLinkBERT / BERT folder). Folders only, never a hub name."""
    vision = text = None
    for d in (vision_dir, text_dir):
        if d is not None and not Path(d).is_dir():
            raise FileNotFoundError(f"checkpoint folder {d} does not exist (nothing is downloaded)")
    if vision_dir is not None:
        vision = CLIPVisionModel.from_pretrained(str(vision_dir), local_files_only=True)
    if text_dir is not None:
        text = BertModel.from_pretrained(str(text_dir), local_files_only=True, add_pooling_layer=False)
    return vision, text


# ------------------------------------------------------------------------------------------ images

def to_model_image(png8: np.ndarray, size: int, channels: int = 1) -> tuple[torch.Tensor, dict[str, int]]:
    """A slice ``(rows, cols)`` of 0..255 intensities -> ``(1, C, size, size)`` float32 in 0..1.

    The slice is centred in a zero-padded square (its longer side), then resized (bilinear,
    antialiased), so pixels stay square; the returned ``frame`` (``side``, ``top``, ``left``, ``rows``,
    ``cols``) maps a ``(size, size)`` map back onto the slice (:func:`from_model_map`).
    """
    a = np.asarray(png8, dtype=np.float32) / 255.0
    rows, cols = a.shape
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    sq = np.zeros((side, side), np.float32)
    sq[top:top + rows, left:left + cols] = a
    t = torch.from_numpy(sq)[None, None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    if channels != 1:
        t = t.expand(1, channels, size, size).contiguous()
    return t, {"side": side, "top": top, "left": left, "rows": rows, "cols": cols}


def from_model_map(m: np.ndarray | torch.Tensor, frame: dict[str, int]) -> np.ndarray:
    """A ``(size, size)`` map on the model image -> ``(rows, cols)`` on the slice (bilinear)."""
    t = torch.as_tensor(np.asarray(m, dtype=np.float32))[None, None]
    t = F.interpolate(t, size=(frame["side"], frame["side"]), mode="bilinear", align_corners=False)[0, 0]
    return t[frame["top"]:frame["top"] + frame["rows"], frame["left"]:frame["left"] + frame["cols"]].numpy()

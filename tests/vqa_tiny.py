"""A tiny ``brain-vqa`` model for tests: real tokenizer, real network, random weights, saved with the
project's writer (card, fp16 weights, tokenizer beside them). Answers are the make-vqa vocabulary's
closed answers plus a few open ones, so any test can ask any question and get a well-formed reply.
Also the small oblique volume the vqa tests ask about (:func:`oblique_volume`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from xai_core.data.vqa import PHRASINGS
from xai_core.io import Image
from xai_core.models.brain_vqa import train_tokenizer
from xai_core.train_vqa import VQATrainSettings, build_net, write_model

ANSWERS = ["abnormal", "axial", "coronal", "glioma", "left", "meningioma", "no", "normal", "right", "sagittal",
           "yes"]
CLOSED = {"yes", "no", "normal", "abnormal"}


def tiny_vqa_model(folder: Path, *, pretrain_size: int = 16, patch_size: int = 8, seed: int = 0) -> Path:
    """Write ``folder/brain-vqa.{json,pt,tokenizer.json}``; returns the card path (load it with
    ``xai_core.models.load("brain-vqa", weights_dir=folder)``)."""
    torch.manual_seed(seed)
    texts = [p.replace("{side}", "left").replace("{cls}", "glioma") for v in PHRASINGS.values() for p in v]
    tok = train_tokenizer(texts + ["axial slice, glioma on the left"], vocab_size=200)
    cfg = VQATrainSettings(pretrain_size=pretrain_size, run_size=2 * pretrain_size, patch_size=patch_size,
                           vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1, heads=2, fusion_dim=32,
                           fusion_layers=1)
    net = build_net(cfg, tok.vocab_size, len(ANSWERS))
    folder.mkdir(parents=True, exist_ok=True)
    types = {a: "CLOSED" if a in CLOSED else "OPEN" for a in ANSWERS}
    return write_model(net, tok, ANSWERS, types, cfg, folder, version="0.0.1-test", metrics={},
                       training={"note": "random weights, for tests"})


def _server_utils():
    # By file path, as the test modules load this file: the monailabel wheel installs a top-level
    # ``tests`` package that could shadow ours, and this file is imported under several names.
    name = "xai_vqa_tiny_server_utils"
    if name not in sys.modules:  # dataclasses look their module up in sys.modules while it executes
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("server_utils.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def oblique_volume(seed: int = 1) -> Image:
    """A head-like float32 volume with a bright blob (``server_utils.synthetic_study``): 22 x 24 x 20
    voxels (i, j, k) of 2.5 x 2.0 x 3.0 mm, origin (-20, -24, -30) mm LPS, direction rotated 25
    degrees about (1, 2, 3), so that no patient plane is a plane of voxels; ``seed`` sets the noise."""
    su = _server_utils()
    image, _ = su.synthetic_study((20, 24, 22), (2.5, 2.0, 3.0), (-20.0, -24.0, -30.0), su.rotation((1, 2, 3), 25),
                                  seed=seed)
    return image

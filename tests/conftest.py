"""Shared fixtures. Generated studies are made once per test session (seeds never used in training)."""

from __future__ import annotations

import os

import pytest

# Tests run on the CPU with few threads, like CI (2 cores, no GPU), whatever the machine has.
os.environ.setdefault("XAI_DEVICE", "cpu")

HELDOUT_SEED = 424242  # never used for training (train 1000, validation 2000, held-out card 3000)


@pytest.fixture(scope="session")
def heldout_studies(tmp_path_factory):
    """12 fresh generated studies (all geometries and formats) with their manifest rows."""
    from xai_core.data.brain import make_brain_studies, read_manifest

    out = tmp_path_factory.mktemp("heldout")
    make_brain_studies(12, HELDOUT_SEED, out)
    return read_manifest(out)


@pytest.fixture(scope="session")
def default_model():
    from xai_core.models import load
    from xai_core.settings import get_settings

    # The shipped weights, not a locally fine-tuned copy in the user weights folder.
    return load("brain-lesion-3d", device="cpu", weights_dir=get_settings().weights_dir)

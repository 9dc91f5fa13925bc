"""BrainLesionNet's lesion gate and the coarse lesion target used to train it."""

from __future__ import annotations

import pytest
import torch

from xai_core.models.brain_lesion_net import BrainLesionNet, LesionGate
from xai_core.train import _coarse


def test_gate_weights_features_by_lesion_probability_with_a_floor():
    feats = torch.ones(1, 3, 2, 2, 2)
    logits = torch.zeros(1, 2, 2, 2, 2)
    logits[0, 1, 0, 0, 0] = 20.0  # p(lesion) ~ 1 in one cell
    logits[0, 0, 1, 1, 1] = 20.0  # p(lesion) ~ 0 in another
    out = LesionGate(floor=0.1)(feats, logits)
    assert out[0, :, 0, 0, 0] == pytest.approx(torch.ones(3), abs=1e-6)
    assert out[0, :, 1, 1, 1] == pytest.approx(torch.full((3,), 0.1), abs=1e-6)
    assert out[0, :, 0, 1, 0] == pytest.approx(torch.full((3,), 0.1 + 0.9 * 0.5), abs=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gated_network_outputs_and_cam_layer(spatial_dims):
    torch.manual_seed(0)
    net = BrainLesionNet(spatial_dims=spatial_dims, lesion_gate=True).eval()
    x = torch.randn((1, 1) + (32,) * spatial_dims)
    seen = {}
    net.encoder_out.register_forward_hook(lambda m, i, o: seen.setdefault("cam", o))
    out = net(x)
    assert out.class_logits.shape == (1, 4)
    assert out.seg_logits.shape == (1, 2) + (32,) * spatial_dims
    assert out.encoder_seg_logits.shape == (1, 2) + (8,) * spatial_dims
    # The CAM layer is the gated stage: body output times the gate, non-negative.
    body = net.encoder_body(net.down2(net.down1(net.stem(x))))
    p = torch.softmax(out.encoder_seg_logits, 1)[:, 1:]
    torch.testing.assert_close(seen["cam"], body * (0.1 + 0.9 * p))
    assert (seen["cam"] >= 0).all()


def test_ungated_network_has_no_coarse_map_and_the_old_layout():
    net = BrainLesionNet().eval()
    assert net(torch.randn(1, 1, 32, 32, 32)).encoder_seg_logits is None
    # Ungated weights (model 1.0/1.1 layout) keep their parameter names.
    assert not any(k.startswith(("encoder_body", "encoder_seg")) for k in net.state_dict())
    assert any(k.startswith("encoder_out.0.") for k in net.state_dict())


def test_coarse_target_keeps_a_single_lesion_voxel():
    m = torch.zeros(2, 64, 64, 64, dtype=torch.long)
    m[0, 10, 20, 30] = 1
    c = _coarse(m, torch.zeros(2, 2, 16, 16, 16))
    assert c.shape == (2, 1, 16, 16, 16) and c.dtype == torch.long
    assert c[0, 0, 2, 5, 7] == 1 and int(c.sum()) == 1


def test_temperature_is_fitted_and_never_sharpens_on_an_error_free_set():
    import numpy as np

    from xai_core.train import fit_temperature

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    # Over-confident logits with 30 % of the labels wrong: the fitted temperature softens (T > 1).
    logits = np.eye(3)[labels] * 6.0
    flip = rng.random(400) < 0.3
    labels_noisy = np.where(flip, (labels + 1) % 3, labels)
    assert fit_temperature(logits, labels_noisy) > 2.0
    # Every label right: the NLL falls towards T -> 0; the temperature stays 1.
    assert fit_temperature(logits, labels) == 1.0

"""Integrated gradients (``ig``), layer integrated gradients, the noise tunnel and RE-LIG (``relig``):
analytic answers on hand-built models, equality with captum at equal settings and seeded noise,
the contract (black boxes, targets, progress, cancel, 2-D / 3-D), and the efficient paths."""

from __future__ import annotations

import functools

import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import LayerIntegratedGradients as CaptumLIG
from captum.attr import NoiseTunnel as CaptumNT
from torch import nn

from xai_core.explain import (
    RELIG,
    AttributionCancelled,
    IntegratedGradients,
    LayerIntegratedGradients,
    NoiseTunnel,
    available_methods,
    get_explainer,
)
from xai_core.explain.integrated_gradients import quadrature
from xai_core.models.brain_lesion_net import BrainLesionNet


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def small_net(spatial_dims: int = 3, seed: int = 0, gate: bool = True) -> BrainLesionNet:
    """A BrainLesionNet with few channels and non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    net = BrainLesionNet(spatial_dims=spatial_dims, channels=(4, 8, 8, 8), lesion_gate=gate)
    gen = torch.Generator().manual_seed(seed + 1)
    for mod in net.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=gen) * 0.1)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
    return net.eval()


def volume(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


class Linear(nn.Module):
    """``F(x) = W x.flatten() + c``: integrated gradients are exactly ``(x - b) * W[target]``."""

    def __init__(self, shape: tuple[int, ...], n_classes: int = 3, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.shape = shape
        self.fc = nn.Linear(int(torch.tensor(shape).prod()), n_classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=gen))
            self.fc.bias.copy_(torch.randn(n_classes, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


# -- registry and quadrature --------------------------------------------------------------------------------


def test_registered_with_titles_and_kinds():
    for name, cls in [("ig", IntegratedGradients), ("relig", RELIG)]:
        assert get_explainer(name) is cls
        assert "volume-classifier" in cls.model_kinds and cls.needs == "gradients"
        assert "Sundararajan" in cls.title
        assert name in available_methods("volume-classifier")
    assert "noise" in RELIG.title.lower()


def test_gauss_legendre_weights_sum_to_one_and_integrate_exactly():
    alphas, weights = quadrature("gausslegendre", 5)
    assert sum(weights) == pytest.approx(1.0, abs=1e-12)
    assert all(0.0 < a < 1.0 for a in alphas)
    # Exact for polynomials up to degree 2n - 1 = 9: integral of a^9 on [0, 1] is 0.1.
    assert sum(w * a ** 9 for a, w in zip(alphas, weights, strict=True)) == pytest.approx(0.1, abs=1e-12)
    with pytest.raises(ValueError):
        quadrature("simpson", 8)


# -- IG: analytic answers, black boxes, delta ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 6, 7), (2, 4, 5, 6)], ids=["2d", "3d"])
def test_ig_on_linear_model_is_input_minus_baseline_times_weight(shape):
    model = Linear(shape)
    x = volume((3, *shape))
    baseline = volume((1, *shape), seed=7)
    att = IntegratedGradients(model, baseline=baseline, n_steps=4, internal_batch_size=5).attribute(
        x, target=[[0, 2]] * 3)
    assert att.raw[0].shape == (3, 2, *shape)
    w = model.fc.weight.detach().view(3, *shape)
    expected = (x - baseline)[:, None] * w[[0, 2]][None]
    torch.testing.assert_close(att.raw[0], expected, rtol=1e-5, atol=1e-6)
    assert att.delta.abs().max() < 1e-4
    assert att.targets.tolist() == [[0, 2]] * 3


def test_ig_on_a_black_box_function_without_a_module():
    # F_c(x) = sum_i w_ci x_i^2: with a zero baseline IG_i = w_ci x_i^2 (the integrand is linear in
    # alpha, so Gauss-Legendre is exact with any number of steps).
    w = torch.randn(2, 1, 5, 5, 5, generator=torch.Generator().manual_seed(3))
    f = lambda x: torch.einsum("bcxyz,kcxyz->bk", x * x, w)  # noqa: E731
    explainer = get_explainer("ig")(f, n_steps=3)
    assert explainer.model is None
    x = volume((1, 1, 5, 5, 5))
    att = explainer.attribute(x, target="all")
    torch.testing.assert_close(att.raw[0][0], w * x[0] ** 2, rtol=1e-5, atol=1e-6)
    assert att.maps.shape == (1, 2, 5, 5, 5) and float(att.maps.max()) == 1.0


def test_ig_delta_is_small_on_a_smooth_model_and_equals_captum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Softplus(), nn.Conv3d(4, 4, 3, stride=2),
                          nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).eval()
    x = volume((2, 1, 8, 8, 8))
    model(x)
    att = IntegratedGradients(model, n_steps=32).attribute(x, target=[1, 2])
    change = (model(x) - model(torch.zeros_like(x))).gather(1, torch.tensor([[1], [2]]))
    assert (att.delta.abs() <= 1e-3 * change.abs() + 1e-5).all(), (att.delta, change)
    ref = CaptumIG(model).attribute(x, target=[1, 2], n_steps=32)
    assert rel_l2(att.raw[0][:, 0], ref) < 1e-4


def test_ig_on_a_bound_method_runs_its_module_in_eval_mode():
    net = small_net(gate=False).train()
    x = volume((1, 1, 16, 16, 16))
    att = IntegratedGradients(net.classify, n_steps=2).attribute(x, target=0)
    assert all(m.training for m in net.modules())  # each module's mode restored
    ref = IntegratedGradients(net.eval().classify, n_steps=2).attribute(x, target=0)
    torch.testing.assert_close(att.raw[0], ref.raw[0])


def test_ig_multiple_inputs_and_additional_args():
    # F(x, y; s) = s * (sum x + 2 sum y): IG splits the change between the two inputs exactly.
    f = lambda x, y, s: s * (x.flatten(1).sum(1, keepdim=True) + 2 * y.flatten(1).sum(1, keepdim=True))  # noqa: E731
    x, y = volume((2, 1, 4, 4)), volume((2, 3, 4, 4), seed=2)
    scale = torch.tensor([[1.0], [3.0]])
    att = IntegratedGradients(f, n_steps=2).attribute((x, y), target=0, additional_forward_args=(scale,))
    torch.testing.assert_close(att.raw[0][:, 0], scale.view(2, 1, 1, 1) * x)
    torch.testing.assert_close(att.raw[1][:, 0], 2 * scale.view(2, 1, 1, 1) * y)


# -- layer integrated gradients and RE-LIG -----------------------------------------------------------------


@pytest.mark.parametrize("layer", ["stem", "down1"])
def test_relig_equals_captum_noise_tunnel_layer_integrated_gradients(layer):
    net = small_net()
    x = volume((1, 1, 16, 16, 16))
    n, steps, frac, seed = 3, 6, 0.15, 11
    ours = RELIG(net, layer=layer, n_samples=n, stdev_fraction=frac, seed=seed, n_steps=steps,
                 internal_batch_size=4, forward_from=functools.partial(net.forward_from, layer))
    att = ours.attribute(x, target=2)
    sigma = frac * float(x.max() - x.min())
    torch.manual_seed(seed)
    nt = CaptumNT(CaptumLIG(net.classify, net.get_submodule(layer)))
    ref, delta = nt.attribute(x, nt_samples=n, nt_samples_batch_size=1, stdevs=sigma, n_steps=steps, target=2,
                              return_convergence_delta=True)
    assert att.layer_raw.shape == (1, 1, *ref.shape[1:])
    assert rel_l2(att.layer_raw[:, 0], ref) < 1e-3
    assert float(att.delta[0, 0]) == pytest.approx(float(delta.mean()), abs=1e-4)
    assert att.extras["stdev"] == pytest.approx([sigma])
    # raw[0]: the channel sum, upsampled to the input grid.
    assert att.raw[0].shape == (1, 1, 1, 16, 16, 16)
    assert att.layer == layer


def test_relig_with_and_without_forward_from_agree_and_leave_no_trace():
    net = small_net()
    x = volume((2, 1, 16, 16, 16))
    common = dict(layer="down1", n_samples=2, n_steps=4, seed=3, internal_batch_size=3)
    fast = RELIG(net, forward_from=functools.partial(net.forward_from, "down1"), **common).attribute(x, target=[0, 3])
    hooks = RELIG(net, **common).attribute(x, target=[0, 3])
    assert rel_l2(fast.layer_raw, hooks.layer_raw) < 1e-5
    torch.testing.assert_close(fast.delta, hooks.delta, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in net.parameters())  # no weight gradients
    assert all(not m._forward_hooks for m in net.modules())
    assert torch.is_grad_enabled()


def test_layer_ig_completeness_and_batch_independence():
    net = small_net(gate=False)
    x = volume((3, 1, 16, 16, 16))
    lig = LayerIntegratedGradients(net, layer="down2", n_steps=48, internal_batch_size=None,
                                   forward_from=functools.partial(net.forward_from, "down2"))
    att = lig.attribute(x, target=[[1, 2]])
    change = (net.classify(x) - net.classify(torch.zeros_like(x)))[:, [1, 2]]
    assert att.layer_raw.shape == (3, 2, 8, 4, 4, 4)
    assert (att.delta.abs() <= 0.02 * change.abs() + 1e-4).all(), (att.delta, change)
    # Item 1 alone gives the same attribution as within the batch, whatever the chunking.
    alone = LayerIntegratedGradients(net, layer="down2", n_steps=48, internal_batch_size=5).attribute(
        x[1:2], target=[[1, 2]])
    assert rel_l2(alone.layer_raw[0], att.layer_raw[1]) < 1e-5


def test_multiple_targets_equal_single_target_calls():
    net = small_net()
    x = volume((1, 1, 16, 16, 16))
    kw = dict(layer="stem", n_samples=2, n_steps=3, seed=5, forward_from=functools.partial(net.forward_from, "stem"))
    both = RELIG(net, **kw).attribute(x, target=[1, 3])
    assert both.targets.tolist() == [[1, 3]] and both.raw[0].shape == (1, 2, 1, 16, 16, 16)
    for t, cls in enumerate([1, 3]):
        one = RELIG(net, **kw).attribute(x, target=cls)
        assert rel_l2(both.layer_raw[:, t], one.layer_raw[:, 0]) < 1e-5


def test_two_dimensional_inputs():
    net = small_net(spatial_dims=2)
    x = volume((2, 1, 24, 24))
    att = get_explainer("relig")(net, layer="down1", n_samples=2, n_steps=3,
                                 forward_from=functools.partial(net.forward_from, "down1")).attribute(x, target="all")
    assert att.raw[0].shape == (2, 4, 1, 24, 24) and att.layer_raw.shape == (2, 4, 8, 12, 12)
    assert att.maps.shape == (2, 4, 24, 24)
    ig = get_explainer("ig")(net.classify, n_steps=4).attribute(x)
    assert ig.raw[0].shape == (2, 1, 1, 24, 24) and ig.delta.shape == (2, 1)


def test_progress_and_cancel():
    net = small_net()
    x = volume((1, 1, 16, 16, 16))
    seen: list[float] = []
    RELIG(net, layer="down1", n_samples=3, n_steps=4, internal_batch_size=2).attribute(x, progress=seen.append)
    assert seen[0] == 0.0 and seen[-1] == 1.0 and len(seen) >= 3 * 2
    assert all(a <= b for a, b in zip(seen, seen[1:], strict=False))
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(AttributionCancelled):
        RELIG(net, layer="down1", n_samples=3, n_steps=4, internal_batch_size=2).attribute(x, cancel=cancel)
    with pytest.raises(AttributionCancelled):
        IntegratedGradients(net.classify, n_steps=8, internal_batch_size=1).attribute(x, cancel=lambda: True)
    assert all(not m._forward_hooks for m in net.modules())


# -- the noise tunnel composes with any explainer -------------------------------------------------------------


def test_noise_tunnel_over_ig_equals_captum_and_is_independent_of_batching():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Softplus(), nn.Flatten(), nn.LazyLinear(2)).eval()
    x = volume((1, 1, 10, 10))
    model(x)
    ig = IntegratedGradients(model, n_steps=5)
    att = NoiseTunnel(ig, n_samples=4, stdev_fraction=0.2, seed=9).attribute(x, target=1)
    torch.manual_seed(9)
    ref = CaptumNT(CaptumIG(model)).attribute(x, nt_samples=4, nt_samples_batch_size=1,
                                              stdevs=0.2 * float(x.max() - x.min()), n_steps=5, target=1)
    assert rel_l2(att.raw[0][:, 0], ref) < 1e-4
    chunked = NoiseTunnel(ig, n_samples=4, stdev_fraction=0.2, seed=9, samples_batch_size=3).attribute(x, target=1)
    assert rel_l2(chunked.raw[0], att.raw[0]) < 1e-5
    other_seed = NoiseTunnel(ig, n_samples=4, stdev_fraction=0.2, seed=10).attribute(x, target=1)
    assert rel_l2(other_seed.raw[0], att.raw[0]) > 1e-3
    var = NoiseTunnel(ig, n_samples=4, stdev_fraction=0.2, seed=9, nt_type="vargrad").attribute(x, target=1)
    assert (var.raw[0] >= -1e-7).all() and var.delta is None


def test_noise_tunnel_over_a_cam_method_and_zero_noise():
    net = small_net()
    x = volume((1, 1, 16, 16, 16))
    cam = get_explainer("gradcam")(net, layer="encoder_out")
    plain = cam.attribute(x, target=1)
    tunnel = NoiseTunnel(cam, n_samples=2, stdev_fraction=0.0)
    att = tunnel.attribute(x, target=1)
    torch.testing.assert_close(att.raw[0], plain.raw[0])
    assert tunnel.display == cam.display and tunnel.needs == cam.needs and att.layer == "encoder_out"


# -- the default model through its adapter ------------------------------------------------------------------


def test_default_model_relig_uses_the_card_layer_and_the_fast_path(default_model):
    explainer = default_model.explainer("relig", n_samples=1, n_steps=2)
    layer = default_model.card.layers["relig"]
    assert layer in default_model.net.sequential_stages
    assert explainer.layer_name == layer and explainer.explainer.forward_from is not None
    x = volume((1, 1, 64, 64, 64))
    att = explainer.attribute(x)
    assert att.raw[0].shape == (1, 1, 1, 64, 64, 64) and att.layer == layer
    ig = default_model.explainer("ig", n_steps=2)
    assert ig.model is None  # the class path as a plain function

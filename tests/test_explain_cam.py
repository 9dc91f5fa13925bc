"""Class-activation-map explainers: localisation on models with a known answer, targets, batching,
hooks, flat maps, BrainLesionNet, and agreement with MONAI / pytorch-grad-cam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from xai_core.explain import available_methods, get_explainer, resolve_targets
from xai_core.explain.base import Explainer, register
from xai_core.models.brain_lesion_net import BrainLesionNet, ClassLogits

CAM_METHODS = ["gradcam", "gradcam++", "scorecam"]

# Boxes (per spatial dims) that classes 0 and 1 read, and a distractor blob that no class reads.
GEOMETRY = {
    2: {"size": (32, 32), "a": (slice(4, 12), slice(4, 12)), "b": (slice(20, 28), slice(4, 12)),
        "distractor": (slice(20, 28), slice(20, 28))},
    3: {"size": (16, 16, 16), "a": (slice(2, 7),) * 3, "b": (slice(9, 14), slice(2, 7), slice(2, 7)),
        "distractor": (slice(9, 14),) * 3},
}


class GatedNet(nn.Module):
    """A deterministic CNN whose class 0 reads only box ``a`` and class 1 only box ``b``.

    features (conv + ReLU, positive weights) -> fixed spatial gate (channels 0-3 see box a, 4-7 box b)
    -> head (grouped stride-2 conv + ReLU, the CAM layer) -> global average pool -> linear:
    class 0 sums channels 0-3, class 1 channels 4-7, class 2 is a constant 0 logit.
    """

    def __init__(self, spatial_dims: int, scale: float = 2.0):
        super().__init__()
        geo = GEOMETRY[spatial_dims]
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        gen = torch.Generator().manual_seed(0)
        self.features = nn.Sequential(conv(1, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(conv(8, 8, 3, stride=2, padding=1, groups=2, bias=False), nn.ReLU())
        with torch.no_grad():
            w = self.features[0].weight
            w.copy_(torch.rand(w.shape, generator=gen) * 0.5 + 0.1)
            self.features[0].bias.zero_()
            w = self.head[0].weight
            w.copy_(torch.rand(w.shape, generator=gen) * 0.5 + 0.1)
        gate = torch.zeros(1, 8, *geo["size"])
        gate[(0, slice(0, 4), *geo["a"])] = 1.0
        gate[(0, slice(4, 8), *geo["b"])] = 1.0
        self.register_buffer("gate", gate)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            self.fc.weight[0, :4] = scale
            self.fc.weight[1, 4:] = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(self.features(x) * self.gate)
        return self.fc(h.flatten(2).mean(-1))


def scene(spatial_dims: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Bright blobs in box a, box b and the distractor, over weak noise: ``(B, 1, *size)``."""
    geo = GEOMETRY[spatial_dims]
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, *geo["size"], generator=gen) * 0.1
    for key in ("a", "b", "distractor"):
        x[(slice(None), 0, *geo[key])] += 1.0
    return x


def region_mask(spatial_dims: int, key: str) -> torch.Tensor:
    m = torch.zeros(GEOMETRY[spatial_dims]["size"], dtype=torch.bool)
    m[GEOMETRY[spatial_dims][key]] = True
    return m


def dilate(mask: torch.Tensor, r: int = 1) -> torch.Tensor:
    pool = nn.functional.max_pool3d if mask.ndim == 3 else nn.functional.max_pool2d
    return pool(mask[None, None].float(), 2 * r + 1, stride=1, padding=r)[0, 0] > 0


def tiny_lesion_net(spatial_dims: int = 3, discover: bool = False) -> BrainLesionNet:
    """``discover=True`` hides the model's declared ``default_cam_layer``: explainers must find it."""
    torch.manual_seed(0)
    model = BrainLesionNet(spatial_dims=spatial_dims, channels=(4, 8, 8, 8)).eval()
    if discover:
        model.default_cam_layer = None
    return model


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    pair = torch.stack([a.detach().flatten().double(), b.detach().flatten().double()])
    return float(torch.corrcoef(pair)[0, 1])


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               and not m._backward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------------------------------------
# Localisation on a model with a known answer
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("method", CAM_METHODS)
def test_map_localises_the_region_the_class_reads(method: str, spatial_dims: int) -> None:
    model = GatedNet(spatial_dims)
    x = scene(spatial_dims)
    explainer = get_explainer(method)(model)
    maps = explainer.attribute(x, target=[0, 1]).maps  # B == 1: both classes
    assert explainer.layer_name == "head"
    assert maps.shape == (1, 2, *GEOMETRY[spatial_dims]["size"]) and maps.dtype == torch.float32
    for t, key in enumerate(("a", "b")):
        m = maps[0, t]
        inside = region_mask(spatial_dims, key)
        near = dilate(inside, 2)  # the stride-2 layer and its 3-wide kernel blur the edge
        peak = torch.zeros_like(inside).flatten()
        peak[int(m.argmax())] = True
        assert bool((peak.view_as(inside) & near).any()), f"{method} class {t}: peak outside box {key}"
        assert float(m[inside].mean()) > float(m[~near].mean()) + 0.3
        # Class-specific: the other class's box and the distractor are bright too, but not read.
        other = region_mask(spatial_dims, "ba"[t]) | region_mask(spatial_dims, "distractor")
        assert float(m[other].mean()) < 0.1
        assert float(m.max()) == pytest.approx(1.0) and float(m.min()) == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------------------
# Targets, batching, consistency
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", CAM_METHODS)
def test_all_targets_match_single_calls_and_batches(method: str) -> None:
    model = GatedNet(2)
    x = torch.cat([scene(2, seed=1), scene(2, seed=2).flip(-1)])  # two different items
    explainer = get_explainer(method)(model)
    info = explainer.attribute(x, target="all")
    assert info.maps.shape == (2, 3, 32, 32)
    assert info.targets.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert info.logits.shape == (2, 3)
    for c in range(3):
        single = explainer.attribute(x, target=c).maps
        assert single.shape == (2, 1, 32, 32)
        torch.testing.assert_close(single[:, 0], info.maps[:, c], atol=1e-5, rtol=0)
    per_item = explainer.attribute(x, target=[1, 0]).maps  # B == 2: one class per item
    assert per_item.shape == (2, 1, 32, 32)
    for b, c in enumerate([1, 0]):
        alone = explainer.attribute(x[b:b + 1], target=c).maps
        torch.testing.assert_close(per_item[b, 0], alone[0, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(per_item[b, 0], info.maps[b, c], atol=1e-5, rtol=0)
    nested = explainer.attribute(x, target=[[2, 0], [1, 2]]).maps
    torch.testing.assert_close(nested[1, 0], info.maps[1, 1], atol=1e-5, rtol=0)


def test_gradcam_flags_a_class_with_no_evidence() -> None:
    """Class 2 of GatedNet is a constant logit: zero gradient, flat map, reported and all zeros."""
    explainer = get_explainer("gradcam")(GatedNet(2))
    att = explainer.attribute(scene(2), target="all")
    maps = att.maps
    assert att.flat.tolist() == [[False, False, True]]
    assert att.raw[0].shape == (1, 3, 1, 32, 32) and float(att.raw[0][0, 2].abs().max()) == 0.0
    assert float(maps[0, 2].abs().max()) == 0.0


def test_resolve_targets_rules() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    assert resolve_targets(None, logits).tolist() == [[1], [0]]
    assert resolve_targets(2, logits).tolist() == [[2], [2]]
    assert resolve_targets(np.int64(2), logits).tolist() == [[2], [2]]
    assert resolve_targets(np.array([1, 0]), logits).tolist() == [[1], [0]]
    assert resolve_targets([2, 1], logits).tolist() == [[2], [1]]
    assert resolve_targets([[0, 1]], logits).tolist() == [[0, 1], [0, 1]]
    assert resolve_targets(torch.tensor([[0, 2], [1, 1]]), logits).tolist() == [[0, 2], [1, 1]]
    assert resolve_targets("all", logits).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert resolve_targets([0, 2], logits[:1]).tolist() == [[0, 2]]
    for bad, err in [(3, ValueError), (-1, ValueError), ([0, 1, 2], ValueError), ("best", ValueError),
                     (True, TypeError), ([0.5, 1.0], TypeError)]:
        with pytest.raises(err):
            resolve_targets(bad, logits)


# ----------------------------------------------------------------------------------------------------------
# Hooks, modes, grad state
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", CAM_METHODS)
def test_hooks_removed_and_modes_restored_even_on_errors(method: str) -> None:
    model = tiny_lesion_net(2, discover=True)
    model.train()
    model.stem.eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    x = torch.randn(1, 1, 32, 32)
    explainer = get_explainer(method)(model)  # no layer known: the first call hooks every conv stage
    assert explainer.layer_name is None
    with pytest.raises(RuntimeError):
        explainer.attribute(torch.randn(1, 3, 32, 32), target=0)  # wrong channels: fails in forward
    assert no_hooks(model) and {n: m.training for n, m in model.named_modules()} == modes
    explainer.attribute(x, target=0)
    assert explainer.layer_name == "encoder_out"
    assert no_hooks(model) and {n: m.training for n, m in model.named_modules()} == modes
    with pytest.raises(ValueError):
        explainer.attribute(x, target=7)  # out of range: fails after the forward
    with pytest.raises(RuntimeError):
        explainer.attribute(torch.randn(1, 3, 32, 32), target=0)  # now with the cached layer
    assert no_hooks(model) and {n: m.training for n, m in model.named_modules()} == modes


@pytest.mark.parametrize("method", CAM_METHODS)
def test_works_under_no_grad_and_with_frozen_weights(method: str) -> None:
    model = GatedNet(2)
    for p in model.parameters():
        p.requires_grad_(False)
    x = scene(2)
    with torch.no_grad():
        maps = get_explainer(method)(model).attribute(x, target=0).maps
    inside = region_mask(2, "a")
    assert float(maps[0, 0][inside].mean()) > 0.5
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", CAM_METHODS)
def test_flat_relu_layer_gives_flag_and_zeros(method: str) -> None:
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0][0].bias.fill_(-1e3)  # every activation below zero: the ReLU output is all zeros
    explainer = get_explainer(method)(model)
    info = explainer.attribute(torch.rand(2, 1, 16, 16), target="all")
    assert info.layer == "0"
    assert info.flat.all()
    assert torch.equal(info.maps, torch.zeros_like(info.maps))
    assert not torch.isnan(info.maps).any()


# ----------------------------------------------------------------------------------------------------------
# Layers, outputs, registry
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("method", CAM_METHODS)
def test_brain_lesion_net_default_layer(method: str, spatial_dims: int) -> None:
    model = tiny_lesion_net(spatial_dims, discover=True)
    size = (32,) * spatial_dims
    x = torch.randn(2, 1, *size)
    explainer = get_explainer(method)(model)  # dual output: output_index=0 picks class logits
    info = explainer.attribute(x, target="all")
    assert info.layer == "encoder_out"  # found on the class path, not in the segmentation decoder
    declared = get_explainer(method)(tiny_lesion_net(spatial_dims))  # BrainLesionNet.default_cam_layer
    assert declared.layer_name == "encoder_out"
    torch.testing.assert_close(declared.attribute(x[:1], target="all").maps, info.maps[:1])
    assert info.maps.shape == (2, 4, *size)
    assert torch.isfinite(info.maps).all() and float(info.maps.min()) >= 0.0 and float(info.maps.max()) <= 1.0
    assert info.logits.shape == (2, 4)


def test_layer_selection_forms() -> None:
    model = tiny_lesion_net(2)
    x = torch.randn(1, 1, 32, 32)
    by_name = get_explainer("gradcam")(model, layer="down2").attribute(x, target=1).maps
    by_module = get_explainer("gradcam")(model, layer=model.down2).attribute(x, target=1).maps
    torch.testing.assert_close(by_name, by_module)
    by_field = get_explainer("gradcam")(model, output_index="class_logits").attribute(x, target=1).maps
    default = get_explainer("gradcam")(model).attribute(x, target=1).maps
    torch.testing.assert_close(by_field, default)
    wrapped = get_explainer("gradcam")(ClassLogits(model))
    torch.testing.assert_close(wrapped.attribute(x, target=1).maps, default)
    assert wrapped.layer_name == "model.encoder_out"
    found = get_explainer("gradcam")(ClassLogits(tiny_lesion_net(2, discover=True)))
    torch.testing.assert_close(found.attribute(x, target=1).maps, default)
    assert found.layer_name == "model.encoder_out"
    model.default_cam_layer = "down1"  # the declared CAM layer is the default
    assert get_explainer("gradcam")(model).layer_name == "down1"
    assert get_explainer("gradcam")(ClassLogits(model)).layer_name == "model.down1"
    with pytest.raises(ValueError):
        get_explainer("gradcam")(model, layer="no.such.layer")
    with pytest.raises(ValueError, match="do not depend"):
        get_explainer("gradcam")(model, layer="seg_head").attribute(x, target=0)
    assert no_hooks(model)


def test_registry() -> None:
    assert {"gradcam", "gradcam++", "scorecam"} <= set(available_methods())
    assert get_explainer("GradCAM++").name == "gradcam++"
    with pytest.raises(KeyError, match="available"):
        get_explainer("nope")
    with pytest.raises(ValueError):
        register("gradcam")(type("Other", (Explainer,), {}))

    class TwoModel(Explainer):  # methods with extra constructor arguments fit cls(model, **kwargs)
        title = "Two models"
        model_kinds = frozenset({"volume-classifier"})

        def __init__(self, model: nn.Module, *, reference: nn.Module, output_index: int = 0):
            super().__init__(model, output_index=output_index)
            self.reference = reference

    register("test-two-model")(TwoModel)
    try:
        e = get_explainer("test-two-model")(nn.Identity(), reference=nn.Identity())
        assert isinstance(e.reference, nn.Identity)
    finally:
        from xai_core.explain import base

        base._REGISTRY.pop("test-two-model")


# ----------------------------------------------------------------------------------------------------------
# Agreement with reference implementations
# ----------------------------------------------------------------------------------------------------------


def _monai_raw(cls, model: nn.Module, layer: str, x: torch.Tensor, c: int) -> torch.Tensor:
    # MONAI inverts by default; the identity post-processing gives the raw (upsampled) map. Its
    # Grad-CAM++ broadcasts the score wrongly for B > 1, so one item at a time.
    cam = cls(nn_module=model, target_layers=layer, postprocessing=lambda v: v)
    return torch.cat([cam(x[i:i + 1], class_idx=c) for i in range(x.shape[0])])


def test_gradcam_matches_monai_on_brain_lesion_net() -> None:
    from monai.visualize import GradCAM as MonaiGradCAM
    from monai.visualize import GradCAMpp as MonaiGradCAMpp

    model = tiny_lesion_net(3)
    x = torch.randn(2, 1, 32, 32, 32)
    gc, gcpp = get_explainer("gradcam")(model), get_explainer("gradcam++")(model, variant="monai")
    att = gc.attribute(x, target="all")
    ours, flat = att.maps, att.flat
    att_pp = gcpp.attribute(x, target="all")
    ours_pp, flat_pp = att_pp.maps, att_pp.flat
    compared = 0
    for c in range(4):
        ref = _monai_raw(MonaiGradCAM, ClassLogits(model), "model.encoder_out", x, c)
        ref_pp = _monai_raw(MonaiGradCAMpp, ClassLogits(model), "model.encoder_out", x, c)
        for b in range(2):
            # A random net leaves some class maps all zero after the ReLU: then MONAI's must be too.
            for mine, is_flat, theirs in ((ours, flat, ref), (ours_pp, flat_pp, ref_pp)):
                if bool(is_flat[b, c]):
                    assert float(theirs[b, 0].max() - theirs[b, 0].min()) <= 1e-6 * float(theirs[b, 0].abs().max() + 1)
                else:
                    assert pearson(mine[b, c], theirs[b, 0]) > 0.99
                    compared += 1
    assert compared >= 4, "too few non-flat maps to compare"


def test_gradcampp_paper_form_matches_monai_where_they_coincide() -> None:
    """With a layer followed only by global average pooling the gradient is constant over space and
    MONAI's denominator equals the paper's: the default (paper) variant must agree with MONAI."""
    from monai.visualize import GradCAMpp as MonaiGradCAMpp

    model = GatedNet(3)
    x = scene(3)
    ours = get_explainer("gradcam++")(model).attribute(x, target=[0, 1]).maps
    for t in range(2):
        ref = _monai_raw(MonaiGradCAMpp, GatedNet(3), "head", x, t)
        assert pearson(ours[0, t], ref[0, 0]) > 0.99


def test_gradcampp_paper_form_matches_pytorch_grad_cam_2d() -> None:
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = tiny_lesion_net(2)
    x = torch.randn(1, 1, 32, 32)
    ours = get_explainer("gradcam++")(model).attribute(x, target="all").maps
    ref_model = tiny_lesion_net(2)
    cam = pgc.GradCAMPlusPlus(ClassLogits(ref_model), target_layers=[ref_model.encoder_out])
    try:
        for c in range(4):
            ref = torch.from_numpy(cam(x, targets=[ClassifierOutputTarget(c)]))
            assert pearson(ours[0, c], ref[0]) > 0.99
    finally:
        cam.activations_and_grads.release()


def test_scorecam_matches_a_direct_computation() -> None:
    """Score-CAM by its definition, one masked forward per channel, no chunking."""
    model = tiny_lesion_net(2)
    x = torch.randn(1, 1, 32, 32)
    store = {}
    h = model.encoder_out.register_forward_hook(lambda _m, _a, out: store.update(a=out))
    with torch.no_grad():
        model(x)
    h.remove()
    a = store["a"][0]
    weights = []
    for k in range(a.shape[0]):
        m = nn.functional.interpolate(a[k][None, None], size=(32, 32), mode="bilinear", align_corners=False)
        rng = m.max() - m.min()
        m = (m - m.min()) / rng if rng > 0 else torch.zeros_like(m)
        with torch.no_grad():
            weights.append(torch.softmax(model(x * m).class_logits, 1)[0, 3])
    raw = torch.relu(torch.einsum("k,k...->...", torch.stack(weights), a))
    ref = nn.functional.interpolate(raw[None, None], size=(32, 32), mode="bilinear", align_corners=False)
    ref = ref[0, 0]
    ours = get_explainer("scorecam")(model, batch_size=3).attribute(x, target=3).maps
    assert pearson(ours[0, 0], ref) > 0.999

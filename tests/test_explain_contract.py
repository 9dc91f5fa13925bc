"""The explainer and model contracts (issue 11): CAM maps unchanged, targets, kinds, adapters,
black-box functions, progress and cancel, tuple inputs, settings passed in."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from xai_core.explain import (
    AttributionCancelled,
    TargetError,
    available_methods,
    get_explainer,
    parse_target,
    target_classes,
)

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("cam_tests_for_contract", HERE / "test_explain_cam.py")
cam_tests = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cam_tests
_spec.loader.exec_module(cam_tests)
_ref_spec = importlib.util.spec_from_file_location("cam_reference_maker", HERE / "data" / "make_cam_reference.py")
ref_maker = importlib.util.module_from_spec(_ref_spec)
_ref_spec.loader.exec_module(ref_maker)

CAM_METHODS = ["gradcam", "gradcam++", "scorecam"]
CLASSES = ["none", "glioma", "meningioma", "metastasis"]


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return dict(np.load(HERE / "data" / "cam_reference.npz"))


@pytest.mark.parametrize("method", CAM_METHODS)
def test_cam_maps_unchanged_on_the_default_model(method: str, default_model, reference) -> None:
    """Maps computed with the contract before issue 11 (tests/data/make_cam_reference.py)."""
    x = ref_maker.reference_inputs()["default"]
    explainer = default_model.explainer(method)
    att = explainer.attribute(x, target="all")
    ours = att.maps[..., ::4, ::4, ::4].numpy()
    np.testing.assert_allclose(ours, reference[f"default/{method}"], atol=2e-5, rtol=0)
    assert att.layer == "encoder_out" and att.layer_raw.shape == (1, 4, 1, 16, 16, 16)
    assert att.raw[0].shape == (1, 4, 1, 64, 64, 64) and float(att.raw[0].min()) >= 0.0


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method", CAM_METHODS)
def test_cam_maps_unchanged_on_hand_built_models(method: str, dims: int, reference) -> None:
    maps = get_explainer(method)(cam_tests.GatedNet(dims)).attribute(cam_tests.scene(dims), target="all").maps
    ours = (maps[..., ::2, ::2] if dims == 2 else maps).numpy()
    np.testing.assert_allclose(ours, reference[f"gated{dims}/{method}"], atol=2e-5, rtol=0)


def test_one_target_parser() -> None:
    assert parse_target(None, CLASSES) is None
    assert parse_target("predicted", CLASSES) is None
    assert parse_target("all", CLASSES) == "all"
    assert parse_target("glioma", CLASSES) == (1,)
    assert parse_target("3", CLASSES) == (3,)
    assert parse_target(2, CLASSES) == (2,)
    assert parse_target(["glioma"], CLASSES) == (1,)  # MONAI Label clients send a one-element list
    assert parse_target(["metastasis", 0], CLASSES) == (3, 0)
    for bad, words in [("²", "unknown target"), ("4", "out of range"), (-1, "out of range"), (True, "boolean"),
                       ("Glioma", "unknown target"), (["glioma", "glioma"], "twice"), ({"a": 1}, "unknown")]:
        with pytest.raises(TargetError, match=words):
            parse_target(bad, CLASSES)
    assert target_classes(None, 4, predicted=2) == [2]
    assert target_classes("all", 4, predicted=2) == [2, 0, 1, 3]
    assert target_classes((3, 0), 4, predicted=2) == [3, 0]


def test_methods_declare_title_kinds_and_needs() -> None:
    for name in available_methods():
        cls = get_explainer(name)
        assert cls.title and cls.model_kinds and cls.needs in ("gradients", "activations", "forward")
    assert {"gradcam", "gradcam++", "scorecam"} <= set(available_methods("volume-classifier"))
    assert not {"gradcam", "gradcam++", "scorecam"} & set(available_methods("vqa"))
    assert get_explainer("scorecam").needs == "activations"
    assert get_explainer("gradcam++").title.startswith("Grad-CAM++")


def test_cam_refuses_a_plain_function_with_a_clear_error() -> None:
    with pytest.raises(TypeError, match="hooks a layer.*nn.Module"):
        get_explainer("gradcam")(lambda x: x.flatten(1)[:, :3])


def test_cam_takes_a_tuple_of_inputs_and_forward_args() -> None:
    """A second input and a forward argument reach the model; only input 0 is shown."""

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = cam_tests.GatedNet(2)

        def forward(self, x: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
            return self.net(x) * scale + bias

    model = TwoInputs()
    x = cam_tests.scene(2)
    plain = get_explainer("gradcam")(model.net).attribute(x, target=[0, 1])
    att = get_explainer("gradcam")(model, layer="net.head").attribute(
        (x, torch.zeros(1, 3)), target=[0, 1], additional_forward_args=(2.0,))
    assert len(att.raw) == 1 and att.maps.shape == plain.maps.shape
    torch.testing.assert_close(att.maps, plain.maps, atol=1e-5, rtol=0)  # a positive scale leaves maps as they are
    torch.testing.assert_close(att.logits, plain.logits * 2.0)


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
def test_progress_is_reported_and_cancel_stops(method: str) -> None:
    model = cam_tests.GatedNet(2)
    x = cam_tests.scene(2)
    seen: list[float] = []
    get_explainer(method)(model).attribute(x, target="all", progress=seen.append)
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen) and len(seen) >= 3
    calls = {"n": 0}

    def cancel_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(AttributionCancelled):
        get_explainer(method)(model).attribute(x, target="all", cancel=cancel_after_two)
    assert cam_tests.no_hooks(model)


def test_default_model_adapter(default_model) -> None:
    assert default_model.kind == "volume-classifier" and default_model.card.kind == "volume-classifier"
    x = ref_maker.reference_inputs()["default"]
    with torch.no_grad():
        full = default_model.net(x).class_logits
        torch.testing.assert_close(default_model.forward_func()(x), full, atol=1e-5, rtol=1e-5)
        for stage in default_model.net.sequential_stages:  # forward_from continues from any encoder stage
            h = x
            for name in default_model.net.sequential_stages[:default_model.net.sequential_stages.index(stage) + 1]:
                h = getattr(default_model.net, name)(h)
            torch.testing.assert_close(default_model.net.forward_from(stage, h), full, atol=1e-5, rtol=1e-5)
    assert default_model.explainer("gradcam++").layer_name == "encoder_out"
    with pytest.raises(KeyError, match="unknown explanation method"):
        default_model.explainer("nope")


def test_randomised_copy_cascades_from_the_output(default_model) -> None:
    order = default_model.cascade_layers()
    assert order[0] == "classifier" and order[-1] == "stem"
    before = {k: v.clone() for k, v in default_model.net.state_dict().items()}
    rnd = default_model.randomised("encoder_body", seed=3)
    after = rnd.net.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"classifier", "encoder_seg", "encoder_body"} <= changed
    assert not changed & {"stem", "down1", "down2", "dec1", "dec2", "seg_head"}
    assert all(torch.equal(v, default_model.net.state_dict()[k]) for k, v in before.items())  # original untouched
    again = default_model.randomised("encoder_body", seed=3).net.state_dict()
    assert all(torch.equal(after[k], again[k]) for k in after)  # seeded
    with pytest.raises(ValueError, match="cascade order"):
        default_model.randomised("nope")

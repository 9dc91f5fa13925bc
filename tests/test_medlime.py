"""LIME / MedLIME: perturbation units, masks, kernel, surrogate, fills (tiny synthetic black boxes only)."""

from __future__ import annotations

import math

import pytest
import torch

from xai_core.explain import available_methods, get_explainer
from xai_core.explain.fills import BlurFill, ConstantFill, MeanFill, make_fill
from xai_core.explain.lime import fit_surrogate, patch_units, proximity, sample_masks

torch.set_num_threads(1)


class LinearBox(torch.nn.Module):
    """Class logits ``sum_u a[c, u] * mean(x over unit u)``: a black box that is exactly linear in the units."""

    def __init__(self, a: torch.Tensor, labels: torch.Tensor):
        super().__init__()
        self.a, self.labels = a, labels
        n_units = a.shape[1]
        counts = torch.bincount(labels.flatten(), minlength=n_units).float()
        # (V, n_units) averaging matrix, then (V, C) weights per voxel
        avg = torch.zeros(labels.numel(), n_units).scatter_(1, labels.flatten()[:, None], 1.0) / counts
        self.m = avg @ a.T
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0]
        return x.flatten(1) @ self.m


def test_units_cover_the_grid_in_row_major_order_and_skip_empty_background():
    u = patch_units((10, 7), 4)
    assert u.grid == (3, 2) and u.n_units == 6 and u.d == 6
    assert u.labels[0, 0] == 0 and u.labels[0, 6] == 1 and u.labels[4, 0] == 2 and u.labels[9, 6] == 5
    assert torch.bincount(u.labels.flatten()).tolist() == [16, 12, 16, 12, 8, 6]  # edge units are smaller
    x = torch.full((1, 8, 8, 8), 0.02) + 0.05 * torch.rand(1, 8, 8, 8)  # noisy air
    x[0, 5, 1, 6] = 1.0  # one bright voxel: only its cube is a feature
    u3 = patch_units((8, 8, 8), 4, x)
    assert u3.features.tolist() == [1 * 4 + 0 * 2 + 1]
    w = torch.tensor([2.5])
    painted = u3.paint(w)
    assert painted.shape == (8, 8, 8) and painted[4:, :4, 4:].eq(2.5).all() and painted.sum() == 2.5 * 64
    hidden = u3.hidden_voxels(torch.tensor([[False], [True]]))
    assert hidden[0].sum() == 64 and hidden[0, 4:, :4, 4:].all() and not hidden[1].any()


def test_masks_hide_the_asked_ratios_and_kernel_favours_near_samples():
    g = torch.Generator().manual_seed(0)
    keep = sample_masks(9, 40, (0.1, 0.25, 0.5), g)
    assert keep.shape == (9, 40)
    assert (~keep).sum(1).tolist() == [4, 10, 20] * 3
    pi = proximity(keep, 0.25)
    assert pi[0] > pi[1] > pi[2]
    d = 1 - math.sqrt(30 / 40)
    assert pi[1].item() == pytest.approx(math.exp(-d * d / 0.0625))
    assert proximity(torch.ones(1, 40, dtype=torch.bool), 0.25).item() == 1.0
    with pytest.raises(ValueError, match="ratios"):
        sample_masks(4, 10, (0.0, 1.0), g)


def test_surrogate_recovers_known_patch_weights_from_a_linear_black_box():
    """Zero fill on a linear box: hiding unit u lowers logit c by exactly a[c, u] * mean_u(x)."""
    torch.manual_seed(0)
    spatial = (16, 16, 16)
    units = patch_units(spatial, 4)  # 64 units
    a = torch.randn(3, units.n_units)
    box = LinearBox(a, units.labels)
    x = 0.5 + torch.rand(1, 1, *spatial)
    lime = get_explainer("lime")(box, patch=4, n_samples=160, fill="zero", alpha=0.0, batch_size=32)
    att = lime.attribute(x, target=[[0, 2]])
    truth = a[[0, 2]] * units.unit_means(x[0, 0]).float()  # (2, 64) weights per unit
    assert att.raw[0].shape == (1, 2, 1, *spatial)
    got = torch.stack([att.raw[0][0, t, 0][::4, ::4, ::4].flatten() for t in range(2)])
    assert torch.allclose(got, truth, atol=1e-4, rtol=1e-4)
    assert min(att.extras["surrogate_r2"]) > 0.9999
    assert box.calls == 1 + 160  # the original once, then every sample once
    assert att.maps.shape == (1, 2, *spatial) and float(att.maps.max()) == 1.0


def test_l1_surrogate_finds_the_sparse_support():
    torch.manual_seed(1)
    n, d = 300, 50
    z = (torch.rand(n, d) > 0.3).float()
    w_true = torch.zeros(d)
    w_true[[3, 17, 40]] = torch.tensor([2.0, -1.5, 1.0])
    y = 0.7 + z @ w_true + 0.05 * torch.randn(n)
    pi = torch.rand(n) + 0.5
    dense = fit_surrogate(z, y, pi)
    sparse = fit_surrogate(z, y, pi, lambda1=0.02)
    assert sparse.solver.startswith("FISTA") and dense.solver.startswith("closed")
    off = torch.ones(d, dtype=torch.bool)
    off[[3, 17, 40]] = False
    assert (sparse.w[0, off] == 0).float().mean() > 0.8 > (dense.w[0, off] == 0).float().mean()
    assert torch.allclose(sparse.w[0, ~off], w_true[~off], atol=0.15)
    # The evidence term: with a large lambda2 the weights go to the prior.
    prior = torch.full((d,), 0.3)
    pulled = fit_surrogate(z, y, pi, lambda2=1e4, prior=prior)
    assert torch.allclose(pulled.w[0], prior, atol=1e-2)


def test_batch_size_does_not_change_the_explanation():
    torch.manual_seed(2)
    units = patch_units((12, 12), 3)
    box = LinearBox(torch.randn(2, units.n_units), units.labels)
    x = torch.rand(1, 1, 12, 12)
    r1 = get_explainer("lime")(box, patch=3, n_samples=40, batch_size=1).attribute(x).raw[0]
    r2 = get_explainer("lime")(box, patch=3, n_samples=40, batch_size=64).attribute(x).raw[0]
    assert torch.allclose(r1, r2, atol=1e-5)


def test_fills_change_only_hidden_voxels():
    torch.manual_seed(3)
    x = torch.rand(1, 1, 8, 8, 8) + 0.1
    x[..., :2] = 0.0  # background
    hidden = torch.zeros(3, 8, 8, 8, dtype=torch.bool)
    hidden[0, :4] = True
    hidden[2, 4:, 4:] = True
    fg_mean = x[x > 0.1 * x.max()].mean()  # the background rule: above 10 % of the range
    for fill in (ConstantFill(0.0), MeanFill(x), BlurFill(1.5), make_fill("mean", x)):
        out = fill(x, hidden)
        assert out.shape == (3, 1, 8, 8, 8)
        assert torch.equal(out[~hidden[:, None].expand_as(out)], x.expand_as(out)[~hidden[:, None].expand_as(out)])
    assert torch.allclose(MeanFill(x)(x, hidden)[0, 0, 0], fg_mean.expand(8, 8))
    with pytest.raises(ValueError, match="unknown fill"):
        make_fill("noise", x)


def test_lime_is_registered_as_a_black_box_method():
    assert "lime" in available_methods("volume-classifier")
    cls = get_explainer("lime")
    assert cls.needs == "forward" and cls.display == "positive"


class BrightnessNet(torch.nn.Module):
    """Class 1 ('lesion') is confident when the mean foreground intensity is near 1 (what it was 'trained' on);
    a conv layer with weights, so the test can check that STTA leaves them alone."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False)
        torch.nn.init.dirac_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        fg = (x > 0).float()
        m = (h * fg).flatten(1).sum(1) / fg.flatten(1).sum(1).clamp(min=1)
        return torch.stack([torch.zeros_like(m), 4.0 - 20.0 * (m - 1.0) ** 2], dim=1)


def test_stta_lowers_the_loss_on_an_intensity_shifted_input():
    from xai_core.stta import STTA, photometric

    torch.manual_seed(4)
    x = torch.zeros(1, 1, 16, 16, 16)
    x[..., 3:13, 3:13, 3:13] = 0.9 + 0.2 * torch.rand(1, 1, 10, 10, 10)
    net = BrightnessNet()
    before_w = net.conv.weight.detach().clone()
    shifted = x * 0.6  # a darker scanner
    res = STTA(net, steps=20, n_views=2, lr=0.05).adapt(shifted, label=1)
    assert res.loss_after < 0.5 * res.loss_before
    assert res.params["scale"] > 1.1  # it brightened the input back
    assert net.conv.weight.grad is None and torch.equal(net.conv.weight, before_w)
    assert torch.equal(res.x_adapted[shifted == 0], shifted[shifted == 0])  # background untouched
    # The identity parameters give the input back exactly.
    assert torch.equal(photometric(x, torch.tensor([0.0, 0.0, 0.0, -1e4])), x)


def tiny_mae():
    from xai_core.mae import MAE3D

    torch.manual_seed(5)
    return MAE3D(img_size=16, patch_size=4, hidden_size=24, mlp_dim=48, num_layers=1, num_heads=4,
                 decoder_hidden_size=12, decoder_mlp_dim=24, decoder_num_layers=1, decoder_num_heads=2).eval()


def test_generative_masking_changes_only_the_hidden_units():
    from xai_core.explain.fills import MAEFill

    mae = tiny_mae()
    x = 0.2 + torch.rand(1, 1, 16, 16, 16)
    units = patch_units((16, 16, 16), 4, x[0])
    keep = sample_masks(6, units.d, (0.1, 0.5), torch.Generator().manual_seed(0))
    hidden = units.hidden_voxels(keep)
    out = MAEFill(mae, batch_size=4)(x, hidden)  # two ratios in one call, across two batches
    vis = ~hidden[:, None]
    assert torch.equal(out[vis], x.expand_as(out)[vis])  # visible voxels: the same bits
    assert (out[~vis] != x.expand_as(out)[~vis]).float().mean() > 0.99  # hidden ones were filled
    # Tokens are the LIME units: the MAE hides exactly the hidden units.
    assert torch.equal(mae.tokens_hidden(hidden), ~keep)
    v = torch.rand(2, 1, 16, 16, 16)
    assert torch.equal(mae.unpatchify(mae.patchify(v)), v)


def test_nadaraya_watson_weights_sum_to_one_and_favour_nearer_cases():
    import numpy as np

    from xai_core.evidence import EvidenceLibrary, nadaraya_watson

    w, h = nadaraya_watson(np.array([0.05, 0.1, 0.2, 0.4]))
    assert w.sum() == pytest.approx(1.0) and np.all(np.diff(w) < 0) and h == pytest.approx(0.15)
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, 8)).astype(np.float32)
    maps = rng.random((6, 64)).astype(np.float32)
    lib = EvidenceLibrary(features=f, maps=maps, case_ids=[f"c{i}" for i in range(6)],
                          labels=["glioma", "none", "glioma", "metastasis", "meningioma", "glioma"], patch=4,
                          grid=(4, 4, 4))
    query = f[0] + 0.05 * f[2]  # nearest to case 0, then case 2
    nb = lib.neighbours(query, k=3)
    assert nb.case_ids[0] == "c0" and "c1" not in nb.case_ids  # abnormal cases only
    assert nb.weights.sum() == pytest.approx(1.0) and np.all(np.diff(nb.weights) <= 0)
    assert np.all(np.diff(nb.distances) >= 0)
    idx = [int(c[1:]) for c in nb.case_ids]
    assert np.allclose(nb.w_nw, (nb.weights[:, None] * maps[idx]).sum(0), atol=1e-6)
    assert lib.neighbours(query, k=3, exclude="c0").case_ids[0] != "c0"
    assert lib.neighbours(query, k=3, mode="random", seed=1).mode == "random"


def test_evidence_library_round_trip_and_one_load_per_process(tmp_path):
    import numpy as np

    from xai_core.evidence import EvidenceLibrary, default_library, load_library, set_default_library

    lib = EvidenceLibrary(features=np.eye(3, 4), maps=np.ones((3, 8)), case_ids=["a", "b", "c"],
                          labels=["none", "glioma", "glioma"], patch=4, grid=(2, 2, 2), meta={"maps": "lesion"})
    path = lib.save(tmp_path / "lib.evidence")
    again = load_library(path)
    assert again.case_ids == ["a", "b", "c"] and again.meta["maps"] == "lesion" and again.grid == (2, 2, 2)
    assert load_library(path) is again
    try:
        assert set_default_library(path) is again and default_library() is again
    finally:
        set_default_library(None)


def test_medlime_names_the_evidence_cases_and_adapts_the_input():
    import numpy as np

    from xai_core.evidence import EvidenceLibrary

    torch.manual_seed(6)
    mae = tiny_mae()
    units = patch_units((16, 16, 16), 4)
    box = LinearBox(torch.randn(2, units.n_units), units.labels)
    x = 0.5 + torch.rand(1, 1, 16, 16, 16)
    rng = np.random.default_rng(1)
    feats = np.stack([mae.embed(0.5 + torch.rand(1, 1, 16, 16, 16))[0].numpy() for _ in range(5)])
    # Past cases' maps resemble this case's weights (so the fitted prior scale is positive), with noise.
    truth = (box.a[1] * units.unit_means(x[0, 0]).float()).numpy()
    maps = truth[None] + 0.3 * np.abs(truth).mean() * rng.normal(size=(5, units.n_units))
    lib = EvidenceLibrary(features=feats, maps=maps, case_ids=list("vwxyz"),
                          labels=["glioma"] * 4 + ["none"], patch=4, grid=units.grid)
    common = dict(patch=4, n_samples=48, mae=mae, fill="mae", stta_steps=3, evidence=lib, k=3)
    att = get_explainer("medlime")(box, **common).attribute(x, target=1)
    ev = att.extras["evidence"]
    assert ev["mode"] == "knn" and len(ev["cases"]) == 3 and "z" not in [c["case"] for c in ev["cases"]]
    assert sum(c["weight"] for c in ev["cases"]) == pytest.approx(1.0, abs=1e-5)
    assert att.extras["stta"]["steps"] == 3 and att.extras["fill"]["fill"] == "mae"
    from xai_core.schema import EvidenceSummary

    typed = EvidenceSummary.model_validate(ev)  # the reply's saliency.evidence field
    assert [c.case for c in typed.cases] == [c["case"] for c in ev["cases"]] and typed.k == 3
    assert att.raw[0].shape == (1, 1, 1, 16, 16, 16)
    # A heavy evidence term makes the weights follow the (scaled) evidence map.
    heavy = get_explainer("medlime")(box, **{**common, "lambda2": 1e6, "lambda1": 0.0}).attribute(x, target=1)
    nw = torch.tensor(np.sum([c["weight"] * lib.maps[lib.case_ids.index(c["case"])] for c in
                              heavy.extras["evidence"]["cases"]], axis=0)).double()
    got = heavy.raw[0][0, 0, 0][::4, ::4, ::4].flatten().double()
    scale = heavy.extras["prior_scale"][0]
    assert scale > 0 and torch.allclose(got, scale * nw, atol=1e-3 * float(nw.abs().max()) * scale)
    light = get_explainer("medlime")(box, **{**common, "lambda2": 1e-6, "lambda1": 0.0}).attribute(x, target=1)
    assert not torch.allclose(light.raw[0], heavy.raw[0], atol=1e-2)
    off = get_explainer("medlime")(box, **{**common, "ebr": "off", "stta_steps": 0}).attribute(x, target=1)
    assert off.extras["evidence"] == {"mode": "off"} and off.extras["stta"] is None
    assert "medlime" in available_methods("volume-classifier")


def _image(shape=(30, 30, 30), spacing=4.0, seed=0):
    import numpy as np

    from xai_core.io import Image

    a = np.random.default_rng(seed).random(shape).astype(np.float32) * 100 + 50
    half = (np.asarray(shape[::-1]) - 1) * spacing / 2
    return Image(array=a, spacing=(spacing,) * 3, origin=tuple(-half), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_infiller_batch_protocol_mae_and_fallback():
    import numpy as np

    from xai_core.counterfactual import BatchInFiller, InFiller, fill_batch
    from xai_core.mae import MAE3D, MAEInFiller

    image = _image()
    regions = np.zeros((3, 30, 30, 30), bool)
    regions[0, 5:12, 5:12, 5:12] = True
    regions[1, 20:22, 3:25, 10:11] = True  # thin: hidden on the grid through the voxels it touches
    torch.manual_seed(7)
    mae_filler = MAEInFiller(MAE3D().eval())
    assert isinstance(mae_filler, BatchInFiller) and isinstance(mae_filler, InFiller)
    out = fill_batch(mae_filler, image, regions)
    assert len(out) == 3
    for r, img in zip(regions, out, strict=True):
        assert img.spacing == image.spacing and img.origin == image.origin
        assert np.array_equal(img.array[~r], image.array[~r])
        if r.any():
            assert np.mean(img.array[r] != image.array[r]) > 0.99
    assert np.array_equal(out[2].array, image.array)  # an empty region changes nothing

    class Plain:  # only the single-region protocol: fill_batch loops over it
        name = "plain"

        def fill(self, img, region):
            return img.with_array(np.where(region, -1.0, img.array).astype(np.float32))

        def describe(self):
            return {}

    plain = fill_batch(Plain(), image, regions)
    assert [int((p.array == -1).sum()) for p in plain] == [int(r.sum()) for r in regions]


def test_template_infiller_batch_equals_one_region_at_a_time():
    import numpy as np
    import SimpleITK as sitk

    from xai_core.counterfactual import TemplateInFiller
    from xai_core.registration import RegistrationResult

    identity = RegistrationResult(transform=sitk.AffineTransform(3), kind="affine", metric=0.0, ncc=1.0, dice=1.0,
                                  det=1.0, likely_failed=False, reason=None, seconds=0.0, grid_spacing_mm=None)
    image = _image((24, 24, 24), 6.0)
    regions = np.zeros((2, 24, 24, 24), bool)
    regions[0, 8:12, 8:12, 8:12] = True
    regions[1, 14:18, 6:10, 12:16] = True
    filler = TemplateInFiller(identity)
    batch = filler.fill_batch(image, regions)
    for r, b in zip(regions, batch, strict=True):
        assert np.array_equal(b.array, filler.fill(image, r).array)
        assert not np.array_equal(b.array[r], image.array[r])


def test_mae_fill_on_another_grid_and_evidence_on_other_units():
    import numpy as np

    from xai_core.evidence import EvidenceLibrary
    from xai_core.explain.fills import MAEFill

    mae = tiny_mae()  # a 16^3 MAE on a 12^3 model grid (a smaller model's): resampled there and back
    x = 0.2 + torch.rand(1, 1, 12, 12, 12)
    hidden = torch.zeros(2, 12, 12, 12, dtype=torch.bool)
    hidden[0, :6] = True
    hidden[1, 3:9, 3:9, 3:9] = True
    out = MAEFill(mae)(x, hidden)
    vis = ~hidden[:, None]
    assert torch.equal(out[vis], x.expand_as(out)[vis]) and not torch.equal(out[~vis], x.expand_as(out)[~vis])
    units = patch_units((12, 12, 12), 4)
    box = LinearBox(torch.randn(2, units.n_units), units.labels)
    lib = EvidenceLibrary(features=np.ones((2, 24)), maps=np.ones((2, 8)), case_ids=["a", "b"],
                          labels=["glioma", "glioma"], patch=8, grid=(2, 2, 2))
    att = get_explainer("medlime")(box, patch=4, n_samples=24, mae=mae, stta_steps=0, evidence=lib).attribute(x)
    assert att.extras["evidence"]["mode"] == "off" and "do not match" in att.extras["evidence"]["reason"]

"""Findings, counterfactual check and drafted report, end to end on a brain with a known bright spot.

The image is the MNI152 template moved by a known affine onto an oblique grid, with a bright spot in
the left middle frontal gyrus; a hand-built model calls voxels brighter than normal tissue a
"lesion". So the right answers are known: the explanation region lies in the left middle frontal
gyrus, and in-filling it with healthy tissue removes the lesion call.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from torch import nn

from xai_core.counterfactual import InFiller, TemplateInFiller, counterfactual, grow_region
from xai_core.findings import SCHEMA_VERSION, Findings, build_findings, findings_json_schema
from xai_core.io import Image, write_image
from xai_core.mni import load_harvard_oxford, load_template
from xai_core.models import LesionModel, ModelCard
from xai_core.models.brain_lesion_net import LesionOutput
from xai_core.pipeline import explain
from xai_core.registration import register_to_mni
from xai_core.report import ReportGuard, draft_report, render_report, template_impression

STRUCTURE = "Left_Middle_Frontal_Gyrus"


class BrightSpotLesionNet(nn.Module):
    """Hand-built: the 'lesion' logit is 10 times the sum of ReLU(x - 1.3) over the grid minus 2 (x is
    the normalised intensity; normal tissue stays below 1.3), so only the bright spot makes a lesion."""

    default_cam_layer = "encoder_out"

    def __init__(self):
        super().__init__()
        conv = nn.Conv3d(1, 1, kernel_size=1)
        with torch.no_grad():
            conv.weight.fill_(1.0)
            conv.bias.fill_(-1.3)
        self.encoder_out = nn.Sequential(conv, nn.ReLU())

    def forward(self, x: torch.Tensor) -> LesionOutput:
        score = self.encoder_out(x).sum(dim=(2, 3, 4)) * 10.0 - 2.0
        return LesionOutput(torch.cat([-score, score], dim=1), torch.cat([-(x - 1.3), x - 1.3], dim=1))


def _model() -> LesionModel:
    card = ModelCard(name="bright-spot-lesion", version="test", classes=["none", "lesion"], grid_size=48,
                     grid_spacing_mm=4.0, cam_layer="encoder_out", weights_sha256="0" * 64)
    return LesionModel(card, BrightSpotLesionNet(), torch.device("cpu"))


def _spot_image() -> tuple[Image, np.ndarray]:
    """Moved template with a bright spot deep in STRUCTURE; returns the image and the spot's LPS mm."""
    tpl, atlas = load_template(), load_harvard_oxford()
    inside = atlas.labels == atlas.names.index(STRUCTURE) + 1
    deepest = np.unravel_index(int(np.argmax(ndimage.distance_transform_edt(inside))), inside.shape)
    spot_mni = np.array(tpl.TransformIndexToPhysicalPoint([int(v) for v in deepest[::-1]]))
    centre = np.array(tpl.TransformContinuousIndexToPhysicalPoint([90.0, 108.0, 80.0]))
    a = sitk.AffineTransform(3)  # input point -> template point
    a.SetCenter(centre.tolist())
    c, s = np.cos(np.deg2rad(6)), np.sin(np.deg2rad(6))
    a.SetMatrix((np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) * 1.03).ravel().tolist())
    a.SetTranslation([-4.0, 5.0, 2.0])
    d = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    spacing, size = np.array([1.8, 1.8, 2.4]), np.array([105, 125, 85])
    ref = sitk.Image(size.tolist(), sitk.sitkFloat32)
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection(d.ravel().tolist())
    ref.SetOrigin((centre - d @ (spacing * (size - 1) / 2)).tolist())
    img = Image.from_sitk(sitk.Resample(tpl, ref, a, sitk.sitkLinear, 0.0))
    spot = np.array(a.GetInverse().TransformPoint(spot_mni.tolist()))
    kji = np.indices(img.array.shape).reshape(3, -1)[::-1].T  # (i, j, k) per voxel
    xyz = img.index_to_physical(kji.astype(float)).reshape(*img.array.shape, 3)
    bright = float(np.percentile(img.array[img.array > 0], 99.5))
    blob = bright * np.exp(-np.sum((xyz - spot) ** 2, axis=-1) / (2 * 4.0**2))
    return img.with_array((img.array + blob).astype(np.float32)), spot


@pytest.fixture(scope="module")
def spot_case():
    image, spot = _spot_image()
    # A source path full of identifiers: none of it may reach the findings.
    image = Image(image.array, image.spacing, image.origin, image.direction,
                  source="/data/patients/DOE^JOHN_19650412/1.2.840.113619.2.55/t1.nii.gz")
    model = _model()
    reg = register_to_mni(image)
    exp = explain(image, "gradcam++", model=model)
    findings = build_findings(exp, model=model, registration=reg)
    return image, spot, model, reg, exp, findings


# ---------------------------------------------------------------------------------------- findings

def test_findings_validate_against_their_json_schema(spot_case):
    jsonschema = pytest.importorskip("jsonschema")
    *_, findings = spot_case
    schema = findings_json_schema()
    assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(json.loads(json.dumps(findings))), key=str)
    assert not errors, [e.message for e in errors]
    Findings.model_validate(findings)
    # The schema has teeth: an unknown hemisphere or an extra field is refused.
    broken = json.loads(json.dumps(findings))
    broken["location"]["hemisphere"] = "up"
    broken["patient_name"] = "DOE^JOHN"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_findings_locate_the_spot_and_carry_no_identifiers(spot_case):
    *_, exp, findings = spot_case
    assert findings["prediction"]["label"] == "lesion"
    assert findings["prediction"]["calibration"] and "lesion" in findings["prediction"]["probabilities"]
    loc = findings["location"]
    assert loc["top_structure"] == STRUCTURE and loc["hemisphere"] == "left"
    assert next(iter(loc["lobes"])) == "frontal"
    assert loc["coordinates"] == "MNI152 RAS mm" and loc["centroid_mni_ras_mm"][0] < 0  # left is -x in RAS
    assert findings["registration"]["likely_failed"] is False
    assert findings["mask"]["empty"] is False and findings["explanation"]["method"] == "gradcam++"
    codes = {q["code"] for q in findings["quality_flags"]}
    assert not codes & {"registration_failed", "empty_mask", "flat_map", "weak_counterfactual"}
    text = json.dumps(findings)
    for leak in ("DOE", "JOHN", "19650412", "1.2.840", "patients", "t1.nii"):
        assert leak not in text


def test_counterfactual_removes_the_lesion_call_and_a_healthy_region_changes_nothing(spot_case):
    image, spot, model, reg, exp, findings = spot_case
    cf = findings["counterfactual"]
    assert cf["status"] == "done" and cf["label_before"] == "lesion" and cf["label_after"] == "none"
    assert cf["change"] < -0.5
    assert cf["sentence"].startswith("Without this region the prediction would change from lesion")
    # The same region moved 60 mm across the midline (no spot there): the prediction stays.
    region = exp.mask.mask
    shift = int(round(60.0 / image.spacing[0]))
    moved = np.zeros_like(region)
    moved[:, :, :-shift] = region[:, :, shift:]
    assert moved.sum() > 0.9 * region.sum() and not (moved & region).any()
    control = counterfactual(image, moved, model, TemplateInFiller(reg), prediction=exp.prediction)
    assert control.label_after == "lesion" and abs(control.change) < 0.02
    assert isinstance(TemplateInFiller(reg), InFiller)


def test_the_template_infill_matches_the_surrounding_intensities(spot_case):
    image, spot, model, reg, exp, _ = spot_case
    filled = TemplateInFiller(reg).fill(image, exp.mask.mask)
    k, j, i = np.round(image.physical_to_index(spot)[::-1]).astype(int)
    before, after, orig = image.array[k, j, i], filled.array[k, j, i], image.array
    brain_median = float(np.median(orig[orig > 0.1 * orig.max()]))
    assert before > 1.5 * brain_median and after < 1.3 * brain_median  # the spot is gone, tissue is back
    # Grown 3 mm, blended with sigma 2 mm, cut below 1 %: nothing changes 12 mm away from the region.
    far = ~grow_region(exp.mask.mask, tuple(image.spacing[::-1]), 12.0)
    assert np.array_equal(filled.array[far], image.array[far])  # nothing changes away from the region


@pytest.mark.skipif(
    not (__import__("xai_core.settings").settings.get_settings().weights_dir / "brain-lesion-3d.pt").exists(),
    reason="the shipped brain-lesion-3d weights (xai_core/models/weights/brain-lesion-3d.pt) are not there yet")
@pytest.mark.parametrize("label", ["glioma", "meningioma"])
def test_counterfactual_with_the_trained_model(label):
    """On a held-out study, in-filling the lesion lowers the lesion class's probability; in-filling
    the same region mirrored to the other hemisphere (lesion-free) barely moves it."""
    from xai_core.data.brain import make_study
    from xai_core.models import load
    from xai_core.registration import warp_to_mni
    from xai_core.settings import get_settings

    model = load("brain-lesion-3d", device="cpu", weights_dir=get_settings().weights_dir)
    image, mask, info = make_study(5151, 1, label=label)
    reg = register_to_mni(image)
    region = mask.array > 0
    # Mirror across the MNI midline: to MNI, reflect about x = 0 (column i_mid of the template's i axis,
    # which is LPS x), back to the input grid.
    mni = warp_to_mni(mask, reg, interpolator="nearest")
    tpl = load_template()
    i_mid = int(round(tpl.TransformPhysicalPointToContinuousIndex([0.0, 0.0, 0.0])[0]))
    reflected = np.zeros_like(mni)
    reflected[:, :, : 2 * i_mid + 1] = mni[:, :, 2 * i_mid::-1]
    flipped = sitk.GetImageFromArray(reflected.astype(np.uint8))
    flipped.CopyInformation(tpl)
    mirrored = sitk.GetArrayFromImage(sitk.Resample(flipped, image.reference(), reg.inverse(),
                                                    sitk.sitkNearestNeighbor, 0)) > 0
    assert mirrored.sum() > 0.5 * region.sum()
    assert not (mirrored & ndimage.binary_dilation(region, iterations=3)).any()
    pred = model.predict(image)
    lesion = counterfactual(image, region, model, TemplateInFiller(reg), prediction=pred)
    control = counterfactual(image, mirrored, model, TemplateInFiller(reg), prediction=pred)
    drop = lesion.probabilities_before[label] - lesion.probabilities_after[label]
    moved = abs(control.probabilities_before[label] - control.probabilities_after[label])
    assert drop > 0.2, lesion.sentence
    assert lesion.lesion_probability_after < lesion.lesion_probability_before
    assert moved < 0.05 and moved < drop / 4, control.sentence


# ------------------------------------------------------------------------------------------ report

def test_report_has_its_sections_and_is_deterministic(spot_case):
    *_, findings = spot_case
    md = render_report(findings)
    assert md == render_report(findings)
    for section in ("## Findings", "## Impression", "## How this was explained"):
        assert section in md
    assert "left middle frontal gyrus" in md and "Faithfulness" in md and "would change from lesion" in md
    guard = ReportGuard(findings)
    for sentence in template_impression(findings):
        assert guard.check(sentence) == [], sentence


def test_guard_rejects_absent_structures_sides_and_numbers(spot_case):
    *_, findings = spot_case
    guard = ReportGuard(findings)
    p = findings["prediction"]["probabilities"]["lesion"]
    assert guard.check(f"The model predicts a lesion with probability {p:.2f}.") == []
    assert guard.check("The region lies in the left middle frontal gyrus, in the frontal lobe.") == []

    absent = guard.check("The lesion involves the left hippocampus.")
    assert any("structure" in r and "hippocampus" in r for r in absent)
    assert any("anatomy" in r and "cerebellum" in r for r in guard.check("It extends into the cerebellum."))
    assert any("structure" in r for r in guard.check("It reaches the left superior temporal gyrus."))
    side = guard.check("The region lies in the right frontal lobe.")
    assert side and all("side" in r for r in side)
    assert any("side" in r for r in guard.check("The changes are bilateral."))
    assert 123.4 not in guard.numbers
    assert any("number" in r and "123.4" in r for r in guard.check("The region measures 123.4 mL."))
    absent_pct = next(n for n in range(37, 100) if all(round(100 * v) != n for v in guard.numbers))
    assert any("number" in r for r in guard.check(f"The lesion probability is {absent_pct} %."))
    # A structure that exists in the findings, but on the other side, is absent too.
    assert any("right middle frontal gyrus" in r for r in guard.check("It lies in the right middle frontal gyrus."))


def _tiny_causal_lm(folder) -> None:
    """A 1-layer GPT-2 with random weights over a word-level tokenizer trained here, offline; its
    vocabulary is three words the findings do not support, and it has no end-of-text token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["right hippocampus 97", "hippocampus 97 right"],
                            trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(fast), n_layer=1, n_embd=32, n_head=2, n_positions=96,
                     bos_token_id=None, eos_token_id=None, pad_token_id=fast.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)


def test_a_tiny_random_language_model_triggers_the_fallback(spot_case, tmp_path):
    *_, findings = spot_case
    _tiny_causal_lm(tmp_path / "tiny-lm")
    draft = draft_report(findings, llm_dir=tmp_path / "tiny-lm", max_new_tokens=12)
    assert draft.llm["generated"].strip()  # it did write something
    assert draft.backend == "template" and draft.impression == template_impression(findings)
    assert draft.llm["fallback_reason"] and draft.llm["rejected"]
    reasons = " ".join(r for rej in draft.llm["rejected"] for r in rej["reasons"])
    assert any(w in reasons for w in ("hippocampus", "'right'", "'97'"))
    assert "was not used" in draft.markdown and "rejected:" in draft.markdown


def test_an_llm_draft_that_passes_the_guard_is_used(spot_case, tmp_path, monkeypatch):
    import xai_core.report as report

    *_, findings = spot_case
    p = findings["prediction"]["probabilities"]["lesion"]
    text = (f"The model calls a lesion with probability {p:.2f}. It sits in the left middle frontal gyrus.\n"
            "In-filling the region removes the finding.")
    monkeypatch.setattr(report, "_generate", lambda folder, prompt, n: text)
    (tmp_path / "any-model").mkdir()
    draft = draft_report(findings, llm_dir=tmp_path / "any-model")
    assert draft.backend == "llm" and draft.llm["rejected"] == [] and draft.llm["fallback_reason"] is None
    assert draft.impression[1] == "It sits in the left middle frontal gyrus."
    assert "passed the guard" in draft.markdown


def test_cli_explain_report_writes_findings_and_report(spot_case, tmp_path, monkeypatch):
    import xai_core.models
    import xai_core.pipeline
    from xai_core.cli import main

    image, _, model, *_ = spot_case
    monkeypatch.setattr(xai_core.pipeline, "load_model", lambda name: model)
    monkeypatch.setattr(xai_core.models, "load", lambda name, **kw: model)
    path = write_image(image, tmp_path / "in.nii.gz")
    assert main(["explain", str(path), "--out", str(tmp_path / "out"), "--report"]) == 0
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert Findings.model_validate(findings).location.top_structure == STRUCTURE
    assert "## Impression" in (tmp_path / "out" / "report.md").read_text()


def test_a_model_folder_that_cannot_load_falls_back_and_a_missing_one_is_an_error(spot_case, tmp_path):
    *_, findings = spot_case
    broken = tmp_path / "broken-lm"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    draft = draft_report(findings, llm_dir=broken)
    assert draft.backend == "template" and draft.llm["fallback_reason"].startswith("the model failed")
    with pytest.raises(FileNotFoundError):
        draft_report(findings, llm_dir=tmp_path / "no-such-model")

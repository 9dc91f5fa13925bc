"""Drafted report from findings: a deterministic template, optionally a local language model.

:func:`render_report` turns a findings dict (:func:`xai_core.findings.build_findings`) into Markdown
with three sections: **Findings** (prediction, region, location, table of structures),
**Impression** (two or three sentences) and **How this was explained** (method, faithfulness =
the counterfactual change, limits, quality flags). The template's output is a function of the
findings alone.

Optional LLM backend (``llm_dir``): any local causal language model that transformers can load
from a folder (``AutoModelForCausalLM`` / ``AutoTokenizer``, ``local_files_only=True``, nothing is
downloaded) drafts the Impression from a compact JSON of the findings. Every generated sentence
passes the :class:`ReportGuard`, which rejects a sentence that

* names an anatomical structure, lobe or anatomical term that the findings do not list,
* names a side (left, right, bilateral, both hemispheres) that the findings do not support, or
* contains a number that no value of the findings gives at the sentence's precision (a share
  may be written as a percentage).

If any sentence is rejected, or the model writes nothing usable, the whole Impression falls back
to the template's, and the report says so; :class:`ReportDraft` records every rejected sentence
with its reasons. The guard checks names, sides and numbers only: it cannot tell whether a
sentence that uses allowed words says something true (e.g. negations), so the draft stays a
draft for a person to check. Number words ("three") are not checked.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atlas import LOBES, readable_name
from .settings import Settings

__all__ = ["ReportGuard", "ReportDraft", "draft_report", "render_report", "template_impression", "write_report"]

_LOBE_PHRASE = {"frontal": "frontal lobe", "parietal": "parietal lobe", "temporal": "temporal lobe",
                "occipital": "occipital lobe", "insula": "insula", "limbic": "limbic lobe",
                "subcortical": "subcortical grey matter", "brainstem": "brainstem"}
# Words a lobe licenses in a sentence.
_LOBE_WORDS = {"frontal": {"frontal"}, "parietal": {"parietal"}, "temporal": {"temporal"},
               "occipital": {"occipital"}, "insula": {"insula", "insular"}, "limbic": {"limbic"},
               "subcortical": {"subcortical", "deep"}, "brainstem": {"brainstem"}}
# Words of structure names that name no place by themselves.
_GENERIC = {"gyrus", "cortex", "division", "anterior", "posterior", "superior", "inferior", "middle", "part", "pars",
            "lateral", "medial", "pole", "lobe", "lobule", "central", "left", "right", "grey", "matter", "deep"}
# Anatomical terms outside Harvard-Oxford's names that must not appear unless listed (never, here).
_EXTRA_ANATOMY = {"cerebellum", "cerebellar", "pons", "pontine", "medulla", "midbrain", "mesencephalon",
                  "callosum", "callosal", "hypothalamus", "pineal", "pituitary", "fornix", "claustrum",
                  "ventricular", "periventricular", "corona", "radiata", "capsule", "basal", "ganglia", "vermis",
                  "tectum", "tegmentum", "striatum", "cingulum", "uncus", "hippocampal", "thalamic", "lentiform",
                  "globus", "pallidus", "precuneus", "sylvian", "rolandic", "broca", "wernicke", "dura", "dural",
                  "falx", "tentorium", "sinus", "meninges", "skull", "calvarium", "orbit", "ventricles"}
_SUFFIXES = (" anterior division", " posterior division", " superior division", " inferior division",
             " temporooccipital part", " pars triangularis", " pars opercularis")
_SIDE_WORDS = {"left": "left", "right": "right", "bilateral": "bilateral", "bilaterally": "bilateral",
               "both hemispheres": "bilateral", "both sides": "bilateral"}
_NUMBER = re.compile(r"(?<![A-Za-z0-9_.])([-+\u2212]?\d+(?:\.\d+)?)(?!\.?\d)(?![A-Za-z])(?!-[A-Za-z])(\s*%)?")


def _base_names() -> list[str]:
    return sorted({readable_name(n) for n in LOBES}, key=len, reverse=True)


def _short(base: str) -> str:
    for suf in _SUFFIXES:
        if base.endswith(suf):
            return base[: -len(suf)]
    return base


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z][a-z'\-]*", text.lower())


def _numbers(obj: Any) -> list[float]:
    if isinstance(obj, bool) or obj is None:
        return []
    if isinstance(obj, int | float):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list | tuple):
        return [x for v in obj for x in _numbers(v)]
    return []


class ReportGuard:
    """Checks a sentence against a findings dict (rules in the module docstring).

    Allowed structures are those of ``location.structures`` and ``location.peak_structure``; allowed
    sides come from ``location.hemisphere`` (``bilateral`` allows left and right) and from the
    sides of the allowed structures when named in full (any "left" or "right" counts as a side, so
    "the right answer" is rejected too: the guard errs on the side of the template); allowed numbers
    are the values under ``prediction``, ``mask``, ``location``, ``counterfactual`` (without the
    in-filler's fit) and the registration's NCC and Dice (geometry, timings and versions excluded).
    """

    def __init__(self, findings: dict[str, Any]):
        loc = findings.get("location") or {}
        names = [s["name"] for s in loc.get("structures", [])]
        if loc.get("peak_structure"):
            names.append(loc["peak_structure"])
        self.full_names = sorted({readable_name(n) for n in names}, key=len, reverse=True)
        self.allowed_bases = {readable_name(n.removeprefix("Left_").removeprefix("Right_")) for n in names}
        self.allowed_bases |= {_short(b) for b in self.allowed_bases}
        lobes = set(loc.get("lobes", {})) | {LOBES.get(n.removeprefix("Left_").removeprefix("Right_"), "")
                                             for n in names}
        self.allowed_words = {w for b in self.allowed_bases for w in _words(b)}
        for lobe in lobes:
            self.allowed_words |= _LOBE_WORDS.get(lobe, set())
        all_bases = _base_names()
        self.all_bases = sorted(set(all_bases) | {_short(b) for b in all_bases}, key=len, reverse=True)
        vocab = {w for b in all_bases for w in _words(b)} | {w for ws in _LOBE_WORDS.values() for w in ws}
        self.anatomy = (vocab | _EXTRA_ANATOMY) - _GENERIC
        hemi = loc.get("hemisphere", "none")
        self.sides = {"left", "right", "bilateral"} if hemi == "bilateral" else ({hemi} if hemi in ("left", "right")
                                                                                  else set())
        cf = {k: v for k, v in (findings.get("counterfactual") or {}).items() if k != "infiller"}
        reg = {k: v for k, v in (findings.get("registration") or {}).items() if k in ("ncc", "dice")}
        self.numbers = _numbers([findings.get("prediction"), findings.get("mask"), loc, cf, reg])

    def _number_ok(self, text: str, percent: bool) -> bool:
        """A plain number must equal a findings value at its own precision; a percentage may also be
        a share (0..1) of the findings times 100."""
        value = float(text.replace("\u2212", "-"))
        decimals = len(text.split(".")[1]) if "." in text else 0
        candidates = self.numbers + ([v * 100 for v in self.numbers] if percent else [])
        return any(abs(round(v, decimals) - value) < 1e-9 for v in candidates)

    def check(self, sentence: str) -> list[str]:
        """Reasons to reject ``sentence`` (empty list: it passes)."""
        reasons: list[str] = []
        text = " " + re.sub(r"\s+", " ", sentence.lower().replace("_", " ")) + " "
        # Allowed structures named in full (with their side) are taken out first, so that their words
        # and sides do not count again below.
        for name in self.full_names:
            text = re.sub(rf"(?<![a-z]){re.escape(name)}(?![a-z])", " ", text)
        for base in self.all_bases:
            m = re.search(rf"(?<![a-z])((?:left|right) )?{re.escape(base)}(?![a-z])", text)
            if m and (base not in self.allowed_bases or m.group(1)):
                reasons.append(f"names a structure absent from the findings: '{m.group(0).strip()}'")
                text = text.replace(m.group(0), " ")
        for w in _words(text):
            if w in self.anatomy and w not in self.allowed_words:
                reasons.append(f"names anatomy absent from the findings: '{w}'")
        for phrase, side in _SIDE_WORDS.items():
            if re.search(rf"(?<![a-z]){phrase}(?![a-z])", text) and side not in self.sides:
                reasons.append(f"names a side absent from the findings: '{phrase}'")
        for m in _NUMBER.finditer(sentence):
            if not self._number_ok(m.group(1), bool(m.group(2))):
                reasons.append(f"states a number absent from the findings: '{m.group(0).strip()}'")
        return list(dict.fromkeys(reasons))


# ------------------------------------------------------------------------------------ template

def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _side_phrase(hemi: str) -> str:
    return {"left": "the left hemisphere", "right": "the right hemisphere", "bilateral": "both hemispheres"}[hemi]


def template_impression(f: dict[str, Any]) -> list[str]:
    """The template's Impression sentences for findings ``f`` (each passes :class:`ReportGuard`)."""
    p = f["prediction"]
    label, prob = p["label"], p["probabilities"][p["label"]]
    out = []
    if label == "none":
        out.append(f"The model finds no lesion (calibrated probability {prob:.2f}).")
    else:
        out.append(f"The model predicts {label} with a calibrated probability of {prob:.2f}.")
    loc, reg, mask = f.get("location"), f.get("registration"), f["mask"]
    region = "region that supports this" if label == "none" else "region the explanation highlights"
    if mask["empty"]:
        out.append("The explanation marks no region, so no location is given.")
    elif reg and reg["likely_failed"]:
        out.append("Registration to the brain atlas likely failed, so no anatomical location is given.")
    elif loc and loc["structures"]:
        top = loc["structures"][0]
        lobe = next(iter(loc["lobes"]))
        where = f"lies in {_side_phrase(loc['hemisphere'])}" if loc["hemisphere"] in ("left", "right", "bilateral") \
            else "lies"
        if loc["crosses_midline"] and loc["hemisphere"] in ("left", "right"):
            where += ", crossing the midline"
        out.append(f"The {region} ({mask['volume_ml']:.1f} mL) {where}, mostly in the {_LOBE_PHRASE[lobe]}, "
                   f"with the largest part in the {top['label']} ({_pct(top['fraction'])} of the region).")
    elif loc:
        out.append(f"The {region} lies outside the structures of the brain atlas.")
    cf = f["counterfactual"]
    if cf["status"] == "done":
        out.append(cf["sentence"])
    return out


def _findings_md(f: dict[str, Any]) -> list[str]:
    p, m, e = f["prediction"], f["mask"], f["explanation"]
    probs = ", ".join(f"{c} {v:.2f}" for c, v in sorted(p["probabilities"].items(), key=lambda kv: -kv[1]))
    lines = [f"- **Model prediction:** {p['label']} (calibrated probabilities: {probs}; "
             f"calibration: {p['calibration'] or 'none'}).",
             f"- **Model:** {f['model']['name']} version {f['model']['version']}."]
    if m["empty"]:
        lines.append(f"- **Explanation region:** empty ({m['reason']}).")
    else:
        lines.append(f"- **Explanation region** ({e['method']} map of {e['targets'][0]}, adaptive threshold): "
                     f"{m['volume_ml']:.1f} mL in {m['components']} component(s), "
                     f"{100 * m['fraction_of_brain']:.1f} % of the brain.")
    loc, reg = f.get("location"), f.get("registration")
    if reg:
        lines.append(f"- **Registration to MNI152:** {reg['kind']}, NCC {reg['ncc']}, brain Dice {reg['dice']}"
                     + (f" - **likely failed** ({reg['reason']})" if reg["likely_failed"] else "") + ".")
    if loc and loc["structures"] and reg and reg["likely_failed"]:
        lines.append("- **Location:** not reliable, the registration likely failed; the atlas labels below are "
                     "given for checking only.")
    if loc and loc["structures"]:
        lobes = ", ".join(f"{k} {_pct(v)}" for k, v in loc["lobes"].items())
        side = loc["hemisphere"] + (" (crosses the midline)" if loc["crosses_midline"] else "")
        lines.append(f"- **Side:** {side}; share on the left {_pct(loc['left_fraction'])}. **Lobes:** {lobes}.")
        c, pk = loc["centroid_mni_ras_mm"], loc["peak_mni_ras_mm"]
        where = f"- **MNI coordinates (RAS mm):** region centre ({c[0]:.0f}, {c[1]:.0f}, {c[2]:.0f})"
        if pk:
            at = f" in the {readable_name(loc['peak_structure'])}" if loc["peak_structure"] else ""
            where += f"; map peak ({pk[0]:.0f}, {pk[1]:.0f}, {pk[2]:.0f}){at}"
        lines.append(where + f". {_pct(loc['outside_atlas_fraction'])} of the region has no atlas label.")
        lines += ["", "| structure | lobe | volume (mL) | share of region | atlas probability | share of map |",
                  "|---|---|---:|---:|---:|---:|"]
        for s in loc["structures"]:
            share = "" if s["saliency_share"] is None else _pct(s["saliency_share"])
            lines.append(f"| {s['label']} | {s['lobe']} | {s['volume_ml']:.2f} | {_pct(s['fraction'])} | "
                         f"{s['mean_probability']:.2f} | {share} |")
    return lines


def _method_md(f: dict[str, Any], draft_note: list[str]) -> list[str]:
    e, cf = f["explanation"], f["counterfactual"]
    layer = e["params"].get("layer")
    lines = [f"- **Method:** {e['method']}" + (f" on layer `{layer}`" if layer else "")
             + f", explaining class {e['targets'][0]}; the region is the map's adaptive (Otsu) mask."]
    if cf["status"] == "done":
        fill = cf["infiller"].get("infiller", "in-filler")
        lines.append(f"- **Faithfulness (counterfactual):** the region, grown by "
                     f"{cf['infiller'].get('dilation_mm', 0):g} mm, was replaced by healthy tissue ({fill}) and the "
                     f"model asked again. {cf['sentence']} Change in the probability of {cf['label_before']}: "
                     f"{cf['change']:+.2f}.")
    else:
        lines.append(f"- **Faithfulness (counterfactual):** not measured ({cf['reason']}).")
    lines += [
        "- **Limits:** class-activation maps are computed on the model's coarse grid and blur at the scale of "
        "several millimetres; the region's outline depends on the threshold rule. Anatomy comes from an "
        f"{(f.get('registration') or {}).get('kind', 'affine')} registration to the MNI152 template and the "
        "Harvard-Oxford atlas, which does not cover white matter and is uncertain at structure borders (see "
        "atlas probability). The in-filled tissue comes from one template brain. The model is a research "
        "prototype trained on synthetic studies; this draft is not a diagnosis and must be checked by a "
        "radiologist."]
    if f["quality_flags"]:
        lines.append("- **Quality flags:** " + "; ".join(f"{q['code']} ({q['severity']}): {q['message']}"
                                                           for q in f["quality_flags"]) + ".")
    else:
        lines.append("- **Quality flags:** none.")
    lines += draft_note
    return lines


# ------------------------------------------------------------------------------------------ LLM

def _compact(f: dict[str, Any]) -> dict[str, Any]:
    """The facts an LLM drafts from: a small subset of the findings."""
    loc = f.get("location") or {}
    p = f["prediction"]
    return {"prediction": p["label"], "probability": round(p["probabilities"][p["label"]], 2),
            "hemisphere": loc.get("hemisphere"), "lobes": loc.get("lobes"),
            "structures": [{"name": s["label"], "share": round(s["fraction"], 2)}
                           for s in loc.get("structures", [])[:3]],
            "region_ml": f["mask"]["volume_ml"], "counterfactual": f["counterfactual"].get("sentence"),
            "registration_failed": bool((f.get("registration") or {}).get("likely_failed")),
            "flags": [q["code"] for q in f["quality_flags"]]}


def _split_sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [s.strip(" -*#\t") for s in parts if re.search(r"[A-Za-z0-9]", s or "")]


def _generate(llm_dir: Path, prompt: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llm_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(llm_dir), local_files_only=True).eval()
    if getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit:
        max_new_tokens = min(max_new_tokens, limit // 2)
        ids = ids[:, -(limit - max_new_tokens):]  # keep the end: the instruction's last words and the cue
    special = [i for i in tok.all_special_ids if i != tok.eos_token_id]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, suppress_tokens=special or None)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@dataclass
class ReportDraft:
    """A drafted report.

    Attributes:
        markdown: the report.
        backend: ``"template"`` or ``"llm"`` (the Impression's author).
        impression: the Impression's sentences.
        llm: with ``llm_dir``: the model folder's name, the generated text, ``rejected`` (each
            ``{"sentence", "reasons"}``) and ``fallback_reason`` (None when the draft was used).
    """

    markdown: str
    backend: str
    impression: list[str]
    llm: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_PROMPT = ("You draft the Impression of a neuroradiology report from an AI model's findings. Write two or three "
           "short sentences. Use only the facts in the JSON; name no structure, side or number that is not in it.\n"
           "Facts: {facts}\nImpression:")


def draft_report(findings: dict[str, Any], *, llm_dir: str | Path | None = None,
                 max_new_tokens: int | None = None, settings: Settings | None = None) -> ReportDraft:
    """Draft the report for ``findings`` (a dict from :func:`~xai_core.findings.build_findings`).

    With ``llm_dir`` a local causal LM drafts the Impression and the guard checks it (module
    docstring); otherwise, or on any rejection, the template writes it. ``max_new_tokens`` defaults
    to ``settings.report_llm_max_new_tokens`` (``settings`` default ``Settings()``).
    """
    impression, backend, llm = template_impression(findings), "template", None
    if llm_dir is not None:
        llm_dir = Path(llm_dir)
        if not llm_dir.is_dir():
            raise FileNotFoundError(f"language model folder {llm_dir} does not exist")
        n = max_new_tokens or (settings or Settings()).report_llm_max_new_tokens
        try:
            text, error = _generate(llm_dir, _PROMPT.format(facts=json.dumps(_compact(findings))), n), None
        except Exception as e:  # a model that cannot load or generate must not cost the report
            text, error = "", f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        guard = ReportGuard(findings)
        sentences = _split_sentences(text)
        rejected = [{"sentence": s, "reasons": r} for s in sentences if (r := guard.check(s))]
        reason = None
        if error:
            reason = f"the model failed: {error}"
        elif not sentences:
            reason = "the model wrote no sentence"
        elif rejected:
            reason = f"{len(rejected)} of {len(sentences)} generated sentence(s) failed the guard"
        llm = {"model": llm_dir.name, "generated": text, "rejected": rejected, "fallback_reason": reason}
        if reason is None:
            impression, backend = sentences, "llm"
    note = []
    if llm is not None:
        if backend == "llm":
            note = [f"- **Drafting:** the Impression was drafted by the local language model `{llm['model']}` and "
                    "every sentence passed the guard (structures, sides and numbers all appear in the findings)."]
        else:
            note = [f"- **Drafting:** the language model `{llm['model']}` draft was not used "
                    f"({llm['fallback_reason']}); the Impression is the template's."]
            note += [f"  - rejected: \"{r['sentence'][:200]}\" - {'; '.join(r['reasons'])}" for r in llm["rejected"]]
    md = ["# Draft report: AI model finding and its explanation", "",
          "*Generated automatically for research use; not a diagnosis.*", "",
          "## Findings", "", *_findings_md(findings), "",
          "## Impression", "", " ".join(impression), "",
          "## How this was explained", "", *_method_md(findings, note), ""]
    return ReportDraft(markdown="\n".join(md), backend=backend, impression=impression, llm=llm)


def render_report(findings: dict[str, Any], *, llm_dir: str | Path | None = None,
                  settings: Settings | None = None) -> str:
    """The report for ``findings`` as a Markdown string (see :func:`draft_report`)."""
    return draft_report(findings, llm_dir=llm_dir, settings=settings).markdown


def write_report(exp, out: str | Path, *, llm_dir: str | Path | None = None, model=None,
                 registration=None, settings: Settings | None = None) -> dict[str, Path]:
    """Build the findings of explanation ``exp`` and write ``findings.json`` and ``report.md`` into
    ``out`` (with ``llm_dir`` also ``report_llm.json``: the generated text and the guard's record).
    ``model``, ``registration`` and ``settings`` (default ``Settings()``) are passed to
    :func:`~xai_core.findings.build_findings`."""
    from .findings import build_findings

    cfg = settings or Settings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    findings = build_findings(exp, model=model, registration=registration, settings=cfg)
    files = {"findings": out / "findings.json", "report": out / "report.md"}
    files["findings"].write_text(json.dumps(findings, indent=2))
    draft = draft_report(findings, llm_dir=llm_dir, settings=cfg)
    files["report"].write_text(draft.markdown)
    if draft.llm is not None:
        files["report_llm"] = out / "report_llm.json"
        files["report_llm"].write_text(json.dumps(draft.llm, indent=2))
    return files

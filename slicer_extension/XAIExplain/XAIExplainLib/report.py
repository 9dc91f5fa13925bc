"""Text from an explanation reply: segment names, findings table, warnings, counterfactual, report.

Pure Python (no Qt). The reply is the server's ``ExplanationResult`` (``Resources/Schema/xai_result_schema.json``,
a copy of ``docs/result_schema.json``); with ``report: true`` it carries ``findings`` (atlas anatomy of
the explanation mask and of each saliency level, counterfactual, quality flags) and ``report``
(Markdown). Every field is read by its schema path through :mod:`.schema` (nothing else is looked
for): call :func:`check` (or :func:`.schema.require_reply`) on a reply first, and the functions here
may rely on the required fields being there.

Without findings (``report`` not requested) the segments are named by level percent only.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .schema import ReplyError, get, items, require_reply

__all__ = [
    "FINDINGS_COLUMNS",
    "answer_check",
    "answer_html",
    "answer_slice_line",
    "answer_summary_html",
    "answer_summary_text",
    "answer_text",
    "answer_title",
    "answer_tokens",
    "answer_top",
    "check",
    "counterfactual_sentence",
    "explanation_title",
    "findings_table",
    "findings_table_html",
    "label_params",
    "level_segment_names",
    "location_line",
    "markdown_html",
    "mask_segment_name",
    "quality_flags",
    "report_markdown",
    "structure_name",
    "summary_html",
    "summary_text",
]

FINDINGS_COLUMNS = ("Structure", "Lobe", "Side", "Volume (ml)", "Share of region", "Share of saliency")
MASK_SEGMENT = "Salient region"
LEVEL_SEGMENT = "Saliency top {percent} %"
_DASH = " – "


def check(result: Any) -> Mapping[str, Any]:
    """The reply, when it follows the schema in every field read here; else :class:`.schema.ReplyError`."""
    return require_reply(result, "explanation")


# --------------------------------------------------------------------------------- names

def _sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]


def structure_name(result: Mapping[str, Any], name: str) -> str:
    """Readable name of Harvard-Oxford structure ``name``: its ``label`` in the findings' structure
    list ("left insular cortex"), else the name with spaces, in lower case like the labels (a level's
    top structure need not be among the mask's structures); first letter capitalised."""
    for s in items(result, "findings.location.structures"):
        if get(s, "findings.location.structures[].name") == name:
            label = get(s, "findings.location.structures[].label")
            if label:
                return _sentence_case(str(label))
    return _sentence_case(" ".join(str(name).replace("_", " ").split()).lower())


def _fmt_pct(p: float) -> str:
    return f"{float(p):g}"


def level_segment_names(result: Mapping[str, Any], n_levels: int) -> list[str]:
    """Segment names of saliency levels 1..n (1 = widest): "Saliency top 20 %" ... "Saliency top 1 %",
    each followed by the structure holding most of that level when the findings name one
    ("Saliency top 5 % – Left insular cortex")."""
    percents = get(result, "mask.levels_percent", [])
    if n_levels > len(percents):
        raise ReplyError([f"the levels file has {n_levels} levels but mask.levels_percent lists {len(percents)}"])
    top = {get(e, "findings.levels[].level"): get(e, "findings.levels[].top_structure")
           for e in items(result, "findings.levels")}
    names = []
    for n in range(1, n_levels + 1):
        name = LEVEL_SEGMENT.format(percent=_fmt_pct(percents[n - 1]))
        if top.get(n):
            name += _DASH + structure_name(result, top[n])
        names.append(name)
    return names


def mask_segment_name(result: Mapping[str, Any]) -> str:
    """"Salient region – Left central opercular cortex" (the structure holding most of the explanation
    mask, from the findings), else "Salient region (3.2 % of brain)" or "Salient region (empty)"."""
    top = get(result, "findings.location.top_structure")
    if top:
        return MASK_SEGMENT + _DASH + structure_name(result, top)
    if get(result, "mask.empty"):
        return f"{MASK_SEGMENT} (empty)"
    return f"{MASK_SEGMENT} ({100 * get(result, 'mask.fraction_of_brain', 0.0):.2g} % of brain)"


def explanation_title(result: Mapping[str, Any]) -> str:
    """Node name stem: "XAI Grad-CAM++ (glioma)"."""
    method = get(result, "method_title") or get(result, "method") or "explanation"
    targets = get(result, "targets", [])
    return f"XAI {method}" + (f" ({targets[0]})" if targets else "")


# --------------------------------------------------------------------------------- findings

def findings_table(result: Mapping[str, Any]) -> tuple[tuple[str, ...], list[list[str]]]:
    """:data:`FINDINGS_COLUMNS` and one row per structure of the explanation mask (largest share first,
    as the findings list them); no rows without findings."""
    rows = []
    for s in items(result, "findings.location.structures"):
        share = get(s, "findings.location.structures[].saliency_share")
        rows.append([
            structure_name(result, get(s, "findings.location.structures[].name", "")),
            str(get(s, "findings.location.structures[].lobe", "")),
            str(get(s, "findings.location.structures[].hemisphere", "")),
            f"{get(s, 'findings.location.structures[].volume_ml', 0.0):.2f}",
            f"{100 * get(s, 'findings.location.structures[].fraction', 0.0):.1f} %",
            "" if share is None else f"{100 * share:.1f} %",
        ])
    return FINDINGS_COLUMNS, rows


def quality_flags(result: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(severity, code, message)`` of every quality flag of the findings (errors first), and the
    server's out-of-distribution verdict when the reply has no findings to carry it."""
    order = {"error": 0, "warning": 1, "info": 2}
    flags = [(str(get(q, "findings.quality_flags[].severity", "info")),
              str(get(q, "findings.quality_flags[].code", "")),
              str(get(q, "findings.quality_flags[].message", "")))
             for q in items(result, "findings.quality_flags")]
    if get(result, "ood.flagged") and not any(code == OOD_CODE for _, code, _ in flags):
        reasons = "; ".join(str(r) for r in (get(result, "ood.reasons") or [])) or "unlike the model's studies"
        flags.append(("error", OOD_CODE, f"the input is not what the model was made for ({reasons}): its class "
                                         "and this explanation are not to be trusted"))
    return sorted(flags, key=lambda f: order.get(f[0], 3))


OOD_CODE = "out_of_distribution"


def counterfactual_sentence(result: Mapping[str, Any]) -> str | None:
    """The findings' counterfactual sentence (what in-filling the region did to the prediction)."""
    sentence = get(result, "findings.counterfactual.sentence")
    return str(sentence) if sentence else None


def location_line(result: Mapping[str, Any]) -> str | None:
    """"Location: left hemisphere, mostly Left supramarginal gyrus posterior division"."""
    if get(result, "findings.location") is None:
        return None
    side = get(result, "findings.location.hemisphere", "none")
    top = get(result, "findings.location.top_structure")
    where = f"mostly {structure_name(result, top)}" if top else "outside every atlas structure"
    return f"Location: {'no side' if side == 'none' else f'{side} hemisphere'}, {where}"


def evidence_line(result: Mapping[str, Any], most: int = 5) -> str | None:
    """MedLIME's similar past cases: "Evidence: 3 similar cases: s12 (glioma, weight 0.41), ..."."""
    if get(result, "saliency.evidence") is None:
        return None
    cases = items(result, "saliency.evidence.cases")
    mode = str(get(result, "saliency.evidence.mode", "off"))
    if not cases:
        return f"Evidence: none used ({get(result, 'saliency.evidence.reason') or mode})"
    kind = "random cases (ablation)" if mode == "random" else "similar cases"
    shown = ", ".join(f"{get(c, 'saliency.evidence.cases[].case', '?')} "
                      f"({get(c, 'saliency.evidence.cases[].label', '?')}, "
                      f"weight {float(get(c, 'saliency.evidence.cases[].weight', 0.0)):.2f})" for c in cases[:most])
    return f"Evidence: {len(cases)} {kind}: {shown}" + (", ..." if len(cases) > most else "")


def report_markdown(result: Mapping[str, Any]) -> str | None:
    """The drafted report (Markdown), when the reply carries one."""
    rep = get(result, "report")
    return str(rep) if rep else None


# --------------------------------------------------------------------------------- summaries

def _probabilities(result: Mapping[str, Any]) -> list[tuple[str, float]]:
    probs = get(result, "prediction.probabilities", {})
    return sorted(((str(k), float(v)) for k, v in probs.items()), key=lambda kv: -kv[1])


def _mask_line(result: Mapping[str, Any]) -> str:
    if get(result, "mask.empty"):
        return f"Saliency mask: empty ({get(result, 'mask.reason') or 'no reason given'})"
    return (f"Saliency mask: {get(result, 'mask.volume_ml', 0.0):.3g} ml, "
            f"{100 * get(result, 'mask.fraction_of_brain', 0.0):.2g} % of brain, "
            f"{get(result, 'mask.components', 0)} component(s)")


def _method_line(result: Mapping[str, Any]) -> str:
    targets = get(result, "targets", [])
    method = get(result, "method_title") or get(result, "method")
    return f"Method: {method}" + (f" (target: {', '.join(map(str, targets))})" if targets else "")


def summary_text(result: Mapping[str, Any]) -> str:
    """Plain text: method, prediction, probabilities, mask, location, quality flags, counterfactual,
    findings table, report, model."""
    label = get(result, "prediction.label")
    probs = dict(_probabilities(result))
    lines = [_method_line(result),
             f"Prediction: {label}" + (f" (p = {probs[label]:.3f})" if label in probs else ""),
             "Probabilities:", *[f"  {k:<24} {v:.3f}" for k, v in _probabilities(result)], _mask_line(result)]
    loc = location_line(result)
    if loc:
        lines.append(loc)
    lines += [f"{sev.capitalize()}: {msg}" for sev, _, msg in quality_flags(result)]
    ev = evidence_line(result)
    if ev:
        lines.append(ev)
    cf = counterfactual_sentence(result)
    if cf:
        lines.append(f"Counterfactual: {cf}")
    cols, rows = findings_table(result)
    if rows:
        lines += ["Findings:", "  " + " | ".join(cols), *["  " + " | ".join(r) for r in rows]]
    rep = report_markdown(result)
    if rep:
        lines += ["Report:", rep.rstrip()]
    lines.append(f"Model: {get(result, 'model.name', '?')} {get(result, 'model.version', '')}".rstrip())
    return "\n".join(lines)


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


_FLAG_COLOUR = {"error": "#c0392b", "warning": "#d35400", "info": "#555555"}


def findings_table_html(result: Mapping[str, Any]) -> str:
    cols, rows = findings_table(result)
    if not rows:
        return ""
    return ("<table border='1' cellspacing='0' cellpadding='2'><tr>" + "".join(f"<th>{_e(c)}</th>" for c in cols)
            + "</tr>" + "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r in rows)
            + "</table>")


def summary_html(result: Mapping[str, Any]) -> str:
    """The summary as HTML (Qt's rich-text subset: tables, bold, colour; no scripts, no CSS files).
    Server text is escaped everywhere; the report's Markdown goes through :func:`markdown_html`."""
    label = get(result, "prediction.label")
    probs = _probabilities(result)
    p = dict(probs).get(label)
    out = [f"<p><b>Prediction: {_e(label)}</b>" + (f" (p = {p:.3f})" if p is not None else "") + "</p>",
           f"<p>{_e(_method_line(result))}</p>",
           "<table cellspacing='2'><tr><th align='left'>class</th><th align='right'>p</th><th></th></tr>"]
    for k, v in probs:
        bar = "&#9608;" * max(0, round(20 * v))  # a text bar: renders in any Qt text widget
        out.append(f"<tr><td>{_e(k)}</td><td align='right'>{v:.3f}</td><td>{bar}</td></tr>")
    out.append("</table>")
    out.append(f"<p>{_e(_mask_line(result))}</p>")
    loc = location_line(result)
    if loc:
        out.append(f"<p>{_e(loc)}</p>")
    for sev, code, msg in quality_flags(result):
        out.append(f"<p style='color:{_FLAG_COLOUR.get(sev, '#555555')}'><b>{_e(sev.capitalize())}</b> "
                   f"({_e(code)}): {_e(msg)}</p>")
    ev = evidence_line(result)
    if ev:
        out.append(f"<p>{_e(ev)}</p>")
    cf = counterfactual_sentence(result)
    if cf:
        out.append(f"<p><b>Counterfactual:</b> {_e(cf)}</p>")
    table = findings_table_html(result)
    if table:
        out += ["<p><b>Findings</b></p>", table]
    rep = report_markdown(result)
    if rep:
        out.append(markdown_html(rep))
    elif get(result, "findings") is None:
        out.append("<p><i>No findings or report: the explanation was run without the report option.</i></p>")
    out.append(f"<p><small>Model: {_e(get(result, 'model.name', '?'))} {_e(get(result, 'model.version', ''))}"
               "</small></p>")
    return "\n".join(out)


# --------------------------------------------------------------------------------- Markdown

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<![*\w])\*(?!\s)(.+?)(?<!\s)\*(?![*\w])")
_CODE = re.compile(r"`([^`]+)`")
_TABLE_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")


def _inline(text: str) -> str:
    out = _e(text)
    out = _CODE.sub(r"<code>\1</code>", out)
    out = _BOLD.sub(r"<b>\1</b>", out)
    return _ITALIC.sub(r"<i>\1</i>", out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_html(md: str) -> str:
    """The report's Markdown as Qt rich text: headings, paragraphs, ``-``/``*`` lists, pipe tables,
    ``**bold**``, ``*italic*`` and ```code```. Everything else stays text (escaped: the server's text
    never becomes markup)."""
    out: list[str] = []
    para: list[str] = []
    lines = md.splitlines()
    i = 0

    def flush() -> None:
        if para:
            out.append("<p>" + " ".join(_inline(x) for x in para) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i].rstrip()
        stripped = line.strip()
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if not stripped:
            flush()
        elif heading:
            flush()
            level = min(len(heading.group(1)) + 2, 6)  # h3..h6: the panel is narrow
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif re.match(r"^[-*]\s+", stripped):
            flush()
            out.append("<ul>")
            while i < len(lines) and re.match(r"^\s*[-*]\s+", lines[i]):
                out.append("<li>" + _inline(re.sub(r"^\s*[-*]\s+", "", lines[i]).strip()) + "</li>")
                i += 1
            out.append("</ul>")
            continue
        elif stripped.startswith("|") and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1].strip()):
            flush()
            out.append("<table border='1' cellspacing='0' cellpadding='2'><tr>"
                       + "".join(f"<th>{_inline(c)}</th>" for c in _cells(stripped)) + "</tr>")
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                out.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(lines[i])) + "</tr>")
                i += 1
            out.append("</table>")
            continue
        else:
            para.append(stripped)
        i += 1
    flush()
    return "\n".join(out)


# --------------------------------------------------------------------------------- questions (vqa)
#
# The ``vqa`` task's reply is the schema's ``vqa`` reply type (``VQAAnswer``); every field read here is
# in ``schema.READS["vqa"]`` and read through :func:`.schema.get` / :func:`.schema.items`, as for
# explanations.

#: Tokenizer markers: shown with their scores, never picked as the strongest question words.
SPECIAL_TOKENS = frozenset({"[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"})
#: A token counts as one of the strongest when its |score| is at least this share of the largest.
STRONG_SHARE = 0.5
_METHOD_TITLES = {"relig": "RE-LIG", "ig": "integrated gradients", "none": "none"}


def answer_check(result: Any) -> Mapping[str, Any]:
    """The ``vqa`` reply when every field of ``schema.READS["vqa"]`` follows the bundled schema's ``vqa``
    reply (required ones present; present ones of the schema's type and enum); else :class:`ReplyError`
    listing every problem. A module whose schema copy has no ``vqa`` reply says so."""
    return require_reply(result, "vqa")


def answer_text(result: Mapping[str, Any]) -> str:
    """The answer in one line: "yes (confidence 0.83)"; lenient (no schema check): also for a reply
    that failed :func:`answer_check`, so that the user still reads what the server said."""
    ans = get(result, "answer")
    if not isinstance(ans, str) or not ans:
        return "The server gave no answer."
    conf = get(result, "confidence")
    return ans + (f" (confidence {conf:.2f})" if isinstance(conf, int | float) else "")


def answer_html(result: Mapping[str, Any]) -> str:
    return f"<p>{_e(answer_text(result))}</p>"


def answer_title(result: Mapping[str, Any], most: int = 40) -> str:
    """Node name of an answer's heatmap: "XAI answer RE-LIG: Is there a lesion?" (question cut at ``most``)."""
    question = str(get(result, "question", ""))
    short = question if len(question) <= most else question[:most - 1].rstrip() + "…"
    return f"XAI answer {_answer_method(result)}: {short}"


def answer_top(result: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The server's most probable answers with their probabilities, most probable first."""
    return [(str(get(t, "top[].answer", "")), float(get(t, "top[].probability", 0.0)))
            for t in items(result, "top")]


def answer_tokens(result: Mapping[str, Any]) -> list[tuple[str, float, bool]]:
    """``(token, score, strongest)`` for each question token, in the question's order.

    ``strongest`` marks the tokens whose |score| is at least :data:`STRONG_SHARE` of the largest
    |score| among the question's words (tokenizer markers such as ``[CLS]`` are listed but never
    marked). Empty when the method did not attribute the question (``ig``, ``none``)."""
    toks = [(str(get(t, "tokens[].token", "")), float(get(t, "tokens[].score", 0.0)))
            for t in items(result, "tokens")]
    top = max((abs(s) for t, s in toks if t not in SPECIAL_TOKENS), default=0.0)
    return [(t, s, top > 0 and t not in SPECIAL_TOKENS and abs(s) >= STRONG_SHARE * top) for t, s in toks]


def _answer_method(result: Mapping[str, Any]) -> str:
    method = get(result, "method", "none")
    return str(get(result, "method_title") or _METHOD_TITLES.get(method, method))


def answer_slice_line(result: Mapping[str, Any]) -> str:
    """"Slice: axial at S = 12.5 mm (LPS), 1.0 mm thick": the slice the server answered about."""
    plane = get(result, "slice.plane", "?")
    axis = get(result, "slice.axis", "?")
    pos = get(result, "slice.position_mm")
    thick = get(result, "slice.thickness_mm")
    where = f" at {axis} = {float(pos):.1f} mm (LPS)" if isinstance(pos, int | float) else ""
    return f"Slice: {plane}{where}" + (f", {float(thick):.2g} mm thick" if isinstance(thick, int | float) else "")


def _answer_heatmap_line(result: Mapping[str, Any]) -> str:
    if get(result, "method") == "none":
        return "Heatmap: none (method none: the answer only)"
    if get(result, "saliency.flat"):
        return f"Heatmap: {_answer_method(result)} gave a flat map (all zeros): no part of the slice stands out"
    return f"Heatmap: {_answer_method(result)} relevance on the slice asked about"


def _answer_tokens_note(result: Mapping[str, Any]) -> str:
    return (f"the question was not attributed ({_answer_method(result)} explains the image only)"
            if get(result, "method") != "none" else "the question was not attributed (method none)")


def _answer_model_line(result: Mapping[str, Any]) -> str:
    return f"Model: {get(result, 'model.name', '?')} {get(result, 'model.version', '')}".rstrip()


def answer_summary_text(result: Mapping[str, Any]) -> str:
    """Plain text of a ``vqa`` reply: answer and confidence, question, slice, the top answers, the
    question's token attributions (strongest in ``**``), heatmap, model."""
    lines = [f"Answer: {answer_text(result)}",
             f"Question: {get(result, 'question', '')}", answer_slice_line(result)]
    top = answer_top(result)
    if top:
        lines += ["Top answers:", *[f"  {a:<24} {p:.3f}" for a, p in top]]
    toks = answer_tokens(result)
    if toks:
        lines.append(f"Question tokens ({_answer_method(result)}; + towards the answer, - away; ** strongest):")
        lines.append("  " + " ".join((f"**{t}**" if strong else t) + f" {s:+.3g}" for t, s, strong in toks))
    else:
        lines.append(f"Question tokens: {_answer_tokens_note(result)}")
    lines += [_answer_heatmap_line(result), _answer_model_line(result)]
    return "\n".join(lines)


def _token_colour(score: float, top: float) -> str:
    """Background of a token: red for scores towards the answer, blue away, deeper for stronger."""
    share = min(abs(score) / top, 1.0) if top > 0 else 0.0
    fade = round(255 - 160 * share)
    return f"#ff{fade:02x}{fade:02x}" if score >= 0 else f"#{fade:02x}{fade:02x}ff"


def answer_summary_html(result: Mapping[str, Any]) -> str:
    """:func:`answer_summary_text` as Qt rich text. Each question token is shaded by its score (red
    towards the answer, blue away) with its score under the mouse; the strongest are bold. Server text
    is escaped everywhere."""
    out = [f"<p><b>Answer: {_e(get(result, 'answer', '?'))}</b>"
           + (f" (confidence {float(get(result, 'confidence')):.2f})"
              if isinstance(get(result, "confidence"), int | float) else "")
           + (f" <small>{_e(str(get(result, 'answer_type')).lower())} question</small>"
              if get(result, "answer_type") else "") + "</p>",
           f"<p>Question: <i>{_e(get(result, 'question', ''))}</i><br/>{_e(answer_slice_line(result))}</p>"]
    top = answer_top(result)
    if top:
        out.append("<table cellspacing='2'><tr><th align='left'>answer</th><th align='right'>p</th><th></th></tr>")
        for a, p in top:
            bar = "&#9608;" * max(0, round(20 * p))
            out.append(f"<tr><td>{_e(a)}</td><td align='right'>{p:.3f}</td><td>{bar}</td></tr>")
        out.append("</table>")
    toks = answer_tokens(result)
    if toks:
        scale = max((abs(s) for t, s, _ in toks if t not in SPECIAL_TOKENS), default=0.0)
        spans = []
        for t, s, strong in toks:
            text = f"<b>{_e(t)}</b>" if strong else _e(t)
            colour = "#eeeeee" if t in SPECIAL_TOKENS else _token_colour(s, scale)
            spans.append(f"<span style='background-color:{colour}' title='{s:+.3g}'>&nbsp;{text}&nbsp;</span>"
                         f"<sub>{s:+.2g}</sub>")
        out.append(f"<p><b>Question tokens</b> ({_e(_answer_method(result))}: red pushed towards the answer, "
                   "blue away; strongest in bold)</p>")
        out.append("<p>" + " ".join(spans) + "</p>")
    else:
        out.append(f"<p>Question tokens: {_e(_answer_tokens_note(result))}</p>")
    out.append(f"<p>{_e(_answer_heatmap_line(result))}</p>")
    out.append(f"<p><small>{_e(_answer_model_line(result))}</small></p>")
    return "\n".join(out)


# --------------------------------------------------------------------------------- labels


def label_params(result: Mapping[str, Any] | None, segment_names: Sequence[str], annotator: str | None) -> dict:
    """The ``params`` sent with a label (``PUT /datastore/label``).

    Provenance is the server's: it stamps method, model and version, task and time from the
    ``result_id`` of the explanation the label corrects, and the user from its authentication. The
    module sends only that id, whether the label is a corrected saliency region (``source``), which
    segments it holds, and the name typed into *Corrected by* (``annotator``, the client's word,
    kept apart from the server's ``user``).
    """
    rid = get(result, "result_id") if result else None
    params: dict[str, Any] = {"source": "corrected_saliency" if rid else "manual", "segments": list(segment_names)}
    if rid:
        params["result_id"] = str(rid)
    if annotator:
        params["annotator"] = annotator
    return params

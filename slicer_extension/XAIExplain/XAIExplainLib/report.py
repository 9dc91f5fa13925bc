"""Text from an explanation result: segment names, prediction, probabilities, findings and report,
as plain text and as HTML for the module's text browser. Pure Python (no Qt).

The result JSON is the server's (``docs/http_api.md``). Anatomy is read where the findings put it,
tolerating the shapes below, because the findings schema is still being settled on the server side:

* ``result["findings"]["levels"]`` or ``result["findings"]`` (a list): entries with ``level`` (1 =
  widest) or ``percent``, and region names in ``anatomy``, ``regions`` or ``region``;
* ``result["findings"]["mask"]["anatomy"]`` or ``result["anatomy"]``: regions of the whole mask.

Region names are strings, lists of strings, lists of ``{"name"|"label"|"region": ..., "fraction"|
"percent"|"overlap": ...}`` (sorted by that share) or ``{name: share}`` objects.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from datetime import UTC
from typing import Any

__all__ = [
    "answer_html",
    "answer_text",
    "findings_table",
    "label_provenance",
    "level_segment_names",
    "mask_segment_name",
    "region_names",
    "summary_html",
    "summary_text",
]

_NAME_KEYS = ("name", "label", "region", "structure")
_SHARE_KEYS = ("fraction", "percent", "overlap", "share", "probability")
_MAX_REGIONS_IN_NAME = 2


def _pretty(name: str) -> str:
    # Atlas labels come as "Left_Superior_Frontal_Gyrus".
    return " ".join(str(name).replace("_", " ").split())


def _share(d: Mapping[str, Any]) -> float:
    for k in _SHARE_KEYS:
        v = d.get(k)
        if isinstance(v, int | float) and math.isfinite(v):
            return float(v)
    return 0.0


def region_names(value: Any) -> list[str]:
    """Region names, largest share first, from any of the shapes the module docstring lists."""
    if not value:
        return []
    if isinstance(value, str):
        return [_pretty(value)]
    if isinstance(value, Mapping):
        if any(k in value for k in _NAME_KEYS):
            return region_names([value])
        items = [(k, v) for k, v in value.items() if isinstance(v, int | float)]
        return [_pretty(k) for k, _ in sorted(items, key=lambda kv: -kv[1])]
    if isinstance(value, Sequence):
        named = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                named.append((0.0, i, _pretty(item)))
            elif isinstance(item, Mapping):
                n = next((item[k] for k in _NAME_KEYS if item.get(k)), None)
                if n:
                    named.append((-_share(item), i, _pretty(str(n))))
        return [n for _, _, n in sorted(named)]
    return []


def _entry_regions(entry: Mapping[str, Any]) -> list[str]:
    for k in ("anatomy", "regions", "region"):
        if entry.get(k):
            return region_names(entry[k])
    return []


def _level_entries(result: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    f = result.get("findings")
    if isinstance(f, Mapping):
        f = f.get("levels")
    return [e for e in f if isinstance(e, Mapping)] if isinstance(f, list) else []


def levels_percent(result: Mapping[str, Any], n_levels: int) -> list[float | None]:
    """Percent of brain voxels of level 1..n (level 1 = the widest, e.g. top 20 %)."""
    pct = (result.get("mask") or {}).get("levels_percent") if isinstance(result.get("mask"), Mapping) else None
    if isinstance(pct, list) and len(pct) == n_levels and all(isinstance(p, int | float) for p in pct):
        return [float(p) for p in sorted(pct, reverse=True)]
    return [None] * n_levels


def _fmt_pct(p: float) -> str:
    return f"{p:g}"


def _with_regions(base: str, regions: list[str]) -> str:
    return base + (" – " + ", ".join(regions[:_MAX_REGIONS_IN_NAME]) if regions else "")


def level_segment_names(result: Mapping[str, Any], n_levels: int) -> list[str]:
    """Segment names for levels 1..n: "Saliency top 20 %" ... "Saliency top 1 %", with the level's
    leading anatomy when the findings give it ("Saliency top 1 % – Left Insular Cortex")."""
    pct = levels_percent(result, n_levels)
    entries = _level_entries(result)
    names = []
    for n in range(1, n_levels + 1):
        p = pct[n - 1]
        base = f"Saliency top {_fmt_pct(p)} %" if p is not None else f"Saliency level {n}"
        regions: list[str] = []
        for e in entries:
            ep = e.get("percent")
            if e.get("level") == n or (p is not None and isinstance(ep, int | float) and abs(ep - p) < 1e-6):
                regions = _entry_regions(e)
                break
        names.append(_with_regions(base, regions))
    return names


def mask_segment_name(result: Mapping[str, Any]) -> str:
    """"Saliency mask (3.2 % of brain)", with the mask's leading anatomy when the findings give it."""
    mask = result.get("mask") if isinstance(result.get("mask"), Mapping) else {}
    frac = mask.get("fraction_of_brain")
    base = "Saliency mask" + (f" ({100 * frac:.2g} % of brain)" if isinstance(frac, int | float) else "")
    f = result.get("findings")
    regions: list[str] = []
    if isinstance(f, Mapping) and isinstance(f.get("mask"), Mapping):
        regions = _entry_regions(f["mask"])
    if not regions and result.get("anatomy"):
        regions = region_names(result["anatomy"])
    return _with_regions(base, regions)


# --------------------------------------------------------------------------------- summaries

def _probabilities(result: Mapping[str, Any]) -> list[tuple[str, float]]:
    pred = result.get("prediction") if isinstance(result.get("prediction"), Mapping) else {}
    probs = pred.get("probabilities") or {}
    if not isinstance(probs, Mapping):
        return []
    return sorted(((str(k), float(v)) for k, v in probs.items() if isinstance(v, int | float)), key=lambda kv: -kv[1])


def _prediction(result: Mapping[str, Any]) -> tuple[str | None, float | None]:
    pred = result.get("prediction") if isinstance(result.get("prediction"), Mapping) else {}
    label = pred.get("label")
    probs = dict(_probabilities(result))
    return (str(label) if label is not None else None), probs.get(str(label)) if label is not None else None


def findings_table(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the findings (a list of objects, or ``findings["items"|"regions"|"levels"]``).

    Columns are the union of the entries' scalar fields in first-seen order; lists of regions are
    shown as names."""
    f = result.get("findings")
    if isinstance(f, Mapping):
        f = next((f[k] for k in ("items", "regions", "levels", "components") if isinstance(f.get(k), list)), None)
    if not isinstance(f, list):
        return [], []
    entries = [e for e in f if isinstance(e, Mapping)]
    cols: list[str] = []
    for e in entries:
        for k, v in e.items():
            if k not in cols and (isinstance(v, str | int | float | bool) or v is None or isinstance(v, list)):
                cols.append(k)
    rows = []
    for e in entries:
        row = []
        for c in cols:
            v = e.get(c)
            if isinstance(v, list):
                v = ", ".join(region_names(v)) or ", ".join(str(x) for x in v)
            elif isinstance(v, str) and c in (*_NAME_KEYS, "anatomy", "regions"):
                v = _pretty(v)
            elif isinstance(v, float):
                v = f"{v:.4g}"
            row.append("" if v is None else str(v))
        rows.append(row)
    return cols, rows


def _report_text(result: Mapping[str, Any]) -> str | None:
    rep = result.get("report")
    if isinstance(rep, Mapping):
        rep = rep.get("text") or rep.get("markdown") or rep.get("summary")
    return str(rep) if rep else None


def _mask_line(result: Mapping[str, Any]) -> str | None:
    m = result.get("mask") if isinstance(result.get("mask"), Mapping) else None
    if not m:
        return None
    if m.get("empty"):
        return f"Saliency mask: empty ({m.get('reason') or 'no reason given'})"
    parts = []
    if isinstance(m.get("volume_ml"), int | float):
        parts.append(f"{m['volume_ml']:.3g} ml")
    if isinstance(m.get("fraction_of_brain"), int | float):
        parts.append(f"{100 * m['fraction_of_brain']:.2g} % of brain")
    if isinstance(m.get("components"), int):
        parts.append(f"{m['components']} component(s)")
    return "Saliency mask: " + ", ".join(parts) if parts else None


def summary_text(result: Mapping[str, Any]) -> str:
    """Plain-text summary: method and target, prediction, probabilities, mask, findings, report."""
    lines = []
    method = result.get("method")
    targets = result.get("targets") or []
    if method:
        lines.append(f"Method: {method}" + (f" (target: {', '.join(map(str, targets))})" if targets else ""))
    label, p = _prediction(result)
    if label:
        lines.append(f"Prediction: {label}" + (f" (p = {p:.3f})" if p is not None else ""))
    probs = _probabilities(result)
    if probs:
        lines.append("Probabilities:")
        lines += [f"  {k:<24} {v:.3f}" for k, v in probs]
    ml = _mask_line(result)
    if ml:
        lines.append(ml)
    cols, rows = findings_table(result)
    if rows:
        lines.append("Findings:")
        lines.append("  " + " | ".join(cols))
        lines += ["  " + " | ".join(r) for r in rows]
    rep = _report_text(result)
    if rep:
        lines += ["Report:", rep]
    model = result.get("model") if isinstance(result.get("model"), Mapping) else {}
    if model.get("name"):
        lines.append(f"Model: {model['name']} {model.get('version') or ''}".rstrip())
    return "\n".join(lines)


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def summary_html(result: Mapping[str, Any]) -> str:
    """The same summary as HTML (Qt rich text subset: tables, bold, no scripts or CSS files)."""
    out = []
    method = result.get("method")
    targets = result.get("targets") or []
    label, p = _prediction(result)
    if label:
        out.append(f"<p><b>Prediction: {_e(label)}</b>" + (f" (p = {p:.3f})" if p is not None else "") + "</p>")
    if method:
        out.append(f"<p>Method: {_e(method)}" + (f", target: {_e(', '.join(map(str, targets)))}" if targets else "")
                   + "</p>")
    probs = _probabilities(result)
    if probs:
        out.append("<table cellspacing='2'><tr><th align='left'>class</th><th align='right'>p</th><th></th></tr>")
        for k, v in probs:
            bar = "&#9608;" * max(0, round(20 * v))  # a text bar: renders in any Qt text widget
            out.append(f"<tr><td>{_e(k)}</td><td align='right'>{v:.3f}</td><td>{bar}</td></tr>")
        out.append("</table>")
    ml = _mask_line(result)
    if ml:
        out.append(f"<p>{_e(ml)}</p>")
    cols, rows = findings_table(result)
    if rows:
        out.append("<p><b>Findings</b></p><table border='1' cellspacing='0' cellpadding='2'><tr>"
                   + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r in rows]
        out.append("</table>")
    rep = _report_text(result)
    if rep:
        out.append("<p><b>Report</b></p><p>" + _e(rep).replace("\n", "<br>") + "</p>")
    model = result.get("model") if isinstance(result.get("model"), Mapping) else {}
    if model.get("name"):
        out.append(f"<p><small>Model: {_e(model['name'])} {_e(model.get('version') or '')}</small></p>")
    return "\n".join(out)


def answer_text(result: Mapping[str, Any]) -> str:
    """The answer of a question (``vqa`` task): ``answer`` plus its ``confidence`` when given."""
    ans = result.get("answer")
    if isinstance(ans, Mapping):
        ans = ans.get("text") or ans.get("answer")
    if not ans:
        return "The server gave no answer."
    conf = result.get("confidence")
    return str(ans) + (f" (confidence {conf:.2f})" if isinstance(conf, int | float) else "")


def answer_html(result: Mapping[str, Any]) -> str:
    return f"<p>{_e(answer_text(result))}</p>"


def label_provenance(result: Mapping[str, Any] | None, task: str | None, segment_names: Sequence[str],
                     user: str | None, client: str, source: str = "corrected_saliency") -> dict[str, Any]:
    """The ``params`` stored with an uploaded label (docs/http_api.md): where the label came from."""
    from datetime import datetime

    result = result or {}
    model = result.get("model") if isinstance(result.get("model"), Mapping) else {}
    params = result.get("params") if isinstance(result.get("params"), Mapping) else {}
    return {
        "source": source,
        "method": result.get("method"),
        "task": task,
        "target": params.get("target") or (result.get("targets") or [None])[0],
        "model": model.get("name"),
        "model_version": model.get("version"),
        "result_id": result.get("result_id"),
        "segments": list(segment_names),
        "user": user or None,
        "client": client,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }

"""The server's result schema, as the module reads it: field paths, look-ups and a small validator.

The module ships a copy of the project's JSON Schema of every reply (``docs/result_schema.json``,
made from ``xai_core.schema``) as ``Resources/Schema/xai_result_schema.json``; Slicer's Python has neither
pydantic nor xai_core, and jsonschema is not bundled either, so this file reads the schema itself.

Every field the library reads is named once, in :data:`READS`, by its path in the schema
(``findings.location.structures[].label``: ``[]`` steps into the items of an array).
:func:`get` and :func:`items` read a reply only through those paths, and :func:`check_reply`
checks exactly them: present when the schema requires them, of the schema's type (and enum) when
present. Fields the module does not read are not checked, so a newer server that adds fields (the
schema is additive) still works with this module.

A test keeps the copy equal to ``docs/result_schema.json`` and every path of :data:`READS` in it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["OPTIONAL_KINDS", "READS", "ReplyError", "SCHEMA_PATH", "check_reply", "field_schema", "get", "items",
           "load_schema", "require_reply", "schema_version", "server_schema_problems"]

# Installed next to the other resources of the scripted-modules folder (shared by every module there,
# hence a name of its own); the same layout as in the source tree.
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "Resources" / "Schema" / "xai_result_schema.json"

#: Reply type (a key of the schema's ``properties``) -> every path the library reads in it.
READS: dict[str, tuple[str, ...]] = {
    "explanation": (
        "schema_version", "result_id", "task", "method", "method_title", "targets", "artifacts", "report",
        "model", "model.name", "model.version",
        "prediction", "prediction.label", "prediction.probabilities",
        "mask", "mask.empty", "mask.reason", "mask.volume_ml", "mask.fraction_of_brain", "mask.components",
        "mask.levels_percent",
        "findings",
        "findings.levels", "findings.levels[].level", "findings.levels[].percent",
        "findings.levels[].top_structure", "findings.levels[].hemisphere",
        "findings.location", "findings.location.top_structure", "findings.location.hemisphere",
        "findings.location.structures", "findings.location.structures[].name",
        "findings.location.structures[].label", "findings.location.structures[].lobe",
        "findings.location.structures[].hemisphere", "findings.location.structures[].volume_ml",
        "findings.location.structures[].fraction", "findings.location.structures[].saliency_share",
        "findings.counterfactual", "findings.counterfactual.status", "findings.counterfactual.reason",
        "findings.counterfactual.sentence",
        "findings.quality_flags", "findings.quality_flags[].code", "findings.quality_flags[].severity",
        "findings.quality_flags[].message",
        "ood", "ood.flagged", "ood.reasons",
        "saliency", "saliency.evidence", "saliency.evidence.mode", "saliency.evidence.reason",
        "saliency.evidence.cases", "saliency.evidence.cases[].case", "saliency.evidence.cases[].label",
        "saliency.evidence.cases[].weight",
    ),
    # The answer of the server's vqa task (report.answer_*).
    "vqa": (
        "schema_version", "result_id", "question", "answer", "answer_type", "confidence",
        "top", "top[].answer", "top[].probability",
        "tokens", "tokens[].token", "tokens[].score",
        "method", "method_title", "artifacts",
        "slice", "slice.plane", "slice.axis", "slice.position_mm", "slice.thickness_mm",
        "saliency", "saliency.flat",
        "model", "model.name", "model.version",
    ),
}
#: Reply types a server of the same major schema version may lack: 2.0 servers from before the vqa
#: task have no vqa reply, and send none, so a schema without it hides nothing the module reads.
OPTIONAL_KINDS = frozenset({"vqa"})
_ALL_READS = frozenset(p for paths in READS.values() for p in paths)
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "object": (Mapping,),
    "array": (list, tuple), "null": (type(None),)}


class ReplyError(ValueError):
    """A reply that does not follow the result schema; the message lists every problem."""

    def __init__(self, problems: Sequence[str], kind: str = "explanation"):
        self.problems = list(problems)
        super().__init__(f"the server's {kind} reply does not follow the result schema {schema_version()} this "
                         f"module reads: " + "; ".join(self.problems)
                         + ". Update the module (or the server) so that both use the same schema.")


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The bundled JSON Schema document (``{"properties": {reply type: {"$ref": ...}}, "$defs": ...}``)."""
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return json.load(fh)


def schema_version() -> str:
    return str(load_schema().get("version", "?"))


def _resolve(node: Mapping[str, Any], doc: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    """Follow ``$ref`` in ``doc`` (default: the bundled schema); local ``#/$defs/...`` only, which is
    all pydantic writes."""
    while "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/"):
            raise KeyError(f"schema reference {ref!r} is not local")
        target: Any = doc if doc is not None else load_schema()
        for part in ref[2:].split("/"):
            target = target[part]
        node = target
    return node


def _branches(node: Mapping[str, Any], doc: Mapping[str, Any] | None = None) -> list[Mapping[str, Any]]:
    """The alternatives of a node (``anyOf``), each resolved; a plain node is its own one branch."""
    node = _resolve(node, doc)
    return [_resolve(b, doc) for b in node["anyOf"]] if "anyOf" in node else [node]


def _container(node: Mapping[str, Any], want: str, doc: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    """The one non-null branch of ``node`` of JSON type ``want`` (``object`` or ``array``)."""
    branches = _branches(node, doc)
    found = [b for b in branches if b.get("type") == want or (want == "object" and "properties" in b)]
    if len(found) != 1:
        raise KeyError(f"schema node is not one {want}: {sorted(b.get('type', '?') for b in branches)}")
    return found[0]


def _steps(path: str) -> list[str]:
    """``a.b[].c`` -> ``["a", "b", "[]", "c"]``."""
    out = []
    for part in path.split("."):
        if part.endswith("[]"):
            out += [part[:-2], "[]"]
        else:
            out.append(part)
    return out


def field_schema(path: str, kind: str = "explanation",
                 doc: Mapping[str, Any] | None = None) -> tuple[Mapping[str, Any], bool]:
    """``(schema node, required)`` of ``path`` in reply type ``kind`` of ``doc`` (default: the bundled
    schema); KeyError when the schema lacks it.

    ``required``: the field's object lists it in ``required`` (an item step ``[]`` is never optional
    by itself)."""
    doc = doc if doc is not None else load_schema()
    node: Mapping[str, Any] = doc["properties"][kind]
    required = True
    for step in _steps(path):
        if step == "[]":
            node = _container(node, "array", doc)["items"]
            continue
        obj = _container(node, "object", doc)
        props = obj.get("properties", {})
        if step not in props:
            raise KeyError(f"{path}: the result schema has no field {step!r} here (fields: {sorted(props)})")
        required = step in obj.get("required", ())
        node = props[step]
    return node, required


def server_schema_problems(server_schema: Any) -> list[str]:
    """What the module could not read in replies of the server's schema (``GET /xai/schema``): another
    major version, or a field of :data:`READS` the server's schema lacks. [] when the module reads
    that server's replies (its schema may add fields: they are ignored)."""
    if not isinstance(server_schema, Mapping) or not isinstance(server_schema.get("properties"), Mapping):
        return ["the server's schema is not a result schema document"]
    theirs, ours = str(server_schema.get("version", "?")), schema_version()
    if theirs.split(".")[0] != ours.split(".")[0]:
        return [f"the server's result schema is {theirs}, the module reads {ours}"]
    problems = []
    for kind, paths in READS.items():
        if kind not in server_schema["properties"]:
            if kind not in OPTIONAL_KINDS:
                problems.append(f"the server's schema has no {kind} reply")
            continue
        for path in paths:
            try:
                field_schema(path, kind, server_schema)
            except (KeyError, TypeError) as e:
                problems.append(f"{path} is not in the server's schema ({e.args[0] if e.args else e})")
    return problems


def _fits(value: Any, node: Mapping[str, Any], depth: int = 0) -> bool:
    """``value`` fits one branch of ``node``: its type, enum and const, and (two levels deep) the
    types of array items and object values. An object's own fields are checked only where the module
    reads them (their own paths), so that fields a newer server adds do not matter."""
    for b in _branches(node):
        t = b.get("type")
        if t is not None and (not isinstance(value, _JSON_TYPES[t])
                              or (t in ("integer", "number") and isinstance(value, bool))):
            continue
        if ("enum" in b and value not in b["enum"]) or ("const" in b and value != b["const"]):
            continue
        if depth < 2 and isinstance(value, list | tuple) and isinstance(b.get("items"), Mapping):
            if not all(_fits(v, b["items"], depth + 1) for v in value):
                continue
        if depth < 2 and isinstance(value, Mapping) and isinstance(b.get("additionalProperties"), Mapping):
            if not all(_fits(v, b["additionalProperties"], depth + 1) for v in value.values()):
                continue
        return True
    return False


def _expected(node: Mapping[str, Any]) -> str:
    """What a node wants, in words: ``an array of number``, ``one of 'left', 'right'``, ``null``."""
    out = []
    for b in _branches(node):
        if "enum" in b:
            out.append("one of " + ", ".join(map(repr, b["enum"])))
        elif b.get("type") == "array" and isinstance(b.get("items"), Mapping):
            out.append(f"an array of {_expected(b['items'])}")
        elif b.get("type") == "object" and isinstance(b.get("additionalProperties"), Mapping):
            out.append(f"an object of {_expected(b['additionalProperties'])}")
        else:
            out.append(str(b.get("type") or b.get("title") or "any"))
    return " or ".join(dict.fromkeys(out))


def _describe(value: Any) -> str:
    kind = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
    text = json.dumps(value, default=str)
    return f"{kind} {text[:40] + '...' if len(text) > 40 else text}"


def check_reply(reply: Any, kind: str = "explanation") -> list[str]:
    """Problems of ``reply`` against the bundled schema, for every field in ``READS[kind]``; [] when fine.

    A required field that is missing, a field of another type or outside its enum, and a reply of
    another major schema version are problems; optional fields may be absent or null. A bundled
    schema without reply type ``kind`` is one problem (this module cannot check such replies)."""
    if not isinstance(reply, Mapping):
        return [f"the reply is {_describe(reply)}, not a JSON object"]
    if kind not in load_schema().get("properties", {}):
        return [f"this module's result schema ({schema_version()}) has no {kind} reply"]
    problems = []
    version = reply.get("schema_version")
    if isinstance(version, str) and version.split(".")[0] != schema_version().split(".")[0]:
        problems.append(f"schema_version is {version}, the module reads {schema_version()}")
    for path in READS[kind]:
        node, required = field_schema(path, kind)
        *parents, leaf = _steps(path)
        for label, value in _walk(reply, parents):
            if not isinstance(value, Mapping):
                continue  # the parent's own path reports a wrong type
            where = f"{label}.{leaf}" if label else leaf
            if leaf not in value:
                if required:
                    problems.append(f"{where} is missing")
                continue
            if not _fits(value[leaf], node):
                problems.append(f"{where} should be {_expected(node)}, not {_describe(value[leaf])}")
    return problems


def _walk(value: Any, steps: list[str]) -> list[tuple[str, Any]]:
    """The values at ``steps`` below ``value``, each with a readable location (``findings.levels[2]``)."""
    found = [("", value)]
    for step in steps:
        nxt = []
        for where, v in found:
            if step == "[]":
                if isinstance(v, list | tuple):
                    nxt += [(f"{where}[{i}]", x) for i, x in enumerate(v)]
            elif isinstance(v, Mapping) and v.get(step) is not None:
                nxt.append((f"{where}.{step}" if where else step, v[step]))
        found = nxt
    return found


def require_reply(reply: Any, kind: str = "explanation") -> Mapping[str, Any]:
    """``reply`` when :func:`check_reply` finds nothing; otherwise raise :class:`ReplyError` listing it all."""
    problems = check_reply(reply, kind)
    if problems:
        raise ReplyError(problems, kind)
    return reply


def _read(obj: Any, path: str) -> Any:
    if path not in _ALL_READS:
        # A field read outside READS would escape the schema test and the validator.
        raise KeyError(f"{path!r} is not in schema.READS")
    # Relative to the item the caller holds when the path goes through an array.
    for step in path.rsplit("[].", 1)[-1].split("."):
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(step)
    return obj


def get(obj: Any, path: str, default: Any = None) -> Any:
    """The value at ``path`` (a :data:`READS` entry) of a reply, or of an array item for a path through
    ``[]`` (``get(structure, "findings.location.structures[].label")``); ``default`` when absent or null."""
    value = _read(obj, path)
    return default if value is None else value


def items(obj: Any, path: str) -> list[Mapping[str, Any]]:
    """The objects of the array at ``path`` (a :data:`READS` entry); [] when absent or null."""
    value = _read(obj, path)
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list | tuple) else []

"""Label provenance, stamped by the server: what a stored label corrects, and who saved it when.

A client sends the ``result_id`` of the explanation it corrected (and any notes of its own). The
server looks the result up and writes the provenance itself: method, model name and version, the
task, "corrected_saliency" as the source, the time, and the user when the auth layer names one.
Values a client sends under those keys are dropped, never stored: provenance is the server's word.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .errors import BadInput

# Keys only the server writes into a label's info.
SERVER_KEYS = frozenset({
    "source", "method", "method_title", "task", "targets", "model_name", "model_version", "model_weights_sha256",
    "result_id", "result_known", "saved_at", "user", "auth", "sha256", "version", "provenance",
})
# A client's own notes (free text) are kept, within these limits.
MAX_CLIENT_KEYS = 16
MAX_CLIENT_VALUE_CHARS = 2000


def stamp(client_params: Mapping[str, Any], *, image_id: str, result: Mapping[str, Any] | None,
          user: str | None, auth: bool) -> dict[str, Any]:
    """The info stored with a label.

    Args:
        client_params: what the client sent (``result_id`` is read; server keys are dropped).
        image_id: the label's image.
        result: the stored result named by ``result_id`` (None when unknown or not sent).
        user: the authenticated user, when the auth layer gives one.
        auth: whether the request passed an auth check.
    """
    rid = client_params.get("result_id")
    if rid is not None and not isinstance(rid, str):
        raise BadInput("result_id must be the string id of an explanation result")
    notes = {k: v for k, v in client_params.items() if k not in SERVER_KEYS}
    if len(notes) > MAX_CLIENT_KEYS:
        raise BadInput(f"a label takes at most {MAX_CLIENT_KEYS} note fields, got {len(notes)}")
    for k, v in notes.items():
        if len(repr(v)) > MAX_CLIENT_VALUE_CHARS:
            raise BadInput(f"label note {k!r} is longer than {MAX_CLIENT_VALUE_CHARS} characters")
    info: dict[str, Any] = {**notes, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "user": user, "auth": "token" if auth else "none"}
    if not rid:
        info["source"] = "manual"
        return info
    if result is None:
        # The result may have been pruned: keep the link, say it could not be checked.
        info.update(source="corrected_saliency", result_id=rid, result_known=False)
        return info
    if result.get("image_id") and result["image_id"] != image_id:
        raise BadInput(f"result {rid!r} was computed for image {result['image_id']!r}, not {image_id!r}")
    model = result.get("model") or {}
    info.update(source="corrected_saliency", result_id=rid, result_known=True, method=result.get("method"),
                method_title=result.get("method_title"), task=result.get("task"), targets=result.get("targets"),
                model_name=model.get("name"), model_version=model.get("version"),
                model_weights_sha256=model.get("weights_sha256"))
    return info

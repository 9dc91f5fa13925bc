"""Errors that carry the HTTP status they stand for.

The HTTP layer (``monai_app/web``) maps any exception with an ``http_status`` attribute to that
status. It reads the attribute instead of importing these classes because MONAI Label imports this
package as ``lib`` while the wrapper lives in ``monai_app``: the same class under two module names
would not match ``isinstance``.
"""

from __future__ import annotations

from xai_core.io import ImageError, TooLargeError


class XAIError(Exception):
    """Base: ``str(exc)`` is the client-facing detail."""

    http_status = 500


class BadInput(XAIError):
    """The request is well formed but its content cannot be used (bad image, bad parameter)."""

    http_status = 422


class NotFound(XAIError):
    http_status = 404


class Conflict(XAIError):
    """The request would overwrite something stored."""

    http_status = 409


class Unavailable(XAIError):
    """The server cannot do this now (no model weights yet)."""

    http_status = 503


class JobCancelled(Exception):
    """Raised inside a running job at the next progress report after a cancel request."""


def describe_error(exc: BaseException) -> tuple[int, str]:
    """``(HTTP status, client-facing detail)`` of an exception; internal faults say only "internal error"
    (their traceback goes to the log under the error id, never to the client)."""
    if isinstance(exc, TooLargeError):
        return 413, f"image {exc.problem}"
    if isinstance(exc, ImageError):
        return 422, f"image {exc.problem}"
    status = getattr(exc, "http_status", None)
    if isinstance(status, int) and 400 <= status < 600:
        return status, str(exc) if status < 500 or status == 503 else "internal error"
    return 500, "internal error"

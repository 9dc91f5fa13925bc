"""Every error leaves the server as JSON ``{"detail": ..., "error_id": ...}`` and the same id is logged.

Client errors (4xx) say what is wrong; internal faults (5xx) say only "internal error" and put
the traceback in the log under the error id, so a user can quote the id and nothing internal
(paths, stack frames) leaks.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from fastapi.exceptions import RequestValidationError
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xai_core.io import ImageError, TooLargeError

log = logging.getLogger("xai.server")


class ApiError(HTTPException):
    """Raise from a route: status and a detail naming the problem."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=status_code, detail=detail, headers=headers)


def new_error_id() -> str:
    return uuid.uuid4().hex[:12]


@functools.cache
def _server_roots() -> tuple[str, ...]:
    """Folders whose paths are the server's business: the datastore, temp, the code, the venv, home."""
    roots = {tempfile.gettempdir(), sys.prefix, str(Path(__file__).resolve().parents[2]), os.path.expanduser("~")}
    studies = os.environ.get("MONAI_LABEL_STUDIES")
    if studies:
        roots.add(studies)
    roots |= {os.path.realpath(r) for r in roots}
    return tuple(sorted((r for r in roots if r and r != "/"), key=len, reverse=True))


@functools.cache
def _server_path_pattern() -> re.Pattern[str]:
    return re.compile("(?:" + "|".join(re.escape(r) for r in _server_roots()) + r")(?:/[^\s'\"<>]*)?")


def redact_paths(text: str) -> str:
    """``text`` with every server path (under the datastore, temp, code, venv or home folder) replaced by
    ``<server path>``: error details and stock MONAI Label replies must not reveal the server's layout."""
    return _server_path_pattern().sub("<server path>", text) if text else text


def error_response(status: int, detail: Any, *, where: str = "", exc: BaseException | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error reply; logs it with a fresh error id (5xx with the traceback)."""
    eid = new_error_id()
    if status >= 500:
        log.error("error_id=%s %s -> %d %s", eid, where, status, detail, exc_info=exc)
    else:
        log.warning("error_id=%s %s -> %d %s", eid, where, status, detail)
    # The log keeps the detail as it was; the client never sees a server path.
    shown = redact_paths(detail) if isinstance(detail, str) else detail
    return JSONResponse({"detail": shown, "error_id": eid}, status_code=status, headers=headers)


def describe(exc: BaseException) -> tuple[int, str]:
    """``(status, detail)`` for an exception raised while handling a request."""
    if isinstance(exc, HTTPException):
        return exc.status_code, str(exc.detail)
    if isinstance(exc, TooLargeError):
        return 413, f"image {exc.problem}"
    if isinstance(exc, ImageError):
        return 422, f"image {exc.problem}"
    if isinstance(exc, ImageNotFoundException | LabelNotFoundException):
        return 404, str(exc.msg)
    if isinstance(exc, MONAILabelException) and exc.error == MONAILabelError.INVALID_INPUT:
        return 400, str(exc.msg)
    status = getattr(exc, "http_status", None)  # lib.errors.XAIError, BodyTooLarge
    if isinstance(status, int) and 400 <= status < 500:
        return status, str(exc)
    if status == 503:
        return 503, str(exc)
    if isinstance(status, int) and status >= 500 and getattr(exc, "expose_detail", False):
        return status, str(exc)  # e.g. lib.datastore.LabelIntegrityError: names the label, no internals
    return 500, "internal error"


def _where(request: Request) -> str:
    return f"{request.method} {request.url.path}"


async def http_exception_handler(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, exc.detail, where=_where(request), headers=exc.headers)


async def validation_exception_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return error_response(422, "; ".join(parts) or "invalid request", where=_where(request))


class ErrorMiddleware:
    """Outermost of the wrapper's middlewares: any exception that escapes a route (MONAI Label's
    included) becomes a JSON error with an id instead of a bare 500, and the server keeps serving."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            status, detail = describe(exc)
            where = f"{scope.get('method')} {scope.get('path')}"
            if started:  # too late for a reply: log it so the fault is not silent
                log.error("error_id=%s %s failed after the response started", new_error_id(), where, exc_info=exc)
                return
            await error_response(status, detail, where=where, exc=exc if status >= 500 else None)(
                scope, receive, send)

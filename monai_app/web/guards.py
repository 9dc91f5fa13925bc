"""Request guards that run before any route, MONAI Label's own included.

* :class:`TokenAuthMiddleware`: with a token configured, every request needs
  ``Authorization: Bearer <token>`` (401 otherwise).
* :class:`BodyLimitMiddleware`: request bodies above the configured size get 413, whether the
  client declares the length or streams the body in chunks.
* :class:`IdGuardMiddleware`: ``image``, ``label``, ``id``, ``tag`` and ``session_id`` query
  values must be plain names. MONAI Label joins them into file paths (and ``/infer`` even reads any
  existing server path given as ``image``), so path-like values are refused with 400.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
GUARDED_PARAMS = ("image", "label", "id", "tag", "session_id")


def id_problem(value: str, what: str = "id") -> str | None:
    """Why ``value`` is not a usable id (None when it is)."""
    if any(c in value for c in "/\\\0") or ".." in value or value.startswith(("~", ".")):
        return f"{what} {value!r} looks like a file path; ids are plain names (letters, digits, '.', '_', '-')"
    if not SAFE_ID.match(value):
        return f"{what} {value!r} is not a valid id: use 1-128 letters, digits, '.', '_' or '-'"
    return None


class TokenAuthMiddleware:
    def __init__(self, app: ASGIApp, token: Callable[[], str]):
        self.app = app
        self.token = token  # read per request: the app (and its options) start after this object

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        expected = self.token() if scope["type"] == "http" else ""
        if expected:
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected.encode()):
                reason = "missing" if not given else "invalid"
                resp = error_response(401, f"{reason} bearer token: send 'Authorization: Bearer <token>'",
                                      where=f"{scope.get('method')} {scope.get('path')}",
                                      headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    http_status = 413


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: Callable[[], int]):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = f"request body is larger than the server's upload limit of {limit / 2**20:g} MiB"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # Answer before reading the body; the client may keep sending, the server stays fine.
            resp = error_response(413, too_large, where=f"{scope.get('method')} {scope.get('path')}",
                                  headers={"Connection": "close"})
            await resp(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(too_large)
            return message

        await self.app(scope, counting_receive, send)


class IdGuardMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("query_string"):
            query = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
            for key, value in query:
                if key in GUARDED_PARAMS and value:
                    problem = id_problem(value, key)
                    if problem:
                        resp = error_response(400, problem, where=f"{scope.get('method')} {scope.get('path')}")
                        await resp(scope, receive, send)
                        return
        await self.app(scope, receive, send)

"""Request guards that run before any route, MONAI Label's own included.

* :class:`TokenAuthMiddleware`: with a token configured, every request needs
  ``Authorization: Bearer <token>`` (401 otherwise).
* :class:`BodyLimitMiddleware`: request bodies above the configured size get 413, whether the
  client declares the length or streams the body in chunks.
* :class:`IdGuardMiddleware`: ``image``, ``label``, ``id``, ``tag`` and ``session_id`` query
  values must be plain names. MONAI Label joins them into file paths (and ``/infer`` even reads any
  existing server path given as ``image``), so path-like values are refused with 400.
* :class:`RouteFilterMiddleware`: only the allow-list is served (docs/http_api.md); MONAI Label routes
  an operator turns on with ``--conf stock_routes`` pass the same checks (see docs/security.md).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import anyio.to_thread
from starlette.requests import Request
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


# -- the served surface -----------------------------------------------------------------------------

# Keys a request body may not set on a stock MONAI Label route: they name files, models or label
# saving, which the server decides (docs/http_api.md: "the server never saves an inference result
# as a label").
RESERVED_BODY_KEYS = frozenset({"image", "label", "label_tag", "save_label", "model", "session", "session_id",
                                "file", "files", "path", "output_dir"})
MAX_BODY_DEPTH = 32


@dataclass(frozen=True)
class ServedRoute:
    """One (method, path) of the app, classified at wrap time by ``monai_app.asgi``.

    ``status``: ``"ours"`` (the wrapper's route), ``"stock"`` (a documented MONAI Label route, served
    as is), ``"guarded"`` (an undocumented MONAI Label route turned on with ``--conf stock_routes``) or
    ``"off"``. ``group`` is the ``stock_routes`` name that turns it on ("" when none can)."""

    methods: frozenset[str]
    path: str
    regex: re.Pattern[str]
    status: str
    group: str = ""
    takes_image: bool = False

    def matches(self, method: str, path: str) -> bool:
        if not self.regex.match(path):
            return False
        return not self.methods or method in self.methods or (method == "HEAD" and "GET" in self.methods)


def _path_problem(value: str) -> str | None:
    v = value.strip()
    if v.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:[\\/]", v):
        return f"{v[:80]!r} is an absolute path"
    if re.search(r"(^|[\\/])\.\.([\\/]|$)", v):
        return f"{v[:80]!r} contains '..'"
    return None


def body_problem(value: Any, depth: int = 0) -> str | None:
    """Why a (parsed JSON) body value may not reach a stock route: a reserved key or a file path."""
    if depth > MAX_BODY_DEPTH:
        return f"parameters are nested deeper than {MAX_BODY_DEPTH} levels"
    if isinstance(value, dict):
        for k, v in value.items():
            if str(k) in RESERVED_BODY_KEYS:
                return (f"parameter {k!r} cannot be set in the request body: images are datastore ids given as "
                        "?image=, and the server never saves an inference result as a label")
            problem = body_problem(v, depth + 1)
            if problem:
                return problem
    elif isinstance(value, list):
        for v in value:
            problem = body_problem(v, depth + 1)
            if problem:
                return problem
    elif isinstance(value, str):
        problem = _path_problem(value)
        if problem:
            return f"parameter value {problem}: file paths are not accepted"
    return None


def _parse_json_text(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise _Refused(422, f"parameters are nested deeper than {MAX_BODY_DEPTH} levels") from None
    except ValueError:
        return None  # not JSON: a plain string value


class _Refused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class RouteFilterMiddleware:
    """Serve only the allow-list: ``routes`` (from ``monai_app.asgi.classify_routes``) in router order.

    * A request whose first matching route is ``off`` gets 404 with a JSON error saying how to turn
      it on (or that it cannot be).
    * A ``guarded`` route (an undocumented MONAI Label route the operator turned on) goes through the
      same checks as the wrapper's own routes: ids in the query were checked by
      :class:`IdGuardMiddleware`; ``image`` must name a datastore image (MONAI Label would also open
      any server file of that name); ``uncompress`` (tar unpacking) is refused; the body may not set
      ``image``, ``label_tag``, ``save_label`` and the like, nor carry file paths. It then runs on a
      worker thread with its own event loop (MONAI Label runs such calls inline in ``async``
      handlers, which would stop the server), and server paths are removed from its JSON reply.
    * Anything else passes (the router answers 404/405 for unknown paths, JSON via the handlers)."""

    def __init__(self, app: ASGIApp, routes: Callable[[], list[ServedRoute]],
                 image_exists: Callable[[str], bool], redact: Callable[[str], str]):
        self.app = app
        self.routes = routes
        self.image_exists = image_exists
        self.redact = redact

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method", "GET"), scope.get("path", "")
        route = next((r for r in self.routes() if r.matches(method, path)), None)
        where = f"{method} {path}"
        if route is None or route.status in ("ours", "stock"):
            await self.app(scope, receive, send)
            return
        if route.status == "off":
            how = (f"; turn it on with --conf stock_routes {route.group}" if route.group
                   else "; it cannot be turned on (see docs/security.md)")
            await error_response(404, f"{method} {route.path} is not served by this server{how}",
                                 where=where)(scope, receive, send)
            return
        try:
            body = await _read_body(receive)
            await self._check(route, scope, body)
        except _Refused as e:
            await error_response(e.status, e.detail, where=where)(scope, receive, send)
            return
        await self._run_in_thread(scope, body, send)

    async def _check(self, route: ServedRoute, scope: Scope, body: bytes) -> None:
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        if query.get("uncompress", "").lower() in ("1", "true", "yes", "on"):
            raise _Refused(400, "uncompress is not accepted: archives are not unpacked on the server; "
                                "upload one volume file")
        image = query.get("image", "")
        headers = dict(scope.get("headers") or [])
        ctype = headers.get(b"content-type", b"").decode("latin-1").lower()
        if image and not self.image_exists(image):
            raise _Refused(404, f"unknown image id {image!r}: not in the datastore "
                                "(GET /datastore/?output=all lists the ids)")
        if route.takes_image and not image and not query.get("session_id") and "multipart/" not in ctype:
            raise _Refused(400, "no image given: pass ?image=<datastore id>")
        for value in await _body_values(scope, body, ctype):
            problem = body_problem(value)
            if problem:
                raise _Refused(400, problem)

    async def _run_in_thread(self, scope: Scope, body: bytes, send: Send) -> None:
        messages: list[Message] = []
        sent_body = False

        async def replay() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            # The client stays connected while the route runs (a disconnect here would cut streamed replies).
            await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        async def collect(message: Message) -> None:
            messages.append(message)

        await anyio.to_thread.run_sync(lambda: asyncio.run(self.app(scope, replay, collect)))
        start = next((m for m in messages if m["type"] == "http.response.start"), None)
        if start is None:
            raise RuntimeError("the stock route sent no response")
        content = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        ctype = dict(headers).get(b"content-type", b"")
        if ctype.startswith(b"application/json") or ctype.startswith(b"text/"):
            content = self.redact(content.decode("utf-8", errors="replace")).encode()
        headers.append((b"content-length", str(len(content)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": content, "more_body": False})


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _body_values(scope: Scope, body: bytes, ctype: str) -> list[Any]:
    """The parsed values a body carries: the JSON body, or each form field (JSON text parsed)."""
    if not body.strip():
        return []
    if ctype.startswith("application/json"):
        parsed = _parse_json_text(body.decode("utf-8", errors="replace"))
        return [parsed] if parsed is not None else []
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        sent = False

        async def once() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(scope, once)
        try:
            form = await request.form()
        except Exception:
            raise _Refused(422, "the form body could not be parsed") from None
        values: list[Any] = []
        try:
            for key, value in form.multi_items():
                if key in RESERVED_BODY_KEYS and isinstance(value, str):
                    values.append({key: value})
                elif isinstance(value, str):
                    parsed = _parse_json_text(value)
                    values.append(parsed if isinstance(parsed, dict | list) else value)
        finally:
            await form.close()
        return values
    return []

"""ASGI app for ``monailabel start_server --uvicorn_app monai_app.asgi:app``.

MONAI Label's FastAPI app, with:

* JSON errors with an error id for every failure (``web.errors``),
* bearer-token auth, an upload size limit and id checks in front of every route (``web.guards``),
* non-blocking inference, checked uploads, verified and versioned labels, jobs and result downloads
  (``web.routes``), and the learning loop: train status, model versions, activate/rollback and the
  active-learning "next sample" (``web.learning``), placed in front of MONAI Label's routes of the same path,
* an allow-list of served routes (:func:`classify_routes`): the wrapper's routes and the MONAI Label
  routes docs/http_api.md documents. Every other stock route (sessions, WSI and batch inference, model
  upload, logs, scoring, active learning, OHIF, DICOM proxy, ...) answers 404 unless ``--conf
  stock_routes GROUP[,GROUP...]`` turns its group on; it then passes the same id, path and body checks
  and runs off the event loop (``web.guards.RouteFilterMiddleware``). Routes that rewrite stored
  provenance (``PUT /datastore/label/info`` and the like) or reload the app are never served.

Middleware order, outermost first: errors, auth, body limit, id guard, route filter, then MONAI Label's CORS.

:data:`WRAPPED` tells ``monai_app/main.py`` that this wrapper (and so the auth layer) is installed: with
a token configured, the app refuses to start without it.
"""

from __future__ import annotations

import inspect
import re

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import iter_route_contexts
from monailabel.app import app as monailabel_app
from monailabel.config import settings
from monailabel.interfaces.utils.app import app_instance
from starlette.exceptions import HTTPException

from .web.errors import ErrorMiddleware, http_exception_handler, redact_paths, validation_exception_handler
from .web.guards import (
    BodyLimitMiddleware,
    IdGuardMiddleware,
    RouteFilterMiddleware,
    ServedRoute,
    TokenAuthMiddleware,
)
from .web.learning import router as learning_router
from .web.routes import router

WRAPPED = False  # set by wrap(): read by main.py's start-up check

# MONAI Label routes the app documents (docs/http_api.md), served as they are. HEAD follows GET.
DOCUMENTED_STOCK = {
    ("GET", "/info/"), ("GET", "/datastore/"), ("GET", "/datastore/image"), ("DELETE", "/datastore/image"),
    ("GET", "/datastore/label/info"), ("DELETE", "/datastore/label"), ("GET", "/train/"),
    ("GET", "/openapi.json"), ("GET", "/docs"),
}
# Undocumented MONAI Label routes an operator may turn on, by group: (group, method or "*", path regex).
STOCK_GROUPS: list[tuple[str, str, str]] = [
    ("session", "*", r"^/session/"),
    ("wsi", "*", r"^/infer/wsi"),
    ("batch", "*", r"^/batch/"),
    ("model", "*", r"^/model/"),
    ("logs", "*", r"^/logs/"),
    ("scoring", "*", r"^/scoring/"),
    ("activelearning", "*", r"^/activelearning/"),
    ("ohif", "*", r"^/ohif/"),
    ("proxy", "*", r"^/proxy/"),
    ("dataset", "GET", r"^/datastore/dataset$"),
    ("image_info", "GET", r"^/datastore/image/info$"),
    ("exists", "HEAD", r"^/datastore/(image|label)$"),
    ("train_all", "*", r"^/train/$"),
    ("ui", "*", r"^/($|favicon\.ico$|static)"),
]
# Never served, whatever the setting: they rewrite a stored label's or image's provenance and hash
# (the stock handler even overwrites "user" when the body is empty), or drop the app instance (a
# second instance would run beside the first, with its own datastore lock).
NEVER = [
    ("PUT", r"^/datastore/(label/info|image/info|updatelabelinfo)$"),
    ("POST", r"^/reload$"),
    ("*", r"^/auth/"),
]
GROUP_NAMES = sorted({g for g, _, _ in STOCK_GROUPS})


def enabled_groups(conf: dict[str, str] | None = None) -> set[str]:
    """The ``stock_routes`` conf value (comma or space separated group names, or ``all``) as a set."""
    conf = conf if conf is not None else (settings.MONAI_LABEL_APP_CONF or {})
    raw = str(conf.get("stock_routes", "") or "").replace(",", " ").split()
    names = {n.strip().lower() for n in raw if n.strip()}
    if "all" in names:
        return set(GROUP_NAMES)
    names.discard("none")
    unknown = names - set(GROUP_NAMES)
    if unknown:
        raise ValueError(f"--conf stock_routes: unknown group(s) {sorted(unknown)}; known: {GROUP_NAMES} or 'all'")
    return names


def _matches(rule_method: str, rule_path: str, methods: set[str], path: str) -> bool:
    return (rule_method == "*" or rule_method in methods) and re.search(rule_path, path) is not None


def classify_routes(app: FastAPI, groups: set[str]) -> list[ServedRoute]:
    """Every route of ``app`` in router order, with what the allow-list does with it."""
    ours_modules = {r.endpoint.__module__ for r in (*router.routes, *learning_router.routes)}
    out: list[ServedRoute] = []
    for rc in iter_route_contexts(app.router.routes):
        path = rc.path or ""
        methods = set(rc.methods or ())
        endpoint = rc.endpoint
        regex = rc.path_regex
        if endpoint is not None and getattr(endpoint, "__module__", "") in ours_modules:
            status, group = "ours", ""
        elif any(_matches(m, p, methods or {"*"}, path) for m, p in NEVER):
            status, group = "off", ""
        elif any((m, path) in DOCUMENTED_STOCK for m in methods):
            status, group = "stock", ""
        else:
            group = next((g for g, m, p in STOCK_GROUPS if _matches(m, p, methods or {m}, path)), "")
            status = "guarded" if group and group in groups else "off"
        takes_image = False
        if endpoint is not None:
            try:
                takes_image = "image" in inspect.signature(endpoint).parameters
            except (TypeError, ValueError):
                pass
        out.append(ServedRoute(frozenset(methods), path, regex, status, group, takes_image))
    # A stock route that one of ours shadows (same method and path) is never reached: mark it off so
    # /openapi.json does not list it twice.
    ours = {(m, r.path) for r in out if r.status == "ours" for m in r.methods}
    return [r if r.status == "ours" or not any((m, r.path) in ours for m in r.methods)
            else ServedRoute(r.methods, r.path, r.regex, "off", "", r.takes_image) for r in out]


def _prune_openapi(app: FastAPI, served: list[ServedRoute]) -> None:
    """``/openapi.json`` (and ``/docs``) list only what is served."""
    original = app.openapi
    visible = {(m.lower(), r.path) for r in served if r.status in ("ours", "stock", "guarded") for m in r.methods}

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = original()
            for path, ops in list(schema.get("paths", {}).items()):
                for method in list(ops):
                    if (method, path) not in visible:
                        del ops[method]
                if not ops:
                    del schema["paths"][path]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _token() -> str:
    return app_instance().xai.options.token


def _upload_limit() -> int:
    return app_instance().xai.options.max_upload_bytes


def _image_exists(image_id: str) -> bool:
    return bool(app_instance().datastore().get_image_uri(image_id))


def wrap(app: FastAPI, conf: dict[str, str] | None = None) -> FastAPI:
    """Install the wrapper into ``app`` (MONAI Label's app object) and return it."""
    global WRAPPED
    groups = enabled_groups(conf)
    app.add_exception_handler(HTTPException, http_exception_handler)
    app.add_exception_handler(RequestValidationError, validation_exception_handler)
    # include_router appends; routes match in order, so move ours in front of MONAI Label's.
    before = len(app.router.routes)
    app.include_router(router)
    app.include_router(learning_router)  # GET /train/, versions, activate/rollback, /activelearning/
    ours = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[0:0] = ours
    served = classify_routes(app, groups)
    _prune_openapi(app, served)
    # add_middleware wraps around what is there: add innermost first.
    app.add_middleware(RouteFilterMiddleware, routes=lambda: served, image_exists=_image_exists,
                       redact=redact_paths)
    app.add_middleware(IdGuardMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit=_upload_limit)
    app.add_middleware(TokenAuthMiddleware, token=_token)
    app.add_middleware(ErrorMiddleware)
    app.state.xai_served_routes = served
    WRAPPED = True
    return app


app = wrap(monailabel_app)

"""ASGI app for ``monailabel start_server --uvicorn_app monai_app.asgi:app``.

MONAI Label's FastAPI app, with:

* JSON errors with an error id for every failure (``web.errors``),
* bearer-token auth, an upload size limit and id checks in front of every route (``web.guards``),
* non-blocking inference, checked uploads, versioned labels, jobs and result downloads
  (``web.routes``), placed in front of MONAI Label's routes of the same path.

Middleware order, outermost first: errors, auth, body limit, id guard, then MONAI Label's CORS.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from monailabel.app import app as monailabel_app
from monailabel.interfaces.utils.app import app_instance
from starlette.exceptions import HTTPException

from .web.errors import ErrorMiddleware, http_exception_handler, validation_exception_handler
from .web.guards import BodyLimitMiddleware, IdGuardMiddleware, TokenAuthMiddleware
from .web.routes import router


def _token() -> str:
    return app_instance().xai.options.token


def _upload_limit() -> int:
    return app_instance().xai.options.max_upload_bytes


def wrap(app: FastAPI) -> FastAPI:
    """Install the wrapper into ``app`` (MONAI Label's app object) and return it."""
    app.add_exception_handler(HTTPException, http_exception_handler)
    app.add_exception_handler(RequestValidationError, validation_exception_handler)
    # include_router appends; routes match in order, so move ours in front of MONAI Label's.
    before = len(app.router.routes)
    app.include_router(router)
    ours = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[0:0] = ours
    # add_middleware wraps around what is there: add innermost first.
    app.add_middleware(IdGuardMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit=_upload_limit)
    app.add_middleware(TokenAuthMiddleware, token=_token)
    app.add_middleware(ErrorMiddleware)
    return app


app = wrap(monailabel_app)

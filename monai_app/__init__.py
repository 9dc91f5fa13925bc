"""MONAI Label app serving ``xai_core`` explanations (see docs/server.md and docs/http_api.md).

``main.py`` and ``lib/`` follow MONAI Label's app layout and are loaded by MONAI Label from this
folder (``lib`` is imported as a top-level package there). ``asgi.py`` and ``web/`` wrap MONAI
Label's FastAPI app (``--uvicorn_app monai_app.asgi:app``) and reach the app only through
``app_instance()``, so no module is imported under two names. ``serve.py`` is the launcher behind
``xai serve`` / ``make serve``.
"""

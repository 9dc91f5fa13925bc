"""The app's own code, imported by ``main.py`` as the top-level package ``lib`` (MONAI Label layout)."""

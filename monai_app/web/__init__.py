"""HTTP wrapper around MONAI Label's FastAPI app: guards, JSON errors, non-blocking routes."""

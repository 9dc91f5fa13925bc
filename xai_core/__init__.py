"""Headless explainable-AI core: image I/O with geometry, models, explainers, masks, reports."""

__version__ = "0.1.0"

"""XAIExplain library: HTTP client, background runs, scene logic and text, without Qt or ``slicer.app``.

Importable in the Slicer application and in plain Python with the ``slicer-core`` wheel (tests).
"""

__version__ = "0.1.0"

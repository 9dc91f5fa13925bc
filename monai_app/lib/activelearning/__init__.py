"""Active-learning strategies (MONAI Label ``Strategy``): which stored study to correct next."""

from .uncertainty import LeastSure, StudyScore, score_study

__all__ = ["LeastSure", "StudyScore", "score_study"]

"""Train tasks (MONAI Label ``TrainTask``s)."""

from .seg_head import SegHeadFinetuneTask

__all__ = ["SegHeadFinetuneTask"]

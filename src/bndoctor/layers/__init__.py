"""Normalisation layers shipped by bndoctor."""

from .accum import AccumBatchNorm
from .frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormMixin,
    frozen_class_for,
)
from .renorm import BatchRenorm
from .sync import SyncBatchNorm

__all__ = [
    "AccumBatchNorm",
    "BatchRenorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormMixin",
    "SyncBatchNorm",
    "frozen_class_for",
]

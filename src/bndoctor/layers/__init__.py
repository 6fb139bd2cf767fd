"""Normalisation layers shipped by bndoctor, and the protocol every layer answers (:class:`BNDoctorLayer`)."""

from ._base import (
    POST_OPS,
    BNDoctorLayer,
    PostOps,
    apply_post_ops,
    is_small_batch_remedy,
    normalisation_statistics,
    pools_ranks,
    pools_window,
    post_ops,
    window_open,
)
from .accum import AccumBatchNorm, AccumMode
from .frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormMixin,
    frozen_class_for,
    is_bndoctor_frozen,
)
from .norm_act import BatchNormAct, GroupNormAct
from .renorm import BatchRenorm
from .sync import SyncBatchNorm

__all__ = [
    "POST_OPS",
    "AccumBatchNorm",
    "AccumMode",
    "BNDoctorLayer",
    "BatchNormAct",
    "BatchRenorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormMixin",
    "GroupNormAct",
    "PostOps",
    "SyncBatchNorm",
    "apply_post_ops",
    "frozen_class_for",
    "is_bndoctor_frozen",
    "is_small_batch_remedy",
    "normalisation_statistics",
    "pools_ranks",
    "pools_window",
    "post_ops",
    "window_open",
]

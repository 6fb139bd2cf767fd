"""Convert BatchNorm layers to bndoctor's SyncBatchNorm and back."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from . import distributed
from ._walk import ModuleSelection
from .convert import revert_bn, swap_bn_layers
from .errors import BNDoctorError
from .layers.sync import SyncBatchNorm

__all__ = ["from_sync_bn", "to_sync_bn"]


def to_sync_bn(
    model: nn.Module,
    process_group: Any = None,
    *,
    group_size: int | None = None,
    modules: ModuleSelection = None,
    inplace: bool = False,
) -> nn.Module:
    """Replace BN layers by :class:`bndoctor.SyncBatchNorm`, which runs on CPU and GPU.

    Converts BatchNorm1d/2d/3d and ``torch.nn.SyncBatchNorm``; frozen layers
    (which normalise with running statistics) are left alone, and so are BN
    subclasses with their own forward (a warning names them). Parameters,
    buffers, momentum, eps, ``requires_grad`` and mode carry over, and the
    original class is remembered for :func:`from_sync_bn`.

    ``process_group`` syncs within that group (default: all ranks);
    ``group_size`` instead syncs within consecutive blocks of that many ranks,
    e.g. ``group_size=8`` for one group per 8-GPU node (collective: call it on
    every rank). ``modules=`` limits syncing to part of the model, e.g.
    ``modules="backbone"``.
    """
    if group_size is not None:
        if process_group is not None:
            raise BNDoctorError(
                "pass either process_group or group_size, not both",
                hint="group_size builds the groups for you",
            )
        process_group = distributed.subgroup(group_size)

    return swap_bn_layers(
        model,
        lambda record: SyncBatchNorm(int(record.num_features or 0), process_group=process_group),
        modules=modules,
        inplace=inplace,
        operation="to_sync_bn",
    )


def from_sync_bn(model: nn.Module, *, dims: int | None = None, inplace: bool = False) -> nn.Module:
    """Turn bndoctor's and torch's SyncBatchNorm layers back into BatchNorm1d/2d/3d.

    A layer made by :func:`to_sync_bn` becomes its original class again, with
    every field (lossless round trip). Other SyncBatchNorm layers (built
    directly, or torch's) need ``dims=1, 2 or 3`` to pick the class.
    """
    return revert_bn(model, (SyncBatchNorm, nn.SyncBatchNorm), dims=dims, inplace=inplace)

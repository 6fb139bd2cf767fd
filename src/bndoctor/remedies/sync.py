"""SyncBN: convert BatchNorm layers to bndoctor's SyncBatchNorm (CPU and GPU) and back.

Also registers the ``to_sync_bn`` fixer and prescription (several processes:
normalise over all of them) and ``from_sync_bn`` (torch's SyncBatchNorm in a
single process cannot train).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch.nn as nn

from .. import distributed
from .._walk import ModuleSelection, find_bn, select
from ..errors import BNDoctorError
from ..findings import Action
from ..layers import pools_ranks
from ..layers.sync import SyncBatchNorm
from ..training import TrainingSetup
from ._registry import FixStep, Prescription, Remedy, register_remedy
from ._swap import revert_layers, swap_layers

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

    Args:
        model: the model.
        process_group: the ranks to sync within (default: all ranks).
        group_size: instead, sync within consecutive blocks of that many ranks, e.g. ``group_size=8`` for
            one group per 8-GPU node (collective: call it on every rank).
        modules: limit syncing to part of the model, e.g. ``modules="backbone"``.
        inplace: change ``model`` itself; by default a copy is changed.

    Returns:
        The model's root (a new object unless ``inplace=True``).
    """
    if group_size is not None:
        if process_group is not None:
            raise BNDoctorError(
                "pass either process_group or group_size, not both",
                hint="group_size builds the groups for you",
            )
        process_group = distributed.subgroup(group_size)

    return swap_layers(
        model,
        lambda record: SyncBatchNorm(int(record.num_features or 0), process_group=process_group),
        modules=modules,
        inplace=inplace,
        operation="to_sync_bn",
    )


def from_sync_bn(
    model: nn.Module, *, dims: int | None = None, modules: ModuleSelection = None, inplace: bool = False
) -> nn.Module:
    """Turn bndoctor's and torch's SyncBatchNorm layers back into BatchNorm1d/2d/3d.

    A layer made by :func:`to_sync_bn` becomes its original class again, with
    every field (lossless round trip).

    Args:
        model: the model.
        dims: 1, 2 or 3: the BatchNorm class for SyncBatchNorm layers built directly (or torch's), which have
            no original class to return to.
        modules: limit it to part of the model.
        inplace: change ``model`` itself; by default a copy is changed.

    Returns:
        The model's root (a new object unless ``inplace=True``).
    """
    return revert_layers(model, (SyncBatchNorm, nn.SyncBatchNorm), dims=dims, modules=modules, inplace=inplace)


def _fix_to_sync(step: FixStep) -> nn.Module:
    # layers that pool ranks already (accumulation-aware BN with sync, whose fixer runs first) stay as they are
    records = select(find_bn(step.model), step.selection)
    if any(pools_ranks(r.module) for r in records):
        step.layers = [r.name for r in records if not pools_ranks(r.module)]
        if not step.layers:
            return step.model
    return step.apply("to_sync_bn", lambda m: to_sync_bn(m, modules=step.selection, inplace=True))


def _fix_from_sync(step: FixStep) -> nn.Module:
    dims = [len(step.layer_shapes[m]) - 2 for m in step.layers if m in step.layer_shapes]
    common = Counter(dims).most_common(1)[0][0] if dims else 2  # traced input rank, else images
    return step.apply("from_sync_bn", lambda m: from_sync_bn(m, dims=common, inplace=True))


def _prescribe(setup: TrainingSetup) -> Prescription | None:
    if setup.world_size == 1 or setup.finetune:
        return None
    how = "model = bndoctor.to_sync_bn(model)"
    if setup.trainer == "lightning":
        how = "Trainer(plugins=[BNDoctorSync()]) (unlike sync_batchnorm=True it trains on CPU)"
    return Prescription(f"SyncBatchNorm normalises over all {setup.world_size} processes: {how}", Action("to_sync_bn"))


register_remedy(
    Remedy(
        "to_sync_bn",
        fix=_fix_to_sync,
        order=60,
        layer=SyncBatchNorm,
        revert=from_sync_bn,
        prescribe=_prescribe,
    )
)
register_remedy(Remedy("from_sync_bn", fix=_fix_from_sync, order=40))

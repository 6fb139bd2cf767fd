"""Convert BatchNorm layers to bndoctor's SyncBatchNorm and back, and compare statistics across ranks."""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import distributed
from ._walk import BNInfo, ModuleSelection, plan, replace_modules, require_initialized, warn_unsupported
from .errors import BNDoctorError, BNDoctorWarning
from .layers.sync import SyncBatchNorm

__all__ = ["from_sync_bn", "to_sync_bn"]

_DIMS_TO_CLASS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_PLAIN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def _move_state(source: _BatchNorm, target: _BatchNorm) -> _BatchNorm:
    """Give ``target`` the parameters, buffers, hyper-parameters and mode of ``source``."""
    for name in ("weight", "bias"):
        param = getattr(source, name, None)
        if param is None:
            target.register_parameter(name, None)
        else:
            setattr(target, name, param)  # the same Parameter: requires_grad, optimizer state and sharing kept
    for name, buffer in source._buffers.items():
        target._buffers[name] = buffer
    target.momentum = source.momentum
    target.eps = source.eps
    target.affine = source.affine
    target.track_running_stats = source.track_running_stats
    target.training = source.training
    return target


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

    def validate(record: BNInfo) -> None:
        if record.kind in ("batchnorm", "sync", "lazy"):
            require_initialized(record)

    model, records = plan(model, modules, inplace, validate)
    warn_unsupported(records, "to_sync_bn")
    custom = [r.name for r in records if r.kind == "batchnorm" and type(r.module).forward not in _PLAIN_FORWARDS]
    if custom:
        import warnings

        warnings.warn(
            f"to_sync_bn left {len(custom)} BN subclass(es) with their own forward unsynchronised: "
            f"{', '.join(custom)} (converting them would drop what their forward adds)",
            BNDoctorWarning,
            stacklevel=2,
        )
    replacements = {}
    for record in records:
        module = record.module
        if record.kind not in ("batchnorm", "sync") or record.name in custom or isinstance(module, SyncBatchNorm):
            continue
        new = SyncBatchNorm(int(record.num_features or 0), process_group=process_group)
        _move_state(module, new)
        new._bndoctor_source_class = type(module)
        replacements[id(module)] = (module, new)
    return replace_modules(model, replacements)


def from_sync_bn(model: nn.Module, *, dims: int | None = None, inplace: bool = False) -> nn.Module:
    """Turn bndoctor's and torch's SyncBatchNorm layers back into BatchNorm1d/2d/3d.

    A layer made by :func:`to_sync_bn` becomes its original class again, with
    every field (lossless round trip). Other SyncBatchNorm layers (built
    directly, or torch's) need ``dims=1, 2 or 3`` to pick the class.
    """
    if dims is not None and dims not in _DIMS_TO_CLASS:
        raise BNDoctorError(f"expected dims=1, 2 or 3 (got {dims!r})", hint="2 for images (N, C, H, W)")
    model, records = plan(model, None, inplace)
    replacements = {}
    for record in records:
        module = record.module
        if not isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
            continue
        cls = getattr(module, "_bndoctor_source_class", None)
        if cls is None or cls is nn.SyncBatchNorm:
            if dims is None:
                raise BNDoctorError(
                    f"'{record.name}' is a SyncBatchNorm with no remembered BatchNorm class",
                    hint="pass dims=1, 2 or 3 (e.g. dims=2 for BatchNorm2d)",
                )
            cls = _DIMS_TO_CLASS[dims]
        new = cls(int(record.num_features or 0))
        _move_state(module, new)
        replacements[id(module)] = (module, new)
    return replace_modules(model, replacements)

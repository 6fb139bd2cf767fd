"""Module surgery on BatchNorm layers: freeze, unfreeze and convert to GroupNorm-style layers.

All functions follow the same contract:

* they work on a deep copy of ``model`` unless ``inplace=True``;
* they return the root module (a new object when the root itself is a BN that
  was replaced);
* ``modules=`` limits the change to part of the model (qualified names,
  prefixes such as ``"backbone"``, glob patterns such as ``"layer3.*.bn2"``,
  or a predicate ``(name, module) -> bool``); a name that selects nothing is
  an error;
* device, dtype, ``requires_grad`` and training flags are kept, and a module
  shared between several paths is converted once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._walk import (
    BNInfo,
    ModuleSelection,
    has_plain_forward,
    plan,
    replace_modules,
    require_initialized,
    require_running_stats,
    warn_unsupported,
)
from .errors import BNDoctorError, BNDoctorWarning, GroupCountError
from .layers.frozen import FreezeState, frozen_class_for, is_bndoctor_frozen

__all__ = ["convert_bn", "default_num_groups", "freeze_bn", "unfreeze_bn"]

NormTarget = Literal["group", "layer", "instance"]
GroupCount = int | Callable[[int], int] | None

_AFFINE = ("weight", "bias")


# --------------------------------------------------------------------------- freeze


def freeze_bn(
    model: nn.Module,
    *,
    affine: bool = False,
    modules: ModuleSelection = None,
    inplace: bool = False,
) -> nn.Module:
    """Make BN layers normalise with their running statistics, whatever the model's mode.

    After ``freeze_bn``, ``model.train()`` no longer switches the selected
    layers to batch statistics and their running statistics never change —
    the standard remedy when fine-tuning a pretrained model at a small
    physical batch. With ``affine=True`` the scale and shift (γ, β) are frozen
    too (``requires_grad=False``); by default they stay trainable.

    Layers that are already frozen (by bndoctor or third-party
    ``FrozenBatchNorm2d`` classes) are left as they are, except that
    ``affine=True`` also freezes the affine of bndoctor-frozen layers.
    :func:`unfreeze_bn` undoes this exactly.

    Raises :class:`~bndoctor.errors.MissingRunningStatsError` for a selected
    layer with ``track_running_stats=False`` and
    :class:`~bndoctor.errors.UninitializedLayerError` for a lazy layer that
    has not run yet.

    >>> import torch.nn as nn
    >>> net = freeze_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).train()
    >>> net[1].training
    False
    """

    def validate(record: BNInfo) -> None:
        if record.kind in ("batchnorm", "sync", "lazy"):
            require_running_stats(record, "freeze_bn")

    model, records = plan(model, modules, inplace, validate)
    warn_unsupported(records, "freeze_bn")
    for record in records:
        if record.kind not in ("batchnorm", "sync", "frozen"):
            continue
        module = record.module
        if record.kind == "frozen" and not is_bndoctor_frozen(module):
            continue  # a third-party frozen BN: already uses running statistics
        if not is_bndoctor_frozen(module):
            state = FreezeState(
                original_class=type(module),
                requires_grad={n: p.requires_grad for n in _AFFINE if (p := getattr(module, n, None)) is not None},
                requested_training=module.training,
            )
            module.__class__ = frozen_class_for(type(module))
            module._bndoctor_freeze = state  # type: ignore[assignment]
            module.training = False
        if affine:
            module._bndoctor_freeze.affine_frozen = True  # type: ignore[union-attr]
            for name in _AFFINE:
                param = getattr(module, name, None)
                if param is not None:
                    param.requires_grad_(False)
    return model


def unfreeze_bn(
    model: nn.Module,
    *,
    modules: ModuleSelection = None,
    inplace: bool = False,
) -> nn.Module:
    """Undo :func:`freeze_bn`: restore each frozen layer's class, requires_grad and mode.

    The round trip is lossless: ``unfreeze_bn(freeze_bn(m))`` has the same
    classes, state_dict, ``momentum``, ``eps``, ``affine``,
    ``track_running_stats``, ``num_batches_tracked`` and ``requires_grad`` as
    ``m``. Each layer's training flag becomes the mode the model last asked
    for (``model.train()`` / ``model.eval()`` while frozen), or the layer's
    mode at freeze time if none was asked for.

    Third-party frozen classes (torchvision/detectron2 ``FrozenBatchNorm2d``)
    have no original class to return to and are left as they are.
    """
    model, records = plan(model, modules, inplace)
    for record in records:
        module = record.module
        if not is_bndoctor_frozen(module):
            continue
        state: FreezeState = module._bndoctor_freeze  # type: ignore[assignment]
        module.__class__ = state.original_class
        del module._bndoctor_freeze
        for name, flag in state.requires_grad.items():
            param = getattr(module, name, None)
            if param is not None:
                param.requires_grad_(flag)
        module.training = state.requested_training
    return model


# --------------------------------------------------------------------------- convert


def transfer_bn_state(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give BN ``target`` the parameters, buffers, hyper-parameters and mode of BN ``source``.

    The Parameter objects themselves move, so requires_grad, sharing and any
    optimizer state keyed by them carry over.
    """
    for name in _AFFINE:
        param = getattr(source, name, None)
        if param is None:
            target.register_parameter(name, None)
        else:
            setattr(target, name, param)
    for name, buffer in source._buffers.items():
        target._buffers[name] = buffer
    for attr in ("momentum", "eps", "affine", "track_running_stats", "training"):
        setattr(target, attr, getattr(source, attr))
    return target


def default_num_groups(num_channels: int, *, max_groups: int = 32, min_group_size: int = 4) -> int:
    """The group count bndoctor uses for ``num_channels``.

    The largest divisor of ``num_channels`` that is at most ``max_groups`` and
    leaves at least ``min_group_size`` channels per group; 1 when no divisor
    does (fewer than ``min_group_size`` channels). Unlike ``gcd(32, C)`` this
    never gives one-channel groups for small C (e.g. C=4 -> 1 group, not 4).

    >>> [default_num_groups(c) for c in (4, 24, 48, 64, 256, 13)]
    [1, 6, 12, 16, 32, 1]
    """
    if num_channels < 1:
        raise BNDoctorError(
            f"expected a positive number of channels (got {num_channels})",
            hint="this layer has no features to normalise",
        )
    limit = min(max_groups, num_channels // min_group_size)
    for groups in range(max(limit, 1), 0, -1):
        if num_channels % groups == 0:
            return groups
    return 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _group_count(record: BNInfo, to: NormTarget, num_groups: GroupCount) -> int:
    channels = int(record.num_features or 0)
    if to == "layer":
        return 1
    if to == "instance":
        return channels
    if num_groups is None:
        return default_num_groups(channels)
    groups = num_groups(channels) if callable(num_groups) else num_groups
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise GroupCountError(
            f"expected num_groups to be an int (got {type(groups).__name__} for '{record.name}')",
            hint="pass an int, a callable channels -> int, or None to let bndoctor choose",
        )
    if groups < 1 or channels % groups:
        valid = ", ".join(str(d) for d in _divisors(channels))
        raise GroupCountError(
            f"num_groups={groups} does not divide the {channels} channels of '{record.name}'",
            hint=f"pass one of {valid}, or num_groups=None to let bndoctor choose",
        )
    return groups


def _affine_tensors(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return getattr(module, "weight", None), getattr(module, "bias", None)


def _to_group_norm(record: BNInfo, groups: int) -> nn.GroupNorm:
    module = record.module
    weight, bias = _affine_tensors(module)
    reference = weight if weight is not None else module.get_buffer("running_mean")
    norm = nn.GroupNorm(
        groups,
        int(record.num_features or 0),
        eps=record.eps,
        affine=weight is not None,
        device=reference.device,
        dtype=reference.dtype,
    )
    with torch.no_grad():
        for name, source in (("weight", weight), ("bias", bias)):
            if source is None:
                if weight is not None:  # affine with no bias (torch >= 2.13 `bias=False`)
                    norm.register_parameter(name, None)
                continue
            target = getattr(norm, name)
            target.copy_(source)
            target.requires_grad_(source.requires_grad if isinstance(source, nn.Parameter) else True)
    norm.train(record.training if not record.frozen else _requested_mode(module))
    return norm


def _requested_mode(module: nn.Module) -> bool:
    state = getattr(module, "_bndoctor_freeze", None)
    return state.requested_training if state is not None else module.training


def convert_bn(
    model: nn.Module,
    to: NormTarget = "group",
    *,
    num_groups: GroupCount = None,
    modules: ModuleSelection = None,
    inplace: bool = False,
) -> nn.Module:
    """Replace BN layers by batch-independent normalisation, transferring the affine.

    ``to="group"``: ``nn.GroupNorm(G, C)``; ``G`` is ``num_groups`` (an int or
    a callable ``channels -> groups``) or, by default,
    :func:`default_num_groups` — at most 32 groups and, where possible, at
    least 4 channels per group. ``to="layer"``: ``GroupNorm(1, C)``, which
    normalises each sample over all channels and positions (the LayerNorm
    variant of the Group Normalization paper, Wu & He 2018). ``to="instance"``:
    ``GroupNorm(C, C)``, InstanceNorm's math with a per-channel affine, for any
    input rank (a ``(N, C)`` input has nothing to normalise over per channel,
    so do not use it after ``Linear``).

    γ and β are copied (``requires_grad`` kept); running statistics are
    dropped because the new layers do not use them, so outputs change and the
    model needs training or fine-tuning afterwards. Works for BN 1d/2d/3d and
    SyncBatchNorm, bndoctor-frozen and third-party frozen BN.

    Raises :class:`~bndoctor.errors.GroupCountError` when ``num_groups`` does
    not divide a layer's channels (the message lists the valid values).
    """
    if to not in ("group", "layer", "instance"):
        raise BNDoctorError(
            f"expected to='group', 'layer' or 'instance' (got {to!r})",
            hint="GroupNorm: 'group'; one group (LayerNorm-like): 'layer'; "
            "one channel per group (InstanceNorm-like): 'instance'",
        )
    if to != "group" and num_groups is not None:
        raise GroupCountError(
            f"num_groups applies to to='group' only (got num_groups={num_groups!r} with to={to!r})",
            hint="drop num_groups, or use to='group'",
        )

    def validate(record: BNInfo) -> None:
        if record.kind != "bn-like":
            require_initialized(record)
            _group_count(record, to, num_groups)

    model, records = plan(model, modules, inplace, validate)
    warn_unsupported(records, "convert_bn")
    targets = [r for r in records if r.kind != "bn-like"]
    groups = {r.name: _group_count(r, to, num_groups) for r in targets}
    replacements = {id(r.module): (r.module, _to_group_norm(r, groups[r.name])) for r in targets}
    return replace_modules(model, replacements)


# --------------------------------------------------------------------------- class swaps (SyncBN, AccumBN)

_DIMS_TO_CLASS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def swap_bn_layers(
    model: nn.Module,
    make: Callable[[BNInfo], _BatchNorm],
    *,
    modules: ModuleSelection,
    inplace: bool,
    operation: str,
) -> nn.Module:
    """Replace trainable BN layers by ``make(record)``, moving their state and remembering their class.

    Frozen layers are left alone (they do not use batch statistics), and so are
    BN subclasses with their own forward (a warning names them).
    """

    def validate(record: BNInfo) -> None:
        if record.kind in ("batchnorm", "sync", "lazy"):
            require_initialized(record)

    model, records = plan(model, modules, inplace, validate)
    warn_unsupported(records, operation)
    custom = [r.name for r in records if r.kind == "batchnorm" and not has_plain_forward(r.module)]
    if custom:
        warnings.warn(
            f"{operation} left {len(custom)} BN subclass(es) with their own forward unchanged: "
            f"{', '.join(custom)} (converting them would drop what their forward adds)",
            BNDoctorWarning,
            stacklevel=3,
        )
    replacements = {}
    for record in records:
        if record.kind not in ("batchnorm", "sync") or record.name in custom:
            continue
        new = make(record)
        if type(new) is type(record.module):
            continue
        transfer_bn_state(record.module, new)
        new._bndoctor_source_class = type(record.module)  # type: ignore[assignment]
        replacements[id(record.module)] = (record.module, new)
    return replace_modules(model, replacements)


def revert_bn(model: nn.Module, classes: tuple[type, ...], *, dims: int | None, inplace: bool) -> nn.Module:
    """Replace layers of ``classes`` by the BatchNorm class they were converted from (or ``dims``)."""
    if dims is not None and dims not in _DIMS_TO_CLASS:
        raise BNDoctorError(f"expected dims=1, 2 or 3 (got {dims!r})", hint="2 for images (N, C, H, W)")
    model, records = plan(model, None, inplace, validate=_require_closed_window)
    replacements = {}
    for record in records:
        module = record.module
        if not isinstance(module, classes):
            continue
        cls = getattr(module, "_bndoctor_source_class", None)
        if cls is None or cls is nn.SyncBatchNorm:
            if dims is None:
                raise BNDoctorError(
                    f"'{record.name}' is a {type(module).__name__} with no remembered BatchNorm class",
                    hint="pass dims=1, 2 or 3 (e.g. dims=2 for BatchNorm2d)",
                )
            cls = _DIMS_TO_CLASS[dims]
        new = cls(int(record.num_features or 0))
        transfer_bn_state(module, new)
        replacements[id(module)] = (module, new)
    return replace_modules(model, replacements)


def _require_closed_window(record: BNInfo) -> None:
    if getattr(record.module, "window_open", False):
        raise BNDoctorError(
            f"'{record.name}' has an accumulation window open (statistics of micro-batches not yet committed)",
            hint="call optimizer.step() (with accumulate_bn attached) or leave the accumulation_window block first",
        )

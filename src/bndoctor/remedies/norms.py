"""Replace BN by batch-independent normalisation (GroupNorm, its LayerNorm and InstanceNorm forms).

The remedy for training from scratch at a tiny batch on one device: the
normalisation no longer depends on the other samples. The affine moves over;
running statistics are dropped (the new layers do not use them). Also
registers the ``convert_bn`` fixer and its prescription.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn

from .._walk import (
    BNInfo,
    ModuleSelection,
    plan,
    replace_modules,
    require_initialized,
    warn_left_alone,
    warn_unsupported,
)
from ..errors import BNDoctorError, GroupCountError
from ..families import normalises_then_post_ops
from ..findings import Action
from ..layers import GroupNormAct, post_ops
from ..training import TrainingSetup
from ._registry import FixStep, Prescription, Remedy, register_remedy

__all__ = ["GroupCount", "NormTarget", "convert_bn", "default_num_groups"]

NormTarget = Literal["group", "layer", "instance"]
GroupCount = int | Callable[[int], int] | None


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
    if isinstance(groups, bool) or not isinstance(groups, int):  # a range error gets its own message below
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
    tail = post_ops(module)
    norm = (GroupNormAct if tail else nn.GroupNorm)(
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
    for name, child in tail.items():  # a norm+activation layer keeps its dropout and activation
        norm.add_module(name, child)
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

    A norm+activation layer (timm's ``BatchNormAct2d``) becomes a
    :class:`bndoctor.layers.GroupNormAct` that keeps its dropout and
    activation; a BN subclass whose forward bndoctor does not know is left
    as it is, with a warning. γ and β are copied (``requires_grad`` kept);
    running statistics are dropped because the new layers do not use them, so
    outputs change and the model needs training or fine-tuning afterwards.
    Works for BN 1d/2d/3d and SyncBatchNorm, bndoctor-frozen and third-party
    frozen BN.

    Args:
        model: the model.
        to: ``"group"``: ``nn.GroupNorm(G, C)``. ``"layer"``: ``GroupNorm(1, C)``, which normalises each
            sample over all channels and positions (the LayerNorm variant of the Group Normalization paper,
            Wu & He 2018). ``"instance"``: ``GroupNorm(C, C)``, InstanceNorm's math with a per-channel affine,
            for any input rank (a ``(N, C)`` input has nothing to normalise over per channel, so do not use
            it after ``Linear``).
        num_groups: ``G`` for ``to="group"``: an int, or a callable ``channels -> groups``; by default
            :func:`default_num_groups` (at most 32 groups and, where possible, at least 4 channels per group).
        modules: the layers to convert; default: all.
        inplace: change ``model`` itself; by default a copy is changed.

    Returns:
        The model's root (a new object unless ``inplace=True``, or when the root itself is converted).

    Raises:
        GroupCountError: ``num_groups`` does not divide a layer's channels (the message lists the valid
            values).
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
        if not record.opaque:
            require_initialized(record)
            _group_count(record, to, num_groups)

    model, records = plan(model, modules, inplace, validate)
    warn_unsupported(records, "convert_bn")
    targets = [r for r in records if r.supported and normalises_then_post_ops(r.module)]
    warn_left_alone([r for r in records if r.supported and not normalises_then_post_ops(r.module)], "convert_bn")
    groups = {r.name: _group_count(r, to, num_groups) for r in targets}
    replacements = {id(r.module): (r.module, _to_group_norm(r, groups[r.name])) for r in targets}
    return replace_modules(model, replacements)


def _fix(step: FixStep) -> nn.Module:
    return step.apply("convert_bn", lambda m: convert_bn(m, "group", modules=step.selection, inplace=True))


def _prescribe(setup: TrainingSetup) -> Prescription | None:
    if setup.finetune:
        return None  # GroupNorm throws the pretrained statistics away: freeze instead
    return Prescription(
        "GroupNorm does not depend on the batch: model = bndoctor.convert_bn(model, 'group')", Action("convert_bn")
    )


register_remedy(Remedy("convert_bn", fix=_fix, order=80, prescribe=_prescribe))

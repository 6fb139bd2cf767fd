"""The registry of BatchNorm-like layer families: how the walker recognises a layer and what it may do with it.

A family is a predicate on a module plus what bndoctor may assume about its
members. :func:`family_of` tries the registered families in order and returns
the first that matches; the walker (:func:`bndoctor.find_bn`) builds its
records from it, and every remedy asks the record's flags instead of comparing
kind strings. Third-party classes are recognised by behaviour (their buffers,
their forward), never imported.

The built-in families, in the order they are tried:

========================  ==========  =============================================================
family                    kind        members
========================  ==========  =============================================================
``lazy``                  lazy        uninitialised ``LazyBatchNorm*`` (shape unknown: unsupported)
``bndoctor-frozen``       frozen      layers frozen by :func:`bndoctor.freeze_bn`
``norm-act-sync``         sync        a ``SyncBatchNorm`` subclass that applies ``drop``/``act``
                                      children after normalising (timm's ``SyncBatchNormAct``)
``sync``                  sync        torch's ``SyncBatchNorm`` and bndoctor's
``bndoctor-norm-act``     batchnorm   bndoctor's ``BatchNormAct`` (plain BN + ``drop``/``act``)
``bndoctor-remedy``       batchnorm   bndoctor's own remedy layers (AccumBatchNorm, BatchRenorm)
``norm-act``              batchnorm   a ``_BatchNorm`` subclass that applies ``drop``/``act``
                                      children after normalising (timm's ``BatchNormAct2d``)
``torch``                 batchnorm   ``_BatchNorm`` subclasses whose forward is torch's own
``custom-forward``        batchnorm   other ``_BatchNorm`` subclasses with a forward of their own
``frozen-by-behaviour``   frozen      running statistics *and* affine as buffers, no parameters
                                      (torchvision/detectron2/transformers ``FrozenBatchNorm2d``,
                                      timm's ``FrozenBatchNormAct2d`` with its ``act``)
``bn-like``               bn-like     running statistics next to parameters, not a ``_BatchNorm``
                                      (OpenMMLab's ``MMSyncBN``): found, never converted
========================  ==========  =============================================================

A *norm+activation* layer is recognised by timm's contract: a BN subclass
with a forward of its own and an ``act`` child module (and optionally
``drop``), applied as ``act(drop(bn(x)))``. Remedies keep those children:
class swaps move them into the new layer (bndoctor's layers apply them, see
:data:`bndoctor.layers.POST_OPS`), ``convert_bn`` makes a
:class:`bndoctor.layers.GroupNormAct`, and ``fold_bn`` leaves them after the
folded conv.

Add a family with :func:`register_family` (``before="torch"`` to take
precedence over a built-in one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ._registry import require_new
from .errors import BNDoctorError
from .layers import POST_OPS, BatchNormAct, BNDoctorLayer, SyncBatchNorm, is_bndoctor_frozen

__all__ = [
    "FAMILIES",
    "BNKind",
    "Family",
    "family_of",
    "has_plain_forward",
    "has_post_ops",
    "normalises_then_post_ops",
    "register_family",
]

BNKind = Literal["batchnorm", "sync", "frozen", "lazy", "bn-like"]


@dataclass(frozen=True)
class Family:
    """A family of BN-like layers.

    ``name`` identifies it in the registry; ``matches(module) -> bool`` says
    whether a module belongs; ``lazy``: members have uninitialised
    parameters until their first forward. ``kind`` is what :func:`bndoctor.find_bn` reports. ``swappable``: a remedy
    that replaces the class (SyncBN, accumulation-aware BN, Batch Renorm) may
    convert members without losing behaviour. ``frozen``: members normalise
    with running statistics in every mode. ``supported=False`` members are
    found and reported (with ``reason``) but never converted. ``torch_bn``:
    members subclass torch's ``_BatchNorm``, so their hyper-parameters are
    read from their attributes (else from their buffers).
    """

    name: str
    kind: BNKind
    matches: Callable[[nn.Module], bool]
    torch_bn: bool = True
    swappable: bool = False
    frozen: bool = False
    supported: bool = True
    lazy: bool = False
    reason: str = ""


def has_plain_forward(module: nn.Module) -> bool:
    """Whether a BN layer's forward is torch's own (a subclass such as BatchNormAct2d adds more)."""
    return type(module).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def has_post_ops(module: nn.Module) -> bool:
    """Whether the module holds an ``act`` child (the norm+activation contract; ``drop`` is optional)."""
    return isinstance(module._modules.get("act"), nn.Module)


def normalises_then_post_ops(module: nn.Module) -> bool:
    """Whether the module's forward is known: BatchNorm (or a frozen affine map), then ``drop``/``act`` if present.

    True for torch's own forward, bndoctor's layers, norm+activation layers and
    frozen-by-behaviour layers; False for a BN subclass with a forward nobody
    described (bndoctor cannot tell what converting or folding it would lose).
    """
    if isinstance(module, BNDoctorLayer) or has_plain_forward(module):
        return True
    if isinstance(module, _BatchNorm):
        return has_post_ops(module)
    return _frozen_by_behaviour(module)


def _norm_act(module: nn.Module) -> bool:
    return (
        isinstance(module, _BatchNorm)
        and not isinstance(module, BNDoctorLayer)
        and not has_plain_forward(module)
        and has_post_ops(module)
    )


def _is_uninitialized(module: nn.Module) -> bool:
    has_uninit = getattr(module, "has_uninitialized_params", None)
    return bool(has_uninit()) if callable(has_uninit) else False


def _has_running_buffers(module: nn.Module) -> bool:
    buffers = module._buffers
    return buffers.get("running_mean") is not None and buffers.get("running_var") is not None


def _frozen_by_behaviour(module: nn.Module) -> bool:
    buffers = module._buffers
    own_params = any(p is not None for p in module._parameters.values())
    return (
        _has_running_buffers(module)
        and buffers.get("weight") is not None
        and buffers.get("bias") is not None
        and not own_params
        and set(module._modules) <= set(POST_OPS)  # nothing else runs inside it but a dropout and an activation
    )


def _bn(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm)


FAMILIES: list[Family] = [
    Family(
        "lazy",
        "lazy",
        lambda m: _bn(m) and _is_uninitialized(m),
        supported=False,
        lazy=True,
        reason="lazy layer not initialised yet; run one forward pass first",
    ),
    Family("bndoctor-frozen", "frozen", lambda m: _bn(m) and is_bndoctor_frozen(m), frozen=True),
    Family("norm-act-sync", "sync", lambda m: isinstance(m, nn.SyncBatchNorm) and _norm_act(m), swappable=True),
    Family(
        "sync",
        "sync",
        lambda m: isinstance(m, SyncBatchNorm) or (isinstance(m, nn.SyncBatchNorm) and has_plain_forward(m)),
        swappable=True,
    ),
    Family("bndoctor-norm-act", "batchnorm", lambda m: isinstance(m, BatchNormAct), swappable=True),
    Family(
        "bndoctor-remedy",
        "batchnorm",
        lambda m: _bn(m) and isinstance(m, BNDoctorLayer),
        reason="already a bndoctor remedy layer; turn it back into BatchNorm with its from_... function first",
    ),
    Family("norm-act", "batchnorm", _norm_act, swappable=True),
    Family("torch", "batchnorm", lambda m: _bn(m) and has_plain_forward(m), swappable=True),
    Family(
        "custom-forward",
        "batchnorm",
        _bn,
        reason=(
            "a BN subclass with its own forward that bndoctor does not know; converting it would drop what "
            "its forward adds (freeze it with freeze_bn, or register a layer family for it)"
        ),
    ),
    Family("frozen-by-behaviour", "frozen", _frozen_by_behaviour, torch_bn=False, frozen=True),
    Family(
        "bn-like",
        "bn-like",
        _has_running_buffers,
        torch_bn=False,
        supported=False,
        reason=(
            "has running statistics but does not subclass torch.nn.BatchNorm "
            "(_BatchNorm), so bndoctor cannot tell how its forward uses them; "
            "convert it to a torch BatchNorm class first"
        ),
    ),
]

#: Classes that hold running statistics but are not BatchNorm (InstanceNorm with track_running_stats).
NOT_BN: tuple[type, ...] = (_InstanceNorm,)


def family_of(module: nn.Module) -> Family | None:
    """The first registered family ``module`` belongs to, or ``None`` when it is not BN-like."""
    if isinstance(module, NOT_BN):
        return None
    for family in FAMILIES:
        if family.matches(module):
            return family
    return None


def register_family(family: Family, *, before: str | None = None, replace: bool = False) -> Family:
    """Add a layer family; it is tried before the family named ``before`` (default: before ``bn-like``).

    ``replace=True`` redefines a family of the same name in place.
    """
    if not isinstance(family, Family):
        raise BNDoctorError(
            f"expected a bndoctor.families.Family (got {type(family).__name__})",
            hint="Family(name, kind, matches=lambda module: ...)",
        )
    names = [f.name for f in FAMILIES]
    require_new(family.name in names, "a layer family named", family.name, replace=replace)
    if family.name in names:
        FAMILIES[names.index(family.name)] = family
        return family
    anchor = before or "bn-like"
    if anchor not in names:
        raise BNDoctorError(
            f"no layer family named {anchor!r} to insert before (families: {', '.join(names)})",
            hint="pass before= one of the registered names",
        )
    FAMILIES.insert(names.index(anchor), family)
    return family

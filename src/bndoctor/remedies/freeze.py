"""Freeze BN statistics (and optionally the affine) for fine-tuning, and undo it losslessly.

A frozen layer keeps its object, parameters, buffers and state_dict keys; its
class is swapped for a frozen subclass (:mod:`bndoctor.layers.frozen`) that
pins ``training`` to ``False``, so ``model.train()`` cannot switch it back to
batch statistics. Also registers the ``freeze_bn`` fixer and prescription
(fine-tuning a pretrained model at a small batch: freeze its statistics).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .._walk import BNInfo, ModuleSelection, plan, replace_modules, require_running_stats, warn_unsupported
from ..families import has_post_ops
from ..findings import Action
from ..layers import BatchNormAct, post_ops
from ..layers.frozen import FreezeState, frozen_class_for, is_bndoctor_frozen
from ..training import TrainingSetup
from ._registry import FixStep, Prescription, Remedy, register_remedy
from ._swap import bn_class

__all__ = ["freeze_bn", "unfreeze_bn"]

_AFFINE = ("weight", "bias")


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
    physical batch. Layers that are already frozen (by bndoctor or third-party
    ``FrozenBatchNorm2d`` classes) are left as they are, except that
    ``affine=True`` also freezes the affine of bndoctor-frozen layers.
    :func:`unfreeze_bn` undoes this exactly.

    Args:
        model: the model (any module tree).
        affine: also freeze the scale and shift (γ, β: ``requires_grad=False``); by default they stay
            trainable.
        modules: the layers to freeze (names, patterns or a predicate); default: all.
        inplace: change ``model`` itself; by default a copy is changed.

    Returns:
        The model's root (a new object unless ``inplace=True``).

    Raises:
        MissingRunningStatsError: a selected layer has ``track_running_stats=False``.
        UninitializedLayerError: a selected lazy layer has not run yet.

    >>> import torch.nn as nn
    >>> net = freeze_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).train()
    >>> net[1].training
    False
    """

    def validate(record: BNInfo) -> None:
        if (record.supported and not record.frozen) or record.lazy:
            require_running_stats(record, "freeze_bn")

    model, records = plan(model, modules, inplace, validate)
    warn_unsupported(records, "freeze_bn")
    for record in records:
        module = record.module
        if not record.supported or (record.frozen and not is_bndoctor_frozen(module)):
            continue  # BN-like layers; third-party frozen BN already uses running statistics
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
    third_party: bool = False,
    dims: int = 2,
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

    Args:
        model: the model.
        third_party: also turn third-party frozen classes (torchvision/detectron2/DETR
            ``FrozenBatchNorm2d``), which have no original class to return to, into trainable
            ``BatchNorm{dims}d`` (a :class:`bndoctor.layers.BatchNormAct` when they have an activation, as
            timm's ``FrozenBatchNormAct2d``) with their statistics, their affine as trainable parameters and
            eps kept — for fine-tuning a detection backbone with BN that learns again. Build the optimizer
            after. By default they are left as they are.
        dims: the BatchNorm class for third-party layers: 1, 2 or 3.
        modules: the layers to unfreeze; default: all.
        inplace: change ``model`` itself; by default a copy is changed.

    Returns:
        The model's root (a new object unless ``inplace=True``).
    """
    if third_party:
        bn_class(dims)  # a bad dims is an error before anything changes
    model, records = plan(model, modules, inplace)
    replacements = {}
    for record in records:
        module = record.module
        if third_party and record.frozen and not is_bndoctor_frozen(module) and record.supported:
            replacements[id(module)] = (module, _trainable(record, dims))
            continue
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
    return replace_modules(model, replacements)


def _trainable(record: BNInfo, dims: int) -> nn.Module:
    """A trainable BN with a third-party frozen layer's statistics, affine, eps and activation."""
    module = record.module
    mean = module.get_buffer("running_mean")
    cls = BatchNormAct if has_post_ops(module) else bn_class(dims)
    new = cls(int(record.num_features or 0), eps=record.eps, device=mean.device, dtype=mean.dtype)
    with torch.no_grad():
        for name in ("running_mean", "running_var", *_AFFINE):
            getattr(new, name).copy_(module.get_buffer(name))
    for name, child in post_ops(module).items():
        new.add_module(name, child)
    new.train(module.training)
    return new


def _fix(step: FixStep) -> nn.Module:
    return step.apply("freeze_bn", lambda m: freeze_bn(m, modules=step.selection, inplace=True))


def _prescribe(setup: TrainingSetup) -> Prescription | None:
    if not setup.finetune:
        return None
    return Prescription(
        "freeze the BN statistics: model = bndoctor.freeze_bn(model) (with a large domain shift, "
        "then bndoctor.recalibrate(model, target_loader))",
        Action("freeze_bn"),
    )


register_remedy(Remedy("freeze_bn", fix=_fix, order=50, revert=unfreeze_bn, prescribe=_prescribe))

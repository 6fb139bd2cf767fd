"""Fold BatchNorm layers that run on running statistics into the layer before them.

A BN layer in eval mode (or frozen) is a fixed per-channel affine map,
``y = s * x + t`` with ``s = γ / sqrt(σ² + ε)`` and ``t = β - μ s``. When
its input is the output of a convolution or linear layer ``x = W * z + b``
that feeds nothing else, the two collapse into one layer with
``W' = s W`` (per output channel) and ``b' = s b + t`` — exact up to
rounding, and one fewer pass over the activations. The arithmetic is done in
float64 and cast back to the layer's dtype.

Which layer feeds which (:mod:`bndoctor._pairs`) is read from a forward
pass on ``example_input`` when one is given — any model that runs, including
those torch.fx cannot trace — else from a ``torch.fx`` trace, else from
neighbours in ``nn.Sequential``. It is used for analysis only: the returned
model keeps its own classes and structure; the folded BN becomes
``nn.Identity``, or, for a norm+activation layer (timm's ``BatchNormAct2d``),
a :class:`bndoctor.layers.PostOps` holding its own dropout and activation.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn as nn

from .._batches import Forward, default_forward
from .._pairs import ForwardPairs, find_pairs
from .._state import preserved
from .._walk import BNInfo, ModuleSelection, plan, replace_modules
from ..errors import BNDoctorWarning
from ..families import normalises_then_post_ops
from ..layers import PostOps, post_ops

__all__ = ["fold_bn"]


def _foldable(record: BNInfo) -> bool:
    # a BN subclass with a forward nobody described does more than BN: not folded
    return record.supported and not record.uses_batch_stats and normalises_then_post_ops(record.module)


def _why_not(record: BNInfo) -> str:
    if not record.track_running_stats:
        return "track_running_stats=False: no running statistics"
    if record.uses_batch_stats:
        return "in training mode and not frozen: call model.eval() or freeze_bn first"
    if not normalises_then_post_ops(record.module):
        return f"{type(record.module).__name__} has its own forward"
    return "not fed by a conv/linear whose output feeds only this layer"


def _what_remains(module: nn.Module) -> nn.Module:
    """What replaces a folded BN: nothing, or the dropout and activation of a norm+activation layer."""
    children = post_ops(module)
    return PostOps(**children) if children else nn.Identity()


def _out_channels(producer: nn.Module) -> int:
    if isinstance(producer, nn.Linear):
        return producer.out_features
    return producer.out_channels  # type: ignore[return-value]


def _find_pairs(
    model: nn.Module, bn_by_id: dict[int, BNInfo], example_input: Any, forward: Forward | None
) -> list[tuple[nn.Module, BNInfo]]:
    if example_input is not None:
        with preserved(model, model.modules()), torch.no_grad():  # modes and every buffer come back
            for module in model.modules():
                module.__dict__["training"] = False
            with ForwardPairs(model, bn_by_id) as recorder:
                (forward or default_forward)(model, example_input)
        return recorder.pairs()
    pairs, why = find_pairs(model, bn_by_id)
    if why:
        warnings.warn(
            f"fold_bn could not trace {type(model).__name__} with torch.fx ({why.splitlines()[0][:160]}); "
            "folding only conv/linear -> BN pairs that sit next to each other in nn.Sequential. Pass "
            "example_input=<a batch> to find every pair from a forward pass instead",
            BNDoctorWarning,
            stacklevel=3,
        )
    return pairs


def _scale_shift(record: BNInfo) -> tuple[torch.Tensor, torch.Tensor]:
    module = record.module
    mean = module.get_buffer("running_mean").detach().double()
    var = module.get_buffer("running_var").detach().double()
    scale = torch.rsqrt(var + record.eps)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if weight is not None:
        scale = scale * weight.detach().double()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.detach().double()
    return scale, shift


def _folded(producer: nn.Module, record: BNInfo) -> nn.Module:
    scale, shift = _scale_shift(record)
    new = copy.deepcopy(producer)
    weight = new.weight.detach().double()
    if isinstance(new, nn.Linear) or not getattr(new, "transposed", False):
        shape = (-1,) + (1,) * (weight.dim() - 1)
        folded_weight = weight * scale.to(weight.device).view(shape)
    else:  # ConvTranspose: weight is (in, out // groups, *kernel)
        groups = new.groups
        grouped = weight.view(groups, weight.shape[0] // groups, *weight.shape[1:])
        s = scale.to(weight.device).view(groups, 1, weight.shape[1], *(1,) * (weight.dim() - 2))
        folded_weight = (grouped * s).view_as(weight)
    old_bias = new.bias.detach().double() if new.bias is not None else torch.zeros_like(scale)
    folded_bias = old_bias.to(scale.device) * scale + shift
    with torch.no_grad():
        new.weight.copy_(folded_weight.to(new.weight.dtype))
        bias_param = nn.Parameter(
            folded_bias.to(device=new.weight.device, dtype=new.weight.dtype),
            requires_grad=new.weight.requires_grad,
        )
    new.bias = bias_param
    return new


def fold_bn(
    model: nn.Module,
    *,
    example_input: Any = None,
    forward: Forward | None = None,
    modules: ModuleSelection = None,
    inplace: bool = False,
) -> nn.Module:
    """Fold every BN that normalises with running statistics into the conv/linear before it.

    A BN layer is folded when it is in eval mode or frozen (see
    :func:`bndoctor.freeze_bn`), keeps running statistics, and its input is
    the output of a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear``
    whose output feeds nothing else. The BN is replaced by ``nn.Identity``
    (a norm+activation layer by its dropout and activation) and the producer
    by a copy with folded weight and bias; in eval mode the model computes the
    same function (allclose in float32). Use it for inference, or for
    fine-tuning with frozen statistics *and* affine (the producer then learns
    the product). Build the optimizer after folding: the folded layers have new
    parameters. Layers that cannot be folded are left in place and named in a
    :class:`~bndoctor.errors.BNDoctorWarning`.

    Args:
        model: the model.
        example_input: a batch (tensor, tuple with the input first, or dict of keyword arguments) that
            finds the pairs from one no-grad forward in eval mode, which works for models torch.fx cannot
            trace (transformers' vision models); modes and buffers are restored afterwards. Without it, a
            torch.fx trace is used, and for untraceable models only neighbours in ``nn.Sequential``.
        forward: ``forward(model, batch)``: how to feed ``example_input`` when it is something else.
        modules: the BN layers to fold; default: all.
        inplace: change ``model`` itself; by default a copy is changed.

    Returns:
        The model's root (a new object unless ``inplace=True``).
    """
    model, records = plan(model, modules, inplace)
    bn_by_id = {id(r.module): r for r in records if _foldable(r)}
    pairs = _find_pairs(model, bn_by_id, example_input, forward) if bn_by_id else []
    replacements: dict[int, tuple[nn.Module, nn.Module]] = {}
    for producer, record in pairs:
        if _out_channels(producer) != record.num_features:
            continue
        replacements[id(producer)] = (producer, _folded(producer, record))
        replacements[id(record.module)] = (record.module, _what_remains(record.module))
    left = [r for r in records if id(r.module) not in replacements and r.supported]
    if left:
        listed = "; ".join(f"'{r.name}' ({_why_not(r)})" for r in left[:10])
        warnings.warn(
            f"fold_bn left {len(left)} BN layer(s) unfolded: {listed}{' ...' if len(left) > 10 else ''}",
            BNDoctorWarning,
            stacklevel=2,
        )
    return replace_modules(model, replacements)

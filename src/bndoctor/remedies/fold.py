"""Fold BatchNorm layers that run on running statistics into the layer before them.

A BN layer in eval mode (or frozen) is a fixed per-channel affine map,
``y = s * x + t`` with ``s = γ / sqrt(σ² + ε)`` and ``t = β - μ s``. When
its input is the output of a convolution or linear layer ``x = W * z + b``
that feeds nothing else, the two collapse into one layer with
``W' = s W`` (per output channel) and ``b' = s b + t`` — exact up to
rounding, and one fewer pass over the activations. The arithmetic is done in
float64 and cast back to the layer's dtype.

Which layer feeds which is read from a ``torch.fx`` trace of the model (used
for analysis only: the returned model keeps its own classes and structure, the
folded BN becomes ``nn.Identity``). When the model cannot be traced, pairs
that sit next to each other in an ``nn.Sequential`` are folded instead.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._pairs import find_pairs
from .._walk import BNInfo, ModuleSelection, plan, replace_modules
from ..errors import BNDoctorWarning
from ..families import has_plain_forward

__all__ = ["fold_bn"]


def _foldable(record: BNInfo) -> bool:
    if not record.supported or record.uses_batch_stats:
        return False
    if isinstance(record.module, _BatchNorm):
        # a subclass with its own forward (timm's BatchNormAct2d) does more than BN
        return has_plain_forward(record.module)
    return True  # third-party frozen BN: a pure affine map


def _why_not(record: BNInfo) -> str:
    if not record.track_running_stats:
        return "track_running_stats=False: no running statistics"
    if record.uses_batch_stats:
        return "in training mode and not frozen: call model.eval() or freeze_bn first"
    if isinstance(record.module, _BatchNorm) and not has_plain_forward(record.module):
        return f"{type(record.module).__name__} has its own forward"
    return "not fed by a conv/linear whose output feeds only this layer"


def _out_channels(producer: nn.Module) -> int:
    if isinstance(producer, nn.Linear):
        return producer.out_features
    return producer.out_channels  # type: ignore[return-value]


def _find_pairs(model: nn.Module, bn_by_id: dict[int, BNInfo]) -> list[tuple[nn.Module, BNInfo]]:
    pairs, why = find_pairs(model, bn_by_id)
    if why:
        warnings.warn(
            f"fold_bn could not trace {type(model).__name__} with torch.fx ({why}); "
            "folding only conv/linear -> BN pairs that sit next to each other in nn.Sequential",
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


def fold_bn(model: nn.Module, *, modules: ModuleSelection = None, inplace: bool = False) -> nn.Module:
    """Fold every BN that normalises with running statistics into the conv/linear before it.

    A BN layer is folded when it is in eval mode or frozen (see
    :func:`bndoctor.freeze_bn`), keeps running statistics, and its input is
    the output of a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear``
    whose output feeds nothing else. The BN is replaced by ``nn.Identity``
    and the producer by a copy with folded weight and bias; in eval mode the
    model computes the same function (allclose in float32).

    Use it for inference, or for fine-tuning with frozen statistics *and*
    affine (the producer then learns the product). Build the optimizer after
    folding: the folded layers have new parameters. Layers that cannot be
    folded are left in place and named in a :class:`~bndoctor.errors.BNDoctorWarning`.
    """
    model, records = plan(model, modules, inplace)
    bn_by_id = {id(r.module): r for r in records if _foldable(r)}
    pairs = _find_pairs(model, bn_by_id) if bn_by_id else []
    replacements: dict[int, tuple[nn.Module, nn.Module]] = {}
    for producer, record in pairs:
        if _out_channels(producer) != record.num_features:
            continue
        replacements[id(producer)] = (producer, _folded(producer, record))
        replacements[id(record.module)] = (record.module, nn.Identity())
    left = [r for r in records if id(r.module) not in replacements and r.supported]
    if left:
        listed = "; ".join(f"'{r.name}' ({_why_not(r)})" for r in left[:10])
        warnings.warn(
            f"fold_bn left {len(left)} BN layer(s) unfolded: {listed}{' ...' if len(left) > 10 else ''}",
            BNDoctorWarning,
            stacklevel=2,
        )
    return replace_modules(model, replacements)

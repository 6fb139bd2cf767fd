"""Small exact repairs of a layer's configuration that ``check`` finds: redundant bias, half-precision
statistics, momentum. Each is a fixer in the remedy registry (no converter of its own).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._registry import FixStep, Remedy, register_remedy

__all__: list[str] = []


def drop_bias(model: nn.Module, producer_name: str, bn_name: str) -> bool:
    """Move the bias of ``producer_name`` into the running mean of the BN ``bn_name`` right after it.

    BN subtracts the batch mean, so a constant per-channel bias before it has no
    effect in training; in eval mode it is absorbed exactly by the running mean.
    Returns ``False`` when the producer has no bias (nothing to do).
    """
    producer, bn = model.get_submodule(producer_name), model.get_submodule(bn_name)
    bias = getattr(producer, "bias", None)
    if bias is None:
        return False
    with torch.no_grad():
        running = getattr(bn, "running_mean", None)
        if isinstance(running, torch.Tensor):
            running.sub_(bias.detach().to(running.dtype))
    producer.bias = None
    return True


def _fix_drop_bias(step: FixStep) -> nn.Module:
    for action in step.actions:
        producer_name, bn_name = action.modules
        if drop_bias(step.model, producer_name, bn_name):
            step.changes.append(f"drop_bias: {producer_name}.bias moved into {bn_name}.running_mean")
    return step.model


def _fix_float(step: FixStep) -> nn.Module:
    for layer in step.layers:
        step.model.get_submodule(layer).float()
    step.note("float_bn")
    return step.model


def _fix_momentum(step: FixStep) -> nn.Module:
    momentum = step.option("momentum", 0.1)
    for layer in step.layers:
        step.model.get_submodule(layer).momentum = momentum
    step.note("set_momentum")
    return step.model


register_remedy(Remedy("drop_bias", fix=_fix_drop_bias, order=10))
register_remedy(Remedy("float_bn", fix=_fix_float, order=20))
register_remedy(Remedy("set_momentum", fix=_fix_momentum, order=30))

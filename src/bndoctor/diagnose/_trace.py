"""Shapes without compute: one forward on meta tensors records what each norm layer receives.

The model's parameters and buffers are swapped for meta tensors of the same
shape in each module's own slots (the original objects are put back
afterwards, also when the forward raises), the input is a meta tensor, so a
ResNet-50 costs no arithmetic and no memory. Hooks record
each watched layer's input shape, and which conv/linear output feeds which
BN directly (tensor identity). Watched layers keep the shape of their input,
so during the trace they are replaced by a view of it: no meta kernel of
BatchNorm is needed (its first use costs about a second of imports).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .._pairs import PRODUCERS
from .._state import Patches

__all__ = ["Trace", "trace"]


@dataclass
class Trace:
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # first call of each watched layer
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (producer, norm) with nothing in between


def _to_meta(model: nn.Module) -> list[tuple[dict, str, object]]:
    """Put meta tensors of the same shape in every module's parameter and buffer slots; return the originals.

    Done per module object (a module shared by several paths is swapped once), so tied and shared tensors
    come back exactly as they were, as the same objects.
    """
    swapped: list[tuple[dict, str, object]] = []
    try:
        for module in model.modules():
            for slots, make in (
                (module._parameters, lambda t: nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad)),
                (module._buffers, lambda t: torch.empty_like(t, device="meta")),
            ):
                for name, tensor in list(slots.items()):
                    if tensor is not None:
                        swapped.append((slots, name, tensor))
                        slots[name] = make(tensor)
    except BaseException:
        _restore(swapped)
        raise
    return swapped


def _restore(swapped: list[tuple[dict, str, object]]) -> None:
    for slots, name, tensor in reversed(swapped):
        slots[name] = tensor


def trace(model: nn.Module, shape: tuple[int, ...], watched: dict[int, str], names: dict[int, str]) -> Trace:
    """Run ``model`` on a meta tensor of ``shape``; record the inputs of the modules in ``watched``.

    ``names`` maps ``id(module)`` to its qualified name (the caller has it already).
    """
    result = Trace()
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    handles = []

    def shape_keeping(module: nn.Module) -> object:
        name = watched[id(module)]

        def forward(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            if isinstance(x, torch.Tensor):
                result.input_shapes.setdefault(name, tuple(x.shape))
                source = outputs.get(id(x))
                if source is not None and source[1] is x:
                    result.pairs.append((source[0], name))
                return x.view_as(x)
            return x

        return forward

    def after(module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            outputs[id(output)] = (names.get(id(module), ""), output)  # the reference keeps the id unique

    patches = Patches()
    try:
        for module in model.modules():
            if id(module) in watched:
                patches.set(module, "forward", shape_keeping(module))
            elif isinstance(module, PRODUCERS):
                handles.append(module.register_forward_hook(after))
        swapped = _to_meta(model)
        try:
            with torch.no_grad():
                model(torch.empty(shape, device="meta"))
        finally:
            _restore(swapped)
    finally:
        for handle in handles:
            handle.remove()
        patches.undo()
    return result

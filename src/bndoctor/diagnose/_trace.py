"""Shapes without compute: one forward on meta tensors records what each norm layer receives.

The model's parameters and buffers are swapped for meta tensors of the same
shape in each module's own slots (the original objects are put back
afterwards, also when the forward raises), the input is a meta tensor, so a
ResNet-50 costs no arithmetic and no memory. Each watched layer's input
shape is recorded, and which conv/linear output feeds which BN and nothing
else (:class:`bndoctor._pairs.ForwardPairs`, the same rule fold uses). Watched layers keep the shape of their input,
so during the trace they are replaced by a view of it: no meta kernel of
BatchNorm is needed (its first use costs about a second of imports).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .._pairs import ForwardPairs
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

    def shape_keeping(module: nn.Module) -> object:
        name = watched[id(module)]

        def forward(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            if isinstance(x, torch.Tensor):
                result.input_shapes.setdefault(name, tuple(x.shape))
                return x.view_as(x)
            return x

        return forward

    patches = Patches()
    try:
        for module in model.modules():
            if id(module) in watched:
                patches.set(module, "forward", shape_keeping(module))
        swapped = _to_meta(model)
        try:
            # the pairs fold would fold: a producer's output that feeds the BN and nothing else
            with ForwardPairs(model, watched) as recorder, torch.no_grad():
                model(torch.empty(shape, device="meta"))
        finally:
            _restore(swapped)
    finally:
        patches.undo()
    result.pairs = [(names.get(id(producer), ""), name) for producer, name in recorder.pairs()]
    return result

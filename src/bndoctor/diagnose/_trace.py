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

__all__ = ["Trace", "TraceError", "trace"]


class TraceError(Exception):
    """The forward on meta tensors failed; ``module`` is the innermost module running (``""``: the root)."""

    def __init__(self, module: str, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}".splitlines()[0][:200])
        self.module = module
        self.cause = cause

    @property
    def shape_mismatch(self) -> bool:
        """The input's shape does not fit a layer (channels, sizes), as opposed to a model that cannot run on
        meta tensors at all (it reads tensor values: control flow, ``.item()``)."""
        text = str(self.cause).lower()
        if "meta" in text or "data-dependent" in text or "data dependent" in text:
            return False
        words = ("size", "shape", "channel", "dimension", "expected", "mismatch", "mat1", "must match", "kernel")
        return isinstance(self.cause, (RuntimeError, ValueError, IndexError)) and any(w in text for w in words)


class UninitializedModelError(Exception):
    """Lazy layers have no shapes yet, so there is nothing to put on the meta device; the model stays lazy."""


@dataclass
class Trace:
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # first call of each watched layer
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (producer, norm) with nothing in between


def _has_uninitialized(module: nn.Module) -> bool:
    """Whether ``module`` holds a lazy parameter or buffer that has not been materialised (torch's lazy modules)."""
    tensors = (*module._parameters.values(), *module._buffers.values())
    return any(isinstance(t, nn.parameter.UninitializedTensorMixin) for t in tensors)


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
    lazy = [names.get(id(m), "") for m in model.modules() if _has_uninitialized(m)]
    if lazy:
        cause = UninitializedModelError(
            f"lazy layer(s) {', '.join(repr(n) for n in lazy[:3])} have not run yet, so they have no shapes; run "
            "the model once on a real batch before tracing it"
        )
        raise TraceError(lazy[0], cause)

    def shape_keeping(module: nn.Module) -> object:
        name = watched[id(module)]

        def forward(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            if isinstance(x, torch.Tensor):
                result.input_shapes.setdefault(name, tuple(x.shape))
                return x.view_as(x)
            return x

        return forward

    patches = Patches()
    running: list[str] = []  # the modules whose forward is running, outermost first
    handles = []

    def leave(module: nn.Module, args: object, output: object) -> None:  # returns None: the output stays
        running.pop()

    try:
        for module in model.modules():
            name = names.get(id(module), "")
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: running.append(name)))
            handles.append(module.register_forward_hook(leave))
            if id(module) in watched:
                patches.set(module, "forward", shape_keeping(module))
        swapped = _to_meta(model)
        try:
            # the pairs fold would fold: a producer's output that feeds the BN and nothing else
            with ForwardPairs(model, watched) as recorder, torch.no_grad():
                model(torch.empty(shape, device="meta"))
        except Exception as exc:
            raise TraceError(running[-1] if running else "", exc) from exc
        finally:
            _restore(swapped)
    finally:
        for handle in handles:
            handle.remove()
        patches.undo()
    result.pairs = [(names.get(id(producer), ""), name) for producer, name in recorder.pairs()]
    return result

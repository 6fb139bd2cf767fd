"""Batches of any structure: how a batch is fed to a model, how many samples it holds, moving it.

Used by recalibration and by the two-pass accumulation window; ``forward(model, batch)``
callables of the user replace :func:`default_forward` wherever a batch is fed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from .errors import BNDoctorError

__all__ = ["Forward", "batch_size", "concat_batches", "default_forward", "model_device", "to_device"]

#: How a batch is fed: ``forward(model, batch)``.
Forward = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """A tensor is the input; a tuple/list holds the input first; a dict is passed as keyword arguments."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)) and batch:
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise BNDoctorError(
        f"cannot feed a batch of type {type(batch).__name__} to the model",
        hint="pass forward=lambda model, batch: model(...) to say how a batch is fed",
    )


def to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        size = batch_size(item)
        if size:
            return size
    return 0


def model_device(model: nn.Module) -> torch.device | None:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return None if tensor is None else tensor.device


def concat_batches(batches: list[Any]) -> Any:
    """One batch holding ``batches`` one after another: tensors joined along dimension 0, in any structure.

    Tuples, lists, namedtuples and dicts are joined element by element; any
    other value must be the same in every batch.
    """
    first = batches[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(b, torch.Tensor) and b.shape[1:] == first.shape[1:] for b in batches):
            found = {tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__ for b in batches}
            shapes = sorted(found, key=str)
            raise BNDoctorError(
                f"cannot join the window's micro-batches into one batch: tensors of shapes {shapes[:4]}",
                hint="the micro-batches of a window must share every dimension but the first",
            )
        return torch.cat(batches)
    if isinstance(first, Mapping) and all(isinstance(b, Mapping) and b.keys() == first.keys() for b in batches):
        return type(first)({k: concat_batches([b[k] for b in batches]) for k in first})  # type: ignore[call-arg]
    if isinstance(first, (list, tuple)) and all(
        type(b) is type(first) and len(b) == len(first)
        for b in batches  # type: ignore[arg-type]
    ):
        joined = [concat_batches([b[i] for b in batches]) for i in range(len(first))]
        return type(first)(*joined) if hasattr(first, "_fields") else type(first)(joined)
    if all(b == first for b in batches):
        return first
    raise BNDoctorError(
        f"cannot join the window's micro-batches into one batch: their {type(first).__name__} parts differ",
        hint="the micro-batches of a window must have the same structure (tensors, tuples, lists, dicts)",
    )

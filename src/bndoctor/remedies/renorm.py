"""Batch Renormalization (Ioffe 2017) as a remedy: convert BN layers to :class:`bndoctor.BatchRenorm` and back.

The small-batch baseline every other remedy is measured against. ``check``
does not prescribe it (accumulation-aware BN and SyncBN pool real samples
instead of correcting towards running statistics), so it registers no
prescription; ``fix`` can still apply it for a finding of your own with
``Action("to_batch_renorm")``.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .._walk import BNInfo, ModuleSelection, require_running_stats
from ..layers import BatchRenorm
from ._registry import FixStep, Remedy, register_remedy
from ._swap import revert_layers, swap_layers

__all__ = ["from_batch_renorm", "to_batch_renorm"]


def to_batch_renorm(
    model: nn.Module,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 5000,
    momentum: float = 0.01,
    modules: ModuleSelection = None,
    inplace: bool = False,
) -> nn.Module:
    """Replace trainable BN layers by :class:`bndoctor.BatchRenorm` (Ioffe 2017), a small-batch baseline.

    Args:
        model: the model.
        r_max: the final clipping limit of the correction factor r (scale).
        d_max: the final clipping limit of the correction d (shift). Both start at r=1, d=0 (plain BN) and
            ramp linearly to their limits over ``warmup_steps`` training forwards, as in the paper's schedule.
        warmup_steps: training forwards over which the limits ramp up.
        momentum: replaces the layers' momentum (Batch Renorm relies on slow, accurate running statistics;
            the paper uses 0.01).
        modules: the layers to convert; default: all.
        inplace: change ``model`` itself; by default a copy is changed.

    Returns:
        The model's root (a new object unless ``inplace=True``); :func:`bndoctor.from_batch_renorm` reverts it.
    """

    made: list[BatchRenorm] = []

    def make(record: Any) -> BatchRenorm:
        made.append(BatchRenorm(int(record.num_features or 0), r_max=r_max, d_max=d_max, warmup_steps=warmup_steps))
        return made[-1]

    def require(record: BNInfo) -> None:  # r and d are measured against the running statistics
        require_running_stats(record, "to_batch_renorm")

    converted = swap_layers(model, make, modules=modules, inplace=inplace, operation="to_batch_renorm", require=require)
    for layer in made:  # only the layers converted now: existing BatchRenorm layers keep theirs
        layer.momentum = momentum
    return converted


def from_batch_renorm(model: nn.Module, *, dims: int | None = None, inplace: bool = False) -> nn.Module:
    """Turn BatchRenorm layers back into the BatchNorm class they came from (momentum as it is now).

    Args:
        model: the model.
        dims: 1, 2 or 3: the BatchNorm class for layers built directly (not by :func:`to_batch_renorm`).
        inplace: change ``model`` itself; by default a copy is changed.

    Returns:
        The model's root (a new object unless ``inplace=True``).
    """
    return revert_layers(model, (BatchRenorm,), dims=dims, inplace=inplace)


def _fix(step: FixStep) -> nn.Module:
    warmup = step.option("warmup_steps")
    options = {} if warmup is None else {"warmup_steps": warmup}
    return step.apply("to_batch_renorm", lambda m: to_batch_renorm(m, modules=step.selection, inplace=True, **options))


register_remedy(Remedy("to_batch_renorm", fix=_fix, order=75, layer=BatchRenorm, revert=from_batch_renorm))

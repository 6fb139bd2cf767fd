"""Committing statistics to BatchNorm's running buffers: one EMA step, for one layer or many windows at once.

:func:`ema_step` is the step a layer takes after a forward (SyncBatchNorm).
:func:`commit_windows` commits accumulation windows, one step per window with
its pooled statistics, for any number of layers in a few operations: the
windows of layers that share a device, dtypes and momentum are concatenated,
each step of the arithmetic runs once for all of them, and only the writes to
the layers' own buffers loop (``torch._foreach_*``, which loops in C++ on CPU
and takes one kernel for several tensors on a GPU). A window with NaN or Inf,
or with no samples, is not committed; that is decided on the device, with no
host synchronisation.

Warm start (a window's ``warm_start``): window k is committed with the factor
``max(momentum, 1 / (1 + momentum (k - 1)))`` (k: the layer's committed windows,
``num_batches_tracked``), polynomial-decay averaging (Shamir & Zhang 2013) with
``eta = 1 / momentum - 1``. The first window replaces the initial values; after
k windows the running statistics weigh window j about as ``(j / k)^eta``, so
they average roughly the last ``momentum * k`` windows, a fixed share of the run
so far rather than all of it: early windows were computed with weights that
have moved since. The factor reaches ``momentum`` at about ``1 / momentum^2``
windows (91 for 0.1), where the plain EMA, with its horizon of ``1 / momentum``
windows, takes over continuously. A momentum of 0 (statistics never updated) is
never warm-started.
``warm_start=None`` is decided at a layer's first commit, on the
device: warm when ``num_batches_tracked`` is 0 and the running statistics
still hold their initial values (mean 0, variance 1), not for statistics
that were trained or loaded. The decision is kept on the device as the
layer's ``warm_decision`` (a 0-d bool tensor), so no commit reads the host.

A window is anything that answers :class:`Window`: accumulation-aware BN
(:class:`~bndoctor.layers.AccumBatchNorm`) does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["Window", "commit_windows", "ema_step"]


@torch.no_grad()
def ema_step(
    module: _BatchNorm, mean: torch.Tensor, unbiased_var: torch.Tensor, valid: torch.Tensor | None = None
) -> None:
    """``running = (1 - f) running + f stat`` with torch's rule for f (momentum, or 1/k when it is None).

    Args:
        module: the layer whose ``running_mean``, ``running_var`` and ``num_batches_tracked`` take the step.
        mean, unbiased_var: the statistics to step towards.
        valid: a 0-d bool tensor; when false (an all-empty global batch) the step is a no-op on the device,
            without a host synchronisation: neither the statistics nor ``num_batches_tracked`` change, and a
            NaN in ``mean`` cannot leak in.
    """
    tracked = module.num_batches_tracked
    tracked.add_(1 if valid is None else valid.to(tracked.dtype))  # type: ignore[union-attr]
    dtype = module.running_mean.dtype  # type: ignore[union-attr]
    # momentum None: the cumulative average, factor 1/k, computed on the device (no host read of the count)
    factor: Any = module.momentum if module.momentum is not None else tracked.clamp(min=1).to(dtype).reciprocal()  # type: ignore[union-attr]
    for running, stat in ((module.running_mean, mean), (module.running_var, unbiased_var)):
        stat = stat.to(dtype)
        if valid is not None:  # an invalid step leaves the statistics as they are (a NaN in stat cannot leak in)
            stat = torch.where(valid, stat, running)  # type: ignore[arg-type]
        running.lerp_(stat, factor)  # type: ignore[union-attr]


class Window(Protocol):
    """What :func:`commit_windows` needs of a layer with an accumulation window."""

    num_features: int
    momentum: float | None
    track_running_stats: bool
    warm_start: bool | None  # the layer's choice: always, never, or None (decided at the first commit)
    warm_decision: torch.Tensor | None  # set by commit_windows at the first commit
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None

    @property
    def window_open(self) -> bool: ...

    def window_parts(self) -> list[torch.Tensor]:
        """The window's count (shape 1), mean and sum of squared deviations (C each): the layer's own tensors."""
        ...

    def forget_window(self) -> None:
        """Mark the window empty, once its tensors are zero."""
        ...


@torch.no_grad()
def commit_windows(layers: Iterable[Window]) -> None:
    """Commit every layer's open window to its running statistics, then empty all windows.

    Layers without running statistics, or whose window is not open, only have their windows emptied.
    """
    groups: dict[tuple[Any, ...], list[Window]] = {}
    emptied: list[Window] = []
    for layer in layers:
        if layer.window_open and layer.track_running_stats and layer.running_mean is not None:
            window = layer.window_parts()[1]
            key = (window.device, window.dtype, layer.running_mean.dtype, layer.momentum)
            groups.setdefault(key, []).append(layer)
        else:
            emptied.append(layer)
    for (device, _, dtype, momentum), group in groups.items():
        _commit_group(group, device, dtype, momentum)
        emptied += group
    if emptied:
        torch._foreach_zero_([t for layer in emptied for t in layer.window_parts()])
        for layer in emptied:
            layer.forget_window()


def _decide_warm_start(layer: Window) -> torch.Tensor:
    """The layer's warm start as a 0-d bool tensor on its device, decided once (no host read)."""
    if layer.warm_decision is None:
        mean, var, tracked = layer.running_mean, layer.running_var, layer.num_batches_tracked
        if layer.warm_start is not None:
            layer.warm_decision = torch.full((), layer.warm_start, device=mean.device)  # type: ignore[union-attr]
        else:  # still torch's initial values, with no batch counted
            fresh = (mean == 0).all() & (var == 1).all()  # type: ignore[operator, union-attr]
            layer.warm_decision = fresh if tracked is None else fresh & (tracked == 0)
    return layer.warm_decision


#: per (device, channel counts): the layer index of each channel of the concatenated windows
_CHANNEL_LAYER: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}


def _channel_layer(device: torch.device, sizes: tuple[int, ...]) -> torch.Tensor:
    index = _CHANNEL_LAYER.get((device, sizes))
    if index is None:
        # filled on the device (a copy from host memory would wait for the device once per configuration)
        index = torch.cat([torch.full((c,), i, device=device) for i, c in enumerate(sizes)])
        if len(_CHANNEL_LAYER) >= 32:  # models come and go in one process (tests, sweeps): keep it small
            _CHANNEL_LAYER.clear()
        _CHANNEL_LAYER[(device, sizes)] = index
    return index


def _commit_group(group: list[Window], device: torch.device, dtype: torch.dtype, momentum: float | None) -> None:
    """One EMA step per window of ``group`` (one device, dtypes and momentum), on their concatenation."""
    counts, means, m2s = (torch.cat(part) for part in zip(*(layer.window_parts() for layer in group)))
    sizes = tuple(layer.num_features for layer in group)
    channel_layer = _channel_layer(device, sizes)
    unbiased = m2s / counts.sub(1.0).clamp_(min=1.0)[channel_layer]
    # NaN or Inf in a layer makes its float64 sum non-finite (finite float32 values cannot overflow it)
    check = torch.zeros(len(group), device=device, dtype=torch.float64)
    check.index_add_(0, channel_layer, means.to(torch.float64, copy=True).add_(unbiased))
    valid = check.isfinite().logical_and_(counts > 0)
    tracked: list[torch.Tensor] = [layer.num_batches_tracked for layer in group]  # type: ignore[misc]
    warm = (
        None
        if not momentum or all(layer.warm_start is False for layer in group)
        else torch.stack([_decide_warm_start(layer) for layer in group])
    )  # decided before this window is counted
    torch._foreach_add_(tracked, valid.to(tracked[0].dtype).unbind())
    # an invalid window gets the factor 0, and its NaN/Inf are zeroed first: lerp(r, s, 0) is exactly r
    if momentum is None:  # the cumulative average: 1/k with k the layer's count of committed windows
        factor = valid.to(dtype).div_(torch.stack(tracked).clamp(min=1).to(dtype))
    else:
        factor = valid.to(dtype).mul_(momentum)
        if warm is not None:  # polynomial-decay averaging: max(momentum, 1 / (1 + momentum (k - 1))), 1 at k = 1
            committed = torch.stack(tracked).clamp(min=1).to(dtype)
            share = committed.sub_(1.0).mul_(momentum).add_(1.0).reciprocal_().clamp_(min=momentum)
            factor = torch.where(warm, share.mul_(valid.to(dtype)), factor)
    stats = torch.cat([means, unbiased]).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if stats.dtype != dtype:
        stats = stats.to(dtype)
    runnings: list[torch.Tensor] = [layer.running_mean for layer in group] + [layer.running_var for layer in group]  # type: ignore[misc]
    torch._foreach_lerp_(runnings, stats.split(sizes * 2), factor.unbind() * 2)  # type: ignore[arg-type]

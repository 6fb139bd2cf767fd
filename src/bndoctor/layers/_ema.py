"""One step of BatchNorm's running-statistics update, shared by bndoctor's BN layers."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ._base import compiling, snapshot


@torch.no_grad()
def ema_step(
    module: _BatchNorm, mean: torch.Tensor, unbiased_var: torch.Tensor, valid: torch.Tensor | None = None
) -> None:
    """``running = (1 - f) running + f stat`` with torch's rule for f (momentum, or 1/k when it is None).

    ``valid`` (a 0-d bool tensor) turns the step into a no-op on the device, without a host
    synchronisation, when it is false (an all-empty global batch, non-finite window statistics):
    neither the statistics nor ``num_batches_tracked`` change, and a NaN in ``mean`` cannot leak in.
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


def renormalize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    r: torch.Tensor,
    d: torch.Tensor,
    *,
    eps: float,
    running: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Batch Renormalization's output ``gamma (r x_hat_B + d) + beta`` (Ioffe 2017).

    ``x_hat_B = (x - mu_B) / sqrt(var_B + eps)`` with the batch's own statistics;
    r and d (per channel) are constants in the backward: the input gradient is
    BN's gradient (through the batch statistics) times r, and ``dL/dgamma``
    sums ``dL/dy (r x_hat_B + d)``. One training-mode BN call with the affine
    parameters folded (``gamma r``, ``beta + gamma d``) gives exactly that
    through torch's own autograd: no Python backward, whose per-call cost on
    CPU (about 0.1 ms) exceeds the kernel's second statistics pass on the sizes
    measured (BENCHMARKS.md). ``running`` = ``(running_mean, running_var,
    momentum)``: the same kernel also takes the EMA step of those buffers with
    the batch statistics (unbiased variance), as ``nn.BatchNorm`` does.
    """
    if r.requires_grad or d.requires_grad:  # constants in the backward (an aten op each: skipped when not needed)
        r, d = r.detach(), d.detach()
    if compiling():  # traced: the backward must use these r and d, not recompute them (see snapshot)
        r, d = snapshot(r), snapshot(d)
    if weight is None:
        w, b = r, (d if bias is None else d + bias)
    else:
        w, b = weight * r, torch.addcmul(bias, weight, d) if bias is not None else weight * d
    mean, var, momentum = running if running is not None else (None, None, 0.0)
    return torch.nn.functional.batch_norm(x, mean, var, w, b, True, momentum, eps)


@torch.no_grad()
def batch_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and ``1 / sqrt(var + eps)`` (biased variance) of ``x`` (N, C, ...), float32 or wider.

    One kernel: torch's fused statistics kernel on CUDA (``batch_norm_stats``,
    Welford), its training-mode BN kernel elsewhere (faster on CPU than
    ``torch.var_mean``: 2-4x on the shapes of BENCHMARKS.md's networks).
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if x.is_cuda:
        return torch.batch_norm_stats(x, eps)
    _, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
    return mean, invstd


@torch.no_grad()
def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, ...), in float32 or wider (see :func:`batch_stats`).

    The kernels' ``1/std`` output is inf for a constant channel: read back as a variance of 0 there.
    """
    mean, invstd = batch_stats(x, 0.0)
    return mean, invstd.pow(-2).nan_to_num_(posinf=0.0)


def pool_over_ranks(
    mean: torch.Tensor, var: torch.Tensor, n: int, group: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool per-channel (mean, biased var) over a local count ``n`` across the ranks of ``group``.

    One ``all_gather`` of ``[mean, M2, n]`` per rank (M2 = var * n, the sum of squared deviations),
    then Chan et al. (1979)'s parallel combination on every rank: no ``E[x^2] - mean^2``
    cancellation. Returns the global count (a 0-d tensor: no host read), mean and biased variance;
    with every rank empty the count is 0 and the statistics are 0.
    """
    from ..distributed import gather_rows

    channels = mean.numel()
    if n == 0:  # an empty local batch contributes nothing (its moments may be NaN)
        mean = var = torch.zeros_like(mean)
    local = torch.cat([mean, var * n, mean.new_full((1,), float(n))])
    rows = gather_rows(local, group)  # (world, 2C + 1)
    counts = rows[:, -1:]
    total = counts.sum()
    safe = total.clamp(min=1.0)
    means = rows[:, :channels]
    pooled = (means * counts).sum(0) / safe
    m2 = rows[:, channels : 2 * channels].sum(0) + (counts * (means - pooled) ** 2).sum(0)
    return total, pooled, m2 / safe

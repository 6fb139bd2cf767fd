"""The statistics of one batch, per channel, as bndoctor's BN layers compute them (one kernel each)."""

from __future__ import annotations

from typing import Any

import torch

from ._base import compiling

__all__ = ["batch_moments", "batch_stats", "require_batch"]


def require_batch(x: torch.Tensor) -> None:
    """Refuse one value per channel in training, in torch's BatchNorm's words (its variance is no statistic)."""
    if x.numel() == x.shape[1]:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")


def batch_stats(
    x: torch.Tensor,
    eps: float,
    running: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    *,
    variance: bool = True,
) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Per-channel mean, biased variance and ``1 / sqrt(var + eps)`` of ``x`` (N, C, ...), float32 or wider.

    One statistics kernel (torch's ``batch_norm_update_stats``, Welford on
    CUDA; faster on CPU than ``torch.var_mean``: 2-4x on the shapes of
    BENCHMARKS.md's networks) and two small operations. ``variance=False``:
    the variance comes back as None, and the kernel is torch's training-mode BN
    kernel, which gives ``1/sigma`` itself (one operation in all). Traced, that
    kernel always (the compiler decomposes and fuses it). Call it under
    ``torch.no_grad()`` (the statistics are constants to the layers).
    ``running`` = ``(running_mean, running_var, momentum)``: the kernel also
    takes the EMA step of those buffers (unbiased variance), as
    ``nn.BatchNorm`` does.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if running is not None and running[0].dtype != x.dtype:  # e.g. a bfloat16 layer: the step in its dtype
        mean, var, invstd = batch_stats(x, eps, variance=variance)
        running_mean, running_var, momentum = running
        n = x.numel() // x.shape[1]
        biased = var if var is not None else invstd.pow(-2).sub(eps).clamp(min=0.0)
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((biased * (n / max(n - 1, 1))).to(running_var.dtype), momentum)
        return mean, var, invstd
    running_mean, running_var, momentum = running if running is not None else (None, None, 0.0)
    if compiling() or not variance:
        _, mean, invstd = torch.native_batch_norm(x, None, None, running_mean, running_var, True, momentum, eps)
        return mean, (invstd.pow(-2).sub(eps).clamp(min=0.0) if variance else None), invstd
    mean, var = torch.batch_norm_update_stats(x, running_mean, running_var, momentum)
    return mean, var, (var + eps).rsqrt_()


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, ...), in float32 or wider (see :func:`batch_stats`).

    Call it under ``torch.no_grad()``, as its callers in the layers do (a decorator would cost a grad-mode
    switch per layer and micro-step).
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if compiling():
        _, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, 0.0)
        return mean, invstd.pow(-2).nan_to_num(posinf=0.0)  # 1/std is inf for a constant channel: variance 0
    return torch.batch_norm_update_stats(x, None, None, 0.0)

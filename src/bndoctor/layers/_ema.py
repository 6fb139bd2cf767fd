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


class _Renormalize(torch.autograd.Function):
    """Batch Renormalization's output with the batch statistics computed once (eager calls).

    Forward: torch's eval-mode BN kernel with the batch's own statistics and the
    affine parameters folded (``gamma r``, ``beta + gamma d``), an elementwise
    pass. Backward: torch's training-mode BN backward kernel with those folded
    parameters and the batch's ``1/sigma_B`` (the input gradient through the
    batch statistics, times r), and ``dL/dgamma = r sum(dL/dy x_hat_B) + d
    sum(dL/dy)``. Folding into one training-mode BN call instead (what traced
    code does, see :func:`renormalize`) lets autograd derive the same, but that
    kernel computes the statistics a second time.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, factors, eps: float):  # type: ignore[override]
        # factors = (mean, var, invstd, r, d): no-grad tensors made for this call, kept on ctx (fewer
        # arguments for apply to walk); the inputs go through save_for_backward (its version check)
        mean, var, invstd, r, d = factors
        w, b = _fold(weight, bias, r, d)
        ctx.save_for_backward(x, weight, bias)
        ctx.kept = w, mean, invstd, r, d
        ctx.eps = eps
        return torch.native_batch_norm(x, w, b, mean, var, False, 0.0, eps)[0]

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        x, weight, bias = ctx.saved_tensors
        w, mean, invstd, r, d = ctx.kept
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: the same gradient from a differentiable form
            return (*_differentiable_grads(x, weight, bias, r, d, ctx.eps, grad, ctx.needs_input_grad[:3]), None, None)
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad, x, w, None, None, mean, invstd, True, ctx.eps, [need_x, need_weight, need_weight or need_bias]
        )
        dweight = dw.mul_(r).addcmul_(db, d) if need_weight else None  # dL/dgamma = r dL/dw + d dL/db
        return dx, dweight, db if need_bias else None, None, None


def _differentiable_grads(x, weight, bias, r, d, eps, grad, needed) -> list[torch.Tensor | None]:
    """The one-pass node's input gradients with a graph (double backward): the folded form, differentiated."""
    inputs = [t for t, need in zip((x, weight, bias), needed) if need]
    out = torch.nn.functional.batch_norm(x, None, None, *_fold(weight, bias, r, d), True, 0.0, eps)
    grads = iter(torch.autograd.grad(out, inputs, grad, create_graph=True))
    return [next(grads) if need else None for need in needed]


def _fold(
    weight: torch.Tensor | None, bias: torch.Tensor | None, r: torch.Tensor, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine parameters of ``gamma (r x_hat + d) + beta`` as one affine step: (``gamma r``, ``beta + gamma d``)."""
    if weight is None:
        return r, (d if bias is None else d + bias)
    return weight * r, (torch.addcmul(bias, weight, d) if bias is not None else weight * d)


def renormalize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    r: torch.Tensor,
    d: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
    *,
    eps: float,
    running: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Batch Renormalization's output ``gamma (r x_hat_B + d) + beta`` (Ioffe 2017).

    ``x_hat_B = (x - mu_B) / sqrt(var_B + eps)`` with the batch's own
    statistics ``stats`` = (mean, biased var, ``1/sqrt(var + eps)``), from
    :func:`batch_stats`; r and d (per channel) are constants in the backward:
    the input gradient is BN's gradient (through the batch statistics) times r,
    and ``dL/dgamma`` sums ``dL/dy (r x_hat_B + d)``.

    On CPU inputs with spatial dimensions and at least :data:`ONE_PASS_FROM`
    values, one autograd node computes it from ``stats``, with no second
    statistics pass (a double backward differentiates the folded form below
    instead). Otherwise — small inputs, where a Python autograd node costs
    more than the pass it saves, ``(N, C)`` inputs, inputs on a GPU (measured
    on an H200: never cheaper, the statistics pass is not what a layer's time
    goes to there; BENCHMARKS.md has both devices' tables), and traced code,
    where the compiler fuses the pass — one
    training-mode BN call with the affine parameters folded gives the same
    through torch's own autograd; ``running`` = ``(running_mean, running_var,
    momentum)`` lets that call take the EMA step of those buffers (unbiased
    variance), as ``nn.BatchNorm`` does. On the one-pass path
    (:func:`takes_one_pass` tells which path a call takes) ``batch_stats``
    takes that step instead.
    """
    if r.requires_grad or d.requires_grad:  # constants in the backward (an aten op each: skipped when not needed)
        r, d = r.detach(), d.detach()
    if takes_one_pass(x):
        if running is not None or stats[1] is None:
            raise AssertionError("the one-pass path takes the variance from batch_stats, which takes the EMA step")
        require_batch(x)
        return _Renormalize.apply(x, weight, bias, (*stats, r, d), eps)
    if compiling():  # the backward must use these r and d, not recompute them (see snapshot)
        r, d = snapshot(r), snapshot(d)
    w, b = _fold(weight, bias, r, d)
    mean, var, momentum = running if running is not None else (None, None, 0.0)
    return torch.nn.functional.batch_norm(x, mean, var, w, b, True, momentum, eps)


#: CPU inputs with at least this many values (and spatial dimensions) take :func:`renormalize`'s one-pass node.
ONE_PASS_FROM = 8192


def one_pass(x: torch.Tensor) -> bool:
    """Whether eager :func:`renormalize` computes ``x``'s statistics once (see there)."""
    return x.device.type == "cpu" and x.dim() > 2 and x.numel() >= ONE_PASS_FROM


def takes_one_pass(x: torch.Tensor) -> bool:
    """Whether :func:`renormalize` will take its one-pass path for ``x`` in this call (eager, large enough)."""
    return not compiling() and one_pass(x)


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

"""Batch Renormalization's output and gradient (Ioffe 2017), shared by BatchRenorm and accumulation-aware BN."""

from __future__ import annotations

from typing import Any

import torch

from ._base import compiling, snapshot
from ._batch import require_batch

__all__ = ["ONE_PASS_FROM", "one_pass", "renormalize", "takes_one_pass"]


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
    more than the pass it saves, ``(N, C)`` inputs, inputs on a GPU (where the
    statistics pass is not what a layer's time goes to; BENCHMARKS.md,
    "renormalize paths"), and traced code, where the compiler fuses the pass — one
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

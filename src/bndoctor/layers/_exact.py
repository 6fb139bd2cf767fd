"""The exact accumulation mode's normalisation: Batch Renormalization's node that records what its backward saw.

Batch-N BatchNorm's input gradient centres over the whole logical batch:
with ``x_hat = (x - mu) / sigma`` (whole-window statistics), ``G = gamma
dL/dy`` and sums over all N samples of the window,

    dL/dx = (1 / sigma) (G - sum(G) / N - x_hat sum(G x_hat) / N)

while a micro-batch's backward can only centre over its own n samples
(Batch Renormalization's gradient, Ioffe 2017, which the ``renorm`` mode
uses). Both are linear in G, and the per-channel sums they need, ``a =
sum(dL/dy)`` and ``b = sum(dL/dy x_hat)``, are the layer's bias and weight
gradients of each micro-batch. :class:`ExactRenorm` computes the ``renorm``
gradient and records ``a`` and ``b`` of its call; in a replay of the window it
also adds the difference between the window-wide and the micro-batch
centring of the gradient recorded in the previous pass (:class:`Injection`).
With r = sigma_B / sigma and d = (mu_B - mu) / sigma, ``x_hat = r x_hat_B +
d``, that difference is, per channel, an affine function of ``x``:

    delta = (gamma / sigma) (c0 + c1 x_hat_B)
    c0 = a / n - A / N - d B / N
    c1 = (b - d a) / (r n) - r B / N

(a, b: the call's sums from the previous pass; A, B: their totals over the
window, over all ranks that share it). The bias and weight gradients do not
depend on the centring and are exact in every pass.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import BNDoctorError

__all__ = ["Call", "ExactRenorm", "Injection"]


class Call:
    """One training call of a layer in the window: its renorm constants and the sums its backward saw.

    ``r`` and ``d`` (per channel) fix the normalisation, so a replay of the
    same input normalises exactly as the gradient pass did; ``n`` is the
    call's values per channel; ``sums`` holds ``a`` and ``b`` (2, C) of the
    current pass, ``previous`` those of the pass before (None in the gradient
    pass).
    """

    __slots__ = ("d", "n", "previous", "r", "sums")

    def __init__(self, r: torch.Tensor, d: torch.Tensor, n: int) -> None:
        self.r = r
        self.d = d
        self.n = n
        self.sums = torch.zeros((2, r.numel()), dtype=r.dtype, device=r.device)
        self.previous: torch.Tensor | None = None


class Injection:
    """What a replayed call adds to its input gradient: the previous pass's sums of the call and of the window."""

    __slots__ = ("count", "totals")

    def __init__(self, totals: torch.Tensor, count: torch.Tensor) -> None:
        self.totals = totals  # (2, C): A and B over the window (all ranks)
        self.count = count  # N, the window's count (all ranks), a 0-d tensor


class ExactRenorm(torch.autograd.Function):
    """``gamma x_hat + beta`` with x_hat = r x_hat_B + d; the renorm backward, recorded, plus an injection.

    ``factors`` = (mean_B, var_B, invstd_B) of the micro-batch; ``call`` (a
    :class:`Call`) receives the sums; ``inject`` is None in the gradient pass.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, factors, eps: float, call: Call, inject: Injection | None):  # type: ignore[override]
        mean, var, invstd = factors
        r, d = call.r, call.d
        if weight is None:
            w, b = r, (d if bias is None else d + bias)
        else:
            w, b = weight * r, (torch.addcmul(bias, weight, d) if bias is not None else weight * d)
        ctx.save_for_backward(x, weight)
        ctx.kept = w, mean, invstd, call, inject
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return torch.native_batch_norm(x, w, b, mean, var, False, 0.0, eps)[0]

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise BNDoctorError(
                "the exact accumulation mode has no double backward (create_graph=True)",
                hint="use mode='renorm' for gradient penalties and other second-order terms",
            )
        x, weight = ctx.saved_tensors
        w, mean, invstd, call, inject = ctx.kept
        need_x = ctx.needs_input_grad[0]
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(), x, w, None, None, mean, invstd, True, ctx.eps, [need_x, True, True]
        )
        r, d = call.r, call.d
        b_sum = dw.to(r.dtype).mul(r).addcmul_(db.to(r.dtype), d)  # sum(dL/dy x_hat) = r sum(dL/dy x_hat_B) + d a
        call.sums[0].add_(db.to(r.dtype))
        call.sums[1].add_(b_sum)
        if need_x and inject is not None and call.previous is not None:
            a, b = call.previous
            big_a, big_b = inject.totals
            count = inject.count
            n = call.n
            c0 = a / n - big_a / count - d * big_b / count
            c1 = (b - d * a) / (r * n) - r * big_b / count
            scale = r * invstd  # 1 / sigma
            if weight is not None:
                scale = scale * weight.to(scale.dtype)
            slope = scale * c1 * invstd
            offset = scale * (c0 - c1 * mean * invstd)
            shape = [1, -1] + [1] * (x.dim() - 2)
            dx = dx + (x * slope.view(shape).to(x.dtype) + offset.view(shape).to(x.dtype))
        dweight = b_sum.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = db if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (dx if need_x else None), dweight, dbias, None, None, None, None

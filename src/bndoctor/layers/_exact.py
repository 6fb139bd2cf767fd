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
gradient and records what ``a`` and ``b`` of its call follow from; in a replay of the window it
also adds the difference between the window-wide and the micro-batch
centring of the gradient recorded in the previous pass.
With r = sigma_B / sigma and d = (mu_B - mu) / sigma, ``x_hat = r x_hat_B +
d``, that difference is, per channel, an affine function of ``x``:

    delta = (gamma / sigma) (c0 + c1 x_hat_B)
    c0 = a / n - A / N - d B / N
    c1 = (b - d a) / (r n) - r B / N

(a, b: the call's sums from the previous pass; A, B: their totals over the
window, over all ranks that share it). The bias and weight gradients do not
depend on the centring and are exact in every pass.

The backward stores its bias and weight gradients, which are the call's a
and b; the slope and offset each call injects (``gamma c1 / sigma_B sigma``
and the matching offset, with ``x_hat_B = (x - mu_B) / sigma_B``) are
computed for all calls of a layer at once between passes
(:func:`pass_sums`, :func:`injections`), so a replayed call's BN costs its
forward, torch's BN backward and one fused multiply-add.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import BNDoctorError

__all__ = ["Call", "ExactRenorm", "injections", "pass_sums"]


class Call:
    """One training call of a layer in the window: its normalisation, and what its backward saw.

    ``r`` and ``d`` (per channel) fix the normalisation, and ``factors`` =
    (mean_B, var_B, invstd_B) of the recorded input, so a replay of the same
    input normalises exactly as the gradient pass did without computing them
    again; ``n`` is the call's values per channel. ``grads`` holds the
    current pass's ``a`` and ``b`` per channel, its bias and weight
    gradients in the dtype of ``r`` (None until its backward runs);
    ``shift`` the (slope, offset) a replay injects, shaped for the input
    ``like`` (dtype, dimensions; None outside a replay).
    """

    __slots__ = ("d", "factors", "grads", "like", "n", "r", "shift")

    def __init__(
        self, r: torch.Tensor, d: torch.Tensor, n: int, factors: tuple[torch.Tensor, ...], like: torch.Tensor
    ) -> None:
        self.r = r
        self.d = d
        self.n = n
        self.factors = factors
        self.like = like.dtype, like.dim()
        self.grads: tuple[torch.Tensor, torch.Tensor] | None = None
        self.shift: tuple[torch.Tensor, torch.Tensor] | None = None


@torch.no_grad()
def pass_sums(calls: Sequence[Call]) -> torch.Tensor:
    """The sums ``a`` and ``b`` of every call in the current pass, (calls, 2, C); zeros where no gradient came."""
    zero = torch.zeros_like(calls[0].r)
    return torch.stack([g for c in calls for g in (c.grads or (zero, zero))]).view(len(calls), 2, -1)


@torch.no_grad()
def injections(
    calls: Sequence[Call],
    previous: torch.Tensor,
    totals: torch.Tensor,
    count: torch.Tensor,
    weight: torch.Tensor | None,
) -> None:
    """Set each call's ``shift`` for a replay: the slope and offset of what it adds to its input gradient.

    ``previous`` (calls, 2, C): the calls' sums in the previous pass; ``totals`` (2, C): their sums over the
    window and the ranks that share it; ``count``: the window's values per channel.
    """
    r = torch.stack([c.r for c in calls])
    d = torch.stack([c.d for c in calls])
    mean = torch.stack([c.factors[0] for c in calls]).to(r.dtype)
    invstd = torch.stack([c.factors[2] for c in calls]).to(r.dtype)
    n = torch.tensor([float(c.n) for c in calls], dtype=r.dtype, device=r.device).unsqueeze(1)
    a, b = previous.unbind(1)
    big_a, big_b = (t / count for t in totals.unbind(0))
    c0 = a / n - big_a - d * big_b
    c1 = (b - d * a) / (r * n) - r * big_b
    scale = r * invstd  # 1 / sigma
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    slope = scale * c1 * invstd
    offset = scale * (c0 - c1 * mean * invstd)
    kinds = {call.like for call in calls}
    for dtype, dim in kinds:  # one kind of input in practice: the shifts in one view each
        shape = [len(calls), 1, -1] + [1] * (dim - 2)
        pairs = zip(slope.to(dtype).view(shape).unbind(0), offset.to(dtype).view(shape).unbind(0))
        for call, shift in zip(calls, pairs):
            if call.like == (dtype, dim):
                call.shift = shift


class ExactRenorm(torch.autograd.Function):
    """``gamma x_hat + beta`` with x_hat = r x_hat_B + d; the renorm backward, recorded, plus a replay's shift.

    ``call`` (a :class:`Call`) gives the normalisation and receives the bias
    and weight gradients; ``replay``: whether this is a replayed call, whose
    input gradient gets the call's ``shift``.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, eps: float, call: Call, replay: bool):  # type: ignore[override]
        mean, var, _ = call.factors
        r, d = call.r, call.d
        if weight is None:
            w, b = r, (d if bias is None else d + bias)
        else:
            w, b = weight * r, (torch.addcmul(bias, weight, d) if bias is not None else weight * d)
        ctx.save_for_backward(x, weight)
        ctx.kept = w, call, replay
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
        w, call, replay = ctx.kept
        mean, _, invstd = call.factors
        need_x = ctx.needs_input_grad[0]
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(), x, w, None, None, mean, invstd, True, ctx.eps, [need_x, True, True]
        )
        r, d = call.r, call.d
        a = db.to(r.dtype)
        b = dw.to(r.dtype).mul_(r).addcmul_(a, d)  # sum(dL/dy x_hat) = r sum(dL/dy x_hat_B) + d sum(dL/dy)
        call.grads = (a, b) if call.grads is None else (call.grads[0] + a, call.grads[1] + b)
        if need_x and replay and call.shift is not None:
            slope, offset = call.shift
            dx = dx.addcmul_(x, slope).add_(offset)
        # copies: call.grads keeps b and a, and autograd may accumulate into the gradients it is given
        dweight = b.to(weight.dtype, copy=True) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = db.clone() if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (dx if need_x else None), dweight, dbias, None, None, None

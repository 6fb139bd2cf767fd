"""Accumulation-aware BatchNorm: normalise each micro-batch with the statistics of the window so far.

Between two optimizer steps the weights do not change, so the statistics of
earlier micro-batches of the accumulation window are statistics of the same
network. ``AccumBatchNorm`` normalises micro-batch k with the statistics
pooled over micro-batches 1..k of the window (earlier ones detached; the
gradient flows through the current micro-batch's share) and updates its
running statistics once per optimizer step, with the pooled statistics of the
whole logical batch.

Math, per channel: the window holds count N_w, mean m_w and sum of squared
deviations M2_w; micro-batch k has n values with mean m and biased variance v.
Pooling (Chan et al. 1979): N = N_w + n, mean = m_w + (m - m_w) n / N,
M2 = M2_w + n v + (m - m_w)^2 N_w n / N, var = M2 / N. With x_hat = (x - mean)
/ sqrt(var + eps) and g = dL/dy * gamma, the input gradient is

    dL/dx_i = g_i / sqrt(var + eps) - (sum_k g + x_hat_i sum_k g x_hat) / (N sqrt(var + eps))

(sums over the current micro-batch only): torch's BN backward with the
reductions divided by N instead of n, computed as
``(n/N) * bn_backward + (1 - n/N) * g / sqrt(var + eps)`` with torch's own
kernels. This is the ``"progressive"`` mode's gradient; the default
``"renorm"`` mode uses Batch Renormalization's instead (below).

Variants (``mode``); all normalise with the pooled window statistics in the
forward pass and differ in the gradient or the statistics:

* ``"renorm"`` (default): Batch Renormalization's gradient (Ioffe 2017) with
  the window so far as the reference: plain BN's gradient over the
  micro-batch, times r = sigma_B / sigma (r and d = (mu_B - mu) / sigma held
  constant). Keeps BN's invariances within each micro-batch; measured best in
  the harness (docs/accumulation.md).
* ``"progressive"``: the exact gradient of the pooled formulation above
  (reductions divided by the window count N instead of n).
* ``"blend"``: as ``progressive``, and while the window is still filling,
  also pool in the previous window's statistics with the weight of the
  samples still missing (one optimizer step stale).

A window is closed by :func:`bndoctor.accumulate_bn` (an optimizer step hook)
or by the :func:`bndoctor.accumulation_window` context manager. In training
mode without either, the layer behaves as plain BatchNorm and warns once.
In eval mode it is plain BatchNorm with its running statistics.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .. import distributed
from ..distributed import HasProcessGroup
from ..errors import BNDoctorError, BNDoctorWarning, caller_stacklevel
from ..moments import pool_two
from ._base import BNDoctorLayer
from ._ema import batch_moments, ema_step, renormalize

__all__ = ["AccumBatchNorm", "AccumMode"]

AccumMode = Literal["progressive", "renorm", "blend"]


class _Window:
    """The open window of one layer: count, mean and sum of squared deviations per channel."""

    __slots__ = ("count", "m2", "mean")

    def __init__(self) -> None:
        self.count = 0.0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None


class _PooledNorm(torch.autograd.Function):
    """y = BN(x) with given pooled statistics; earlier micro-batches are constants in the backward.

    The exact gradient of that formulation: torch's BN backward with the
    reductions over the micro-batch divided by the window count (``ratio`` =
    n / N), as derived in the module docstring.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, mean, var, ratio: float, eps: float):  # type: ignore[override]
        invstd = torch.rsqrt(var + eps)
        w = weight.detach() if weight is not None else torch.ones_like(mean)
        ctx.save_for_backward(x, w, mean, invstd)
        ctx.ratio = ratio
        ctx.eps = eps
        ctx.has_weight = weight is not None
        return torch.nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        x, w, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        shape = [1, -1] + [1] * (x.dim() - 2)
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad, x, w, None, None, mean, invstd, True, ctx.eps, [need_x, True, True]
        )
        if need_x and ctx.ratio < 1.0:
            dx = dx.mul_(ctx.ratio).add_(grad * (invstd * w).view(shape), alpha=1.0 - ctx.ratio)
        return dx, (dw if need_w and ctx.has_weight else None), (db if need_b else None), None, None, None, None


class AccumBatchNorm(BNDoctorLayer, HasProcessGroup, _BatchNorm):
    """BatchNorm whose training statistics span the whole gradient-accumulation window.

    Same arguments as ``torch.nn.BatchNorm2d`` plus ``mode`` (``"renorm"``,
    ``"progressive"`` or ``"blend"``; see :mod:`bndoctor.layers.accum`),
    ``sync`` (pool each window across the ranks of ``process_group`` too;
    default the world) and ``process_group``; accepts inputs
    ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` and ``(N, C, D, H, W)``. Build
    it with :func:`bndoctor.to_accum_bn` and attach the window control with
    :func:`bndoctor.accumulate_bn`.

    Window control is counted: :meth:`acquire_control` / :meth:`release_control`
    are called by whatever closes the windows (the optimizer hook of
    ``accumulate_bn``, an ``accumulation_window`` block); without any, training
    falls back to plain BatchNorm with a warning.
    """

    pools_window = True
    small_batch_remedy = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        mode: AccumMode = "renorm",
        sync: bool = False,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if mode not in ("progressive", "renorm", "blend"):
            raise BNDoctorError(
                f"expected mode 'progressive', 'renorm' or 'blend' (got {mode!r})", hint="the default is fine"
            )
        self.mode = mode
        self.sync = sync
        self._group = distributed.GroupRef(process_group)
        self._bndoctor_source_class: type | None = None
        self._controllers = 0  # attached accumulate_bn hooks / open accumulation_window blocks
        self._in_block = False  # inside an accumulation_window block
        self._warned = False
        self.reset_window()

    # ----------------------------------------------------------------- window

    def reset_window(self) -> None:
        """Forget the open window's statistics (and collected ones) without committing them."""
        self.__dict__["_win"] = _Window()
        self.__dict__["_collected"] = None

    def hold_collected(self) -> None:
        """Keep the open window's statistics as the whole window's (two passes), and start an empty window.

        Called by :func:`bndoctor.collect_window` after its no-grad pass; the
        following micro-batches are normalised with these statistics until the
        window closes.
        """
        win = self._win
        collected = None if win.mean is None or win.m2 is None else (win.count, win.mean, win.m2)
        self.reset_window()
        self.__dict__["_collected"] = collected

    @property
    def holds_collected(self) -> bool:
        return self.__dict__.get("_collected") is not None

    @property
    def window_open(self) -> bool:
        return self._win.count > 0

    def window_statistics(self, *, collected: bool = False) -> tuple[float, torch.Tensor, torch.Tensor] | None:
        """``(count, mean, biased var)`` of the open window (``collected=True``: of the collected whole window).

        ``None`` when nothing is there. Tensors are the layer's own: read, do not modify.
        """
        if collected:
            held = self.__dict__.get("_collected")
            return None if held is None else (held[0], held[1], held[2] / held[0])
        win = self._win
        if win.mean is None or win.m2 is None or win.count == 0:
            return None
        return win.count, win.mean, win.m2 / win.count

    @property
    def pools_ranks(self) -> bool:
        return bool(self.sync)

    @property
    def controlled(self) -> bool:
        """Whether something closes this layer's windows (else training is plain BN)."""
        return self._controllers > 0

    def acquire_control(self, *, block: bool = False) -> None:
        """Count one more window controller (``block``: an ``accumulation_window`` block, which does not nest)."""
        if block:
            if self._in_block:
                raise BNDoctorError(
                    "accumulation_window blocks do not nest",
                    hint="close the outer window before opening another",
                )
            self._in_block = True
        self._controllers += 1

    def release_control(self, *, block: bool = False) -> None:
        if block:
            self._in_block = False
        self._controllers = max(self._controllers - 1, 0)

    @torch.no_grad()
    def normalisation_statistics(
        self, mean: torch.Tensor, var: torch.Tensor, n: int
    ) -> tuple[float, torch.Tensor, torch.Tensor] | None:
        """The window statistics this micro-batch will be normalised with, given its own (mean, biased var).

        ``None`` when no window control is attached (the layer then trains as plain BN).
        """
        if not self.controlled:
            return None
        collected = self.__dict__.get("_collected")
        if collected is not None:
            count, w_mean, w_m2 = collected
            return count, w_mean.double(), w_m2.double() / count
        win = self._win
        if win.mean is None or win.m2 is None:
            return float(n), mean, var
        count, pooled_mean, pooled_m2 = pool_two(win.count, win.mean.double(), win.m2.double(), n, mean, var * n)
        return count, pooled_mean, pooled_m2 / count

    @torch.no_grad()
    def close_window(self) -> None:
        """Commit the window: one EMA update of the running statistics with its pooled statistics.

        A window whose statistics hold NaN or Inf is not committed (decided on
        the device: no host synchronisation); :meth:`window_finite` tells.
        """
        win = self._win
        if win.count > 0 and win.mean is not None and win.m2 is not None:
            count = win.count
            if self.track_running_stats and self.running_mean is not None:
                unbiased = win.m2 / max(count - 1.0, 1.0)
                finite = torch.isfinite(win.mean).all() & torch.isfinite(unbiased).all()
                ema_step(self, win.mean, unbiased, valid=finite)
            self.__dict__["_previous"] = (count, win.mean, win.m2)
        self.reset_window()

    def window_finite(self) -> bool:
        """Whether the open window's statistics are finite (reads one flag from the device)."""
        win = self._win
        if win.mean is None or win.m2 is None:
            return True
        return bool(torch.isfinite(win.mean).all() & torch.isfinite(win.m2).all())

    # ----------------------------------------------------------------- forward

    def _normalise(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or not self.track_running_stats or self.running_mean is None:
            return _BatchNorm.forward(self, input)
        if not self.controlled:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "AccumBatchNorm is training without window control, so it behaves as plain BatchNorm; "
                    "call bndoctor.accumulate_bn(model, optimizer) or use bndoctor.accumulation_window(model) "
                    "(bndoctor's Lightning and Hugging Face callbacks attach it for you)",
                    BNDoctorWarning,
                    stacklevel=caller_stacklevel(),
                )
            return _BatchNorm.forward(self, input)
        return self._window_forward(input)

    def _step_statistics(
        self, x: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor]:
        """This micro-batch's (mean, biased var), and the count, mean and var of the micro-step to pool.

        Without sync the micro-step is the local micro-batch. With sync it spans
        the ranks: one all_reduce of [n, sum x, sum x^2] in float64.
        """
        if n > 0:
            mean, var = batch_moments(x)
        else:
            mean = var = torch.zeros(x.shape[1], device=x.device, dtype=x.dtype)
        if not self._synced():
            return mean, var, float(n), mean, var
        packed = torch.cat([mean.new_full((1,), float(n)), mean * n, (var + mean * mean) * n]).double()
        total = distributed.all_reduce_sum(packed, self.process_group)
        count = float(total[0])
        if count == 0:
            return mean, var, 0.0, mean, var
        step_mean = total[1 : 1 + mean.numel()] / count
        step_var = (total[1 + mean.numel() :] / count - step_mean * step_mean).clamp_(min=0)
        return mean, var, count, step_mean.to(mean.dtype), step_var.to(var.dtype)

    def _synced(self) -> bool:
        return self.sync and distributed.active(self.process_group)

    def _window_forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel() // x.shape[1]
        if n == 0 and not self._synced():
            return x.clone()
        with torch.no_grad():
            mean, var, step_n, step_mean, step_var = self._step_statistics(x, n)
            if step_n == 0:
                return x.clone()
            win = self._win
            if win.mean is None or win.m2 is None:
                total, pooled_mean, pooled_m2 = step_n, step_mean, step_var * step_n
            else:
                total, pooled_mean, pooled_m2 = pool_two(
                    win.count, win.mean, win.m2, step_n, step_mean, step_var * step_n
                )
            win.count, win.mean, win.m2 = total, pooled_mean, pooled_m2
            use_count, use_mean, use_m2 = total, pooled_mean, pooled_m2
            full = self.__dict__.get("_collected")
            previous = self.__dict__.get("_previous")
            if full is not None:  # two passes: the whole window's statistics, collected beforehand
                use_count, use_mean, use_m2 = full
            elif self.mode == "blend" and previous is not None and previous[0] > total:
                prior = previous[0] - total  # the samples this window has not seen yet, taken from the last one
                use_count, use_mean, use_m2 = pool_two(
                    total, pooled_mean, pooled_m2, prior, previous[1], previous[2] * (prior / previous[0])
                )
            use_var = use_m2 / use_count  # every term of the pooled M2 is >= 0
            if n == 0:
                return x.clone()
            if self.mode == "renorm":
                # r = sigma_B / sigma, d = (mu_B - mu) / sigma with eps inside both sigmas (Ioffe 2017)
                ref_invstd = torch.rsqrt(use_var + self.eps)
                r = torch.sqrt(var + self.eps).mul_(ref_invstd)
                d = (mean - use_mean).mul_(ref_invstd)
        if self.mode == "renorm":
            return renormalize(x, self.weight, self.bias, r, d, self.eps)
        return _PooledNorm.apply(x, self.weight, self.bias, use_mean, use_var, n / use_count, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode}" + (", sync=True" if self.sync else "")

"""Synchronised BatchNorm that runs on CPU (gloo) and GPU (NCCL).

In training mode every rank computes, per channel, the mean and the sum of
squared deviations (M2) of its local batch and its count; one ``all_gather``
brings every rank's row, and each rank pools them (Chan et al. 1979, the
parallel form of Welford's update):

    N = sum_r n_r,   mean = sum_r n_r mean_r / N,
    M2 = sum_r (M2_r + n_r (mean_r - mean)^2),   var = M2 / N   (biased, for normalising)

The output is BatchNorm over the concatenation of every rank's batch. The
backward needs two sums over that whole batch, ``sum dy`` and
``sum dy x_hat``: each rank computes its part with torch's fused BN backward
kernel and a second ``all_gather`` adds them up, so input and parameter
gradients are those of the concatenated batch too (the backward of BN couples
all samples of the normalisation batch). Two collectives per layer per
forward/backward, whatever the backend; ranks may hold different numbers of
samples, including none. Statistics are kept in float32 (float64 for float64
inputs); pooling from per-rank means and M2 avoids the cancellation of
``E[x^2] - mean^2``. On gloo an ``all_gather`` of a few numbers per channel
takes about half the time of an ``all_reduce`` of the same tensor, which is
why the layer gathers and adds up locally.

In eval mode, and when torch.distributed is not initialised or the group has
one rank, the layer is plain BatchNorm and calls no collective.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..distributed import GroupRef, HasProcessGroup, gather_rows, pool_over_ranks, world_size
from ..errors import BNDoctorError
from ._base import BNDoctorLayer
from ._batch import batch_moments
from ._commit import ema_step

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(BNDoctorLayer, HasProcessGroup, _BatchNorm):
    """BatchNorm whose training-mode statistics span all ranks of a process group.

    Args are those of ``torch.nn.BatchNorm2d`` plus ``process_group`` (default:
    the global group). Accepts input of any rank >= 2: ``(N, C)``,
    ``(N, C, L)``, ``(N, C, H, W)``, ``(N, C, D, H, W)``.

    Use :func:`bndoctor.to_sync_bn` to convert a model and
    :func:`bndoctor.from_sync_bn` to go back to BatchNorm1d/2d/3d.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._group = GroupRef(process_group)
        self._bndoctor_source_class: type | None = None

    @property
    def pools_ranks(self) -> bool:
        return True

    def _normalise(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # only training synchronises: in eval mode the layer uses its running statistics, or (with
        # track_running_stats=False) the local batch's, and calls no collective, as torch's SyncBatchNorm
        if not self.training or world_size(self.process_group) == 1:
            return _BatchNorm.forward(self, input)
        return self._sync_forward(input)

    def _sync_forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if channels != self.num_features:
            raise BNDoctorError(
                f"expected {self.num_features} channels in dimension 1 (got input of shape {tuple(x.shape)})",
                hint="check the layer's num_features against the preceding layer",
            )
        self.require_same_layout(x, self.num_features)
        out, mean, var, n = _SyncNorm.apply(x, self.weight, self.bias, self.eps, self.process_group)
        self._update_running_stats(mean, var, n)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """EMA update with the global statistics; on-device, so no host synchronisation."""
        if not (self.training and self.track_running_stats) or self.running_mean is None:
            return
        unbiased = var * torch.where(n > 1, n / (n - 1).clamp(min=1.0), torch.ones_like(n))
        ema_step(self, mean, unbiased, valid=n > 0)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", synchronised"


class _SyncNorm(torch.autograd.Function):
    """BatchNorm over the union of every rank's batch: one all_gather forward, one backward.

    Forward returns ``(output, mean, var, N)``; the last three (global batch
    mean, biased variance, sample count) are not differentiable and feed the
    running-statistics update.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, group: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        count = x.numel() // x.shape[1]
        if count:
            mean_r, var_r = batch_moments(x)
        else:
            mean_r = var_r = torch.zeros(x.shape[1], device=x.device)
        n, mean, var = pool_over_ranks(mean_r.to(acc), var_r.to(acc), count, group)
        safe_n = n.clamp(min=1.0)  # every rank empty: outputs are empty too; statistics are left alone
        invstd = torch.rsqrt(var + eps)
        # the eval-mode kernel with the global statistics: one fused elementwise pass (its statistics in the
        # parameters' dtype: a wholly half-precision layer wants them so)
        kernel = acc if weight is None else weight.dtype
        out = torch.batch_norm(
            x, weight, bias, mean.to(kernel), var.to(kernel), False, 0.0, eps, torch.backends.cudnn.enabled
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.group, ctx.eps, ctx.n = group, eps, safe_n
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var, n)
        return out, mean, var, n

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: torch.Tensor, *_: Any
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight, mean, invstd = ctx.saved_tensors
        channels = x.shape[1]
        grad_out = grad_out.contiguous()
        if x.numel():
            # torch's fused backward with the global statistics: grad_weight = sum dy x_hat, grad_bias = sum dy
            kernel = mean.dtype if weight is None else weight.dtype
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, weight, None, None, mean.to(kernel), invstd.to(kernel), True, ctx.eps, [False, True, True]
            )
        else:
            sum_dy_xhat = sum_dy = torch.zeros(channels, dtype=mean.dtype, device=x.device)
        grad_x = None
        if ctx.needs_input_grad[0]:
            totals = gather_rows(torch.cat([sum_dy.to(mean.dtype), sum_dy_xhat.to(mean.dtype)]), ctx.group).sum(0)
            # dx = w invstd (dy - sum dy / N - x_hat sum(dy x_hat) / N) = a dy + c x + k, per channel
            a = invstd if weight is None else invstd * weight.to(mean.dtype)
            c = -a * invstd * totals[channels:] / ctx.n
            k = -a * totals[:channels] / ctx.n - c * mean
            shape = [1, channels] + [1] * (x.dim() - 2)
            dtype = x.dtype
            grad_x = torch.addcmul(k.to(dtype).view(shape), x, c.to(dtype).view(shape))
            grad_x.addcmul_(grad_out, a.to(dtype).view(shape))
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None

"""Synchronised BatchNorm that runs on CPU (gloo) and GPU (NCCL).

In training mode every rank computes, per channel, the sum and the sum of
squares of its local batch and its count, and one *differentiable*
``all_reduce`` turns them into the global batch statistics:

    N = sum_r n_r,   mean = S1 / N,   var = S2 / N - mean^2   (biased, for normalising)

The output is BatchNorm over the concatenation of every rank's batch. Autograd
runs the all_reduce's backward — a second all_reduce — so input and parameter
gradients are those of the concatenated batch too (the backward of BN couples
all samples of the normalisation batch). Two collectives per layer per
forward/backward, whatever the backend; ranks may hold different numbers of
samples, including none. The sums are accumulated in float64 for float32/64
inputs and in float32 for half-precision inputs.

In eval mode, and when torch.distributed is not initialised or the group has
one rank, the layer is plain BatchNorm and calls no collective.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..distributed import GroupRef, HasProcessGroup, world_size
from ..errors import BNDoctorError
from ._base import BNDoctorLayer
from ._ema import ema_step

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
        from ..distributed import differentiable_all_reduce

        channels = x.shape[1]
        if channels != self.num_features:
            raise BNDoctorError(
                f"expected {self.num_features} channels in dimension 1 (got input of shape {tuple(x.shape)})",
                hint="check the layer's num_features against the preceding layer",
            )
        acc = torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32
        dims = [0, *range(2, x.dim())]
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()  # half: square in float32
        local = torch.cat(
            [
                xs.sum(dim=dims, dtype=acc),
                (xs * xs).sum(dim=dims, dtype=acc),
                torch.full((1,), float(x.numel() // channels), dtype=acc, device=x.device),
            ]
        )
        total = differentiable_all_reduce(local, self.process_group)  # backward all-reduces the grads
        n = total[-1]
        safe_n = n.clamp(min=1.0)  # all ranks empty: outputs are empty too; statistics are left alone
        mean = total[:channels] / safe_n
        var = (total[channels : 2 * channels] / safe_n - mean * mean).clamp(min=0)
        self._update_running_stats(mean.detach(), var.detach(), n.detach())
        shape = [1, channels] + [1] * (x.dim() - 2)
        invstd = torch.rsqrt(var + self.eps)
        scale = invstd if self.weight is None else invstd * self.weight.to(acc)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.to(acc)
        return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """EMA update with the global statistics; on-device, so no host synchronisation."""
        if not (self.training and self.track_running_stats) or self.running_mean is None:
            return
        unbiased = var * torch.where(n > 1, n / (n - 1).clamp(min=1.0), torch.ones_like(n))
        ema_step(self, mean, unbiased, valid=n > 0)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", synchronised"

"""Batch Renormalization (Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models", NeurIPS 2017), a baseline for small batches.

Training mode normalises with the batch statistics and then corrects towards
the running statistics:

    y = gamma * (x_hat_B * r + d) + beta,   x_hat_B = (x - mu_B) / sigma_B,
    r = clip(sigma_B / sigma, 1/r_max, r_max),   d = clip((mu_B - mu) / sigma, -d_max, d_max),

with r and d treated as constants in the backward pass (sigma = sqrt(running_var + eps)).
With r_max = 1 and d_max = 0 this is BatchNorm. As in the paper, r_max and d_max grow
linearly from 1 and 0 to their final values over ``warmup_steps`` training forwards
(counted by ``num_batches_tracked``). Eval mode is BatchNorm with the running statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import BNDoctorError
from ._base import BNDoctorLayer
from ._batch import batch_stats, require_batch
from ._renormalize import renormalize, takes_one_pass

__all__ = ["BatchRenorm"]


class BatchRenorm(BNDoctorLayer, _BatchNorm):
    """Batch Renormalization for inputs ``(N, C, ...)``; ``r_max``/``d_max`` ramp up over ``warmup_steps``."""

    small_batch_remedy = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if momentum is None or not 0 < momentum <= 1:
            raise BNDoctorError(
                f"expected 0 < momentum <= 1 for BatchRenorm (got {momentum!r})",
                hint="Batch Renorm needs running statistics from an EMA; the paper uses 0.01",
            )
        if r_max < 1 or d_max < 0 or warmup_steps < 0:
            raise BNDoctorError(
                f"expected r_max >= 1, d_max >= 0, warmup_steps >= 0 (got {r_max}, {d_max}, {warmup_steps})",
                hint="r_max=3, d_max=5 as in Ioffe (2017)",
            )
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        self.r_max, self.d_max, self.warmup_steps = float(r_max), float(d_max), int(warmup_steps)
        self._bndoctor_source_class: type | None = None

    def limits(self) -> tuple[float, float]:
        """The current (r_max, d_max) of the warm-up ramp (reads the step count from the device)."""
        r_max, d_max = self._limits(self.num_batches_tracked)  # type: ignore[arg-type]
        return float(r_max), float(d_max)

    def _limits(self, tracked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_max, d_max) after ``tracked`` training forwards, computed on the device."""
        if self.warmup_steps == 0:
            done = torch.ones_like(tracked, dtype=torch.float32)
        else:  # an int64 count times a float: float32
            done = tracked.mul(1.0 / self.warmup_steps).clamp_(max=1.0)
        return done.mul(self.r_max - 1.0).add_(1.0), done.mul(self.d_max)

    def _normalise(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or not self.track_running_stats or self.running_mean is None:
            # eval: the running statistics; no running statistics kept: plain BN, buffers untouched
            return _BatchNorm.forward(self, input)
        require_batch(input)  # before the EMA step below
        one_pass = takes_one_pass(input)
        running = (self.running_mean, self.running_var, self.momentum)
        with torch.no_grad():
            r_max, d_max = self._limits(self.num_batches_tracked)  # type: ignore[arg-type]
            # r = sigma_B / sigma, d = (mu_B - mu) / sigma, clipped; sigma and mu from the running statistics
            # before this step's EMA step (momentum, unbiased variance), which the statistics kernel takes
            # on the one-pass path and the BN call in renormalize otherwise
            ref_invstd = torch.rsqrt(self.running_var + self.eps)  # type: ignore[operator]
            if one_pass:
                ref_mean = self.running_mean.clone()  # type: ignore[union-attr]
                stats = batch_stats(input, self.eps, running)  # type: ignore[arg-type]
            else:
                ref_mean = self.running_mean
                stats = batch_stats(input, self.eps, variance=False)
            mean_b, _, invstd_b = stats
            r = ref_invstd.div(invstd_b).clamp_(min=r_max.reciprocal(), max=r_max)
            d = (mean_b - ref_mean).mul_(ref_invstd).clamp_(min=-d_max, max=d_max)
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        return renormalize(
            input,
            self.weight,
            self.bias,
            r,
            d,
            stats,
            eps=self.eps,
            running=None if one_pass else running,  # type: ignore[arg-type]
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r_max={self.r_max:g}, d_max={self.d_max:g}, warmup_steps={self.warmup_steps}"

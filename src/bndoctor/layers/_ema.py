"""One step of BatchNorm's running-statistics update, shared by bndoctor's BN layers."""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def ema_step(
    module: _BatchNorm, mean: torch.Tensor, unbiased_var: torch.Tensor, valid: torch.Tensor | None = None
) -> None:
    """``running = (1 - f) running + f stat`` with torch's rule for f (momentum, or 1/k when it is None).

    ``valid`` (a 0-d bool tensor) turns the step into a no-op on the device, without a host
    synchronisation, when it is false (an all-empty global batch, non-finite window statistics):
    neither the statistics nor ``num_batches_tracked`` change, and a NaN in ``mean`` cannot leak in.
    """
    module.num_batches_tracked.add_(1 if valid is None else valid.to(module.num_batches_tracked.dtype))  # type: ignore[union-attr]
    factor = 1.0 / max(float(module.num_batches_tracked), 1.0) if module.momentum is None else module.momentum  # type: ignore[arg-type]
    for running, stat in ((module.running_mean, mean), (module.running_var, unbiased_var)):
        stat = stat.to(running.dtype)  # type: ignore[union-attr]
        if valid is None:
            running.mul_(1 - factor).add_(stat, alpha=factor)  # type: ignore[union-attr]
        else:
            running.copy_(torch.where(valid, running + (stat - running) * factor, running))  # type: ignore[operator]


def renormalize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    r: torch.Tensor,
    d: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Batch Renormalization's output ``gamma (r x_hat_B + d) + beta`` in one fused BN call (Ioffe 2017).

    ``x_hat_B`` is ``x`` normalised with its own batch statistics (gradient
    through them, as in BN); ``r`` and ``d`` are constants. Folding them into
    the affine parameters (``gamma r`` and ``beta + gamma d``) lets torch's BN
    kernel do the forward and the backward, with the gradients of Batch
    Renorm: ``dL/dx`` is BN's gradient times ``r``, and ``dL/dgamma`` sums
    ``dL/dy (r x_hat_B + d)``.
    """
    r, d = r.detach(), d.detach()
    if weight is None:
        w, b = r, d
    else:
        w, b = weight * r, torch.addcmul(bias if bias is not None else torch.zeros_like(d), weight, d)
    if bias is not None and weight is None:
        b = b + bias
    return torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.0, eps)


@torch.no_grad()
def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, ...) in one pass of torch's fused BN kernel.

    The kernel returns ``1/std``, and 0 where the variance is 0 (a constant
    channel), so the variance is read back as ``invstd**-2`` only where that is
    positive: a constant channel has variance 0, not ``inf``.
    """
    _, mean, invstd = torch.native_batch_norm(x.detach(), None, None, None, None, True, 0.0, 0.0)
    return mean, torch.where(invstd > 0, invstd.pow(-2), torch.zeros_like(invstd))

"""Pooled per-channel moments: the one place where batch statistics are combined.

Given groups b with counts n_b, means mu_b and biased variances s2_b (per
channel), the statistics of the union are

    N   = sum n_b
    mu  = sum n_b mu_b / N
    M2  = sum n_b s2_b + sum n_b (mu_b - mu)^2        (sum of squared deviations)
    var = M2 / N  (biased)   or   M2 / (N - 1)  (unbiased)

which equals sum n_b (s2_b + mu_b^2) / N - mu^2 in exact arithmetic but does
not cancel catastrophically when |mu| >> sigma (Chan, Golub & LeVeque 1979).
Averaging the s2_b, as ``torch.optim.swa_utils.update_bn`` and timm's
``distribute_bn`` effectively do, drops the second sum: the spread of the
group means, which is large exactly when groups are correlated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Moments", "pool"]


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations of one layer's channels (float64)."""

    count: float
    mean: torch.Tensor
    m2: torch.Tensor

    @property
    def var_biased(self) -> torch.Tensor:
        return self.m2 / self.count

    @property
    def var_unbiased(self) -> torch.Tensor:
        return self.m2 / max(self.count - 1.0, 1.0)


def pool(counts: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> Moments:
    """Pool groups: ``counts`` (B,), ``means`` and biased ``variances`` (B, C). Zero-count groups are ignored."""
    counts = counts.to(torch.float64)
    means = means.to(torch.float64)
    variances = variances.to(torch.float64)
    total = counts.sum()
    if total <= 0:
        zeros = torch.zeros(means.shape[-1], dtype=torch.float64, device=means.device)
        return Moments(0.0, zeros, zeros.clone())
    weights = (counts / total).unsqueeze(-1)
    mean = (weights * means).sum(0)
    spread = (counts.unsqueeze(-1) * (means - mean) ** 2).sum(0)
    m2 = (counts.unsqueeze(-1) * variances).sum(0) + spread
    return Moments(float(total), mean, m2)

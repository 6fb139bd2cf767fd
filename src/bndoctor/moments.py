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

__all__ = ["Moments", "merge", "pool", "pool_columns", "pool_step", "pool_two"]


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


def pool_columns(
    counts: torch.Tensor, means: torch.Tensor, variances: torch.Tensor, *, dtype: torch.dtype | None = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool the rows of ``(B, C)`` moments; ``counts`` is ``(B,)`` or ``(B, C)`` (zero rows are ignored).

    Args:
        counts: samples per row, ``(B,)`` or per row and column ``(B, C)``.
        means: per-row means ``(B, C)``.
        variances: per-row biased variances ``(B, C)``.
        dtype: the dtype to pool in (``None``: the dtype of ``means``).

    Returns:
        Per-column ``(N, mean, M2)``; a column with no samples has mean and M2 zero.
    """
    dtype = dtype or means.dtype
    means = means.to(dtype)
    variances = variances.to(dtype)
    counts = counts.to(dtype)
    if counts.dim() == 1:
        counts = counts.unsqueeze(-1).expand_as(means)
    total = counts.sum(0)
    safe = total.clamp(min=1.0)
    mean = (counts * means).sum(0) / safe
    m2 = (counts * variances).sum(0) + (counts * (means - mean) ** 2).sum(0)
    return total, torch.where(total > 0, mean, torch.zeros_like(mean)), torch.where(total > 0, m2, torch.zeros_like(m2))


def pool(counts: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> Moments:
    """Pool groups: ``counts`` (B,), ``means`` and biased ``variances`` (B, C). Zero-count groups are ignored."""
    total, mean, m2 = pool_columns(counts, means, variances)
    return Moments(float(total[0]) if total.numel() else 0.0, mean, m2)


def merge(parts: list[Moments]) -> Moments:
    """Pool several :class:`Moments` of the same channels (e.g. from different ranks or passes)."""
    parts = [p for p in parts if p.count > 0] or parts[:1]
    counts = torch.tensor([p.count for p in parts], dtype=torch.float64, device=parts[0].mean.device)
    means = torch.stack([p.mean for p in parts])
    variances = torch.stack([p.m2 / max(p.count, 1.0) for p in parts])
    return pool(counts, means, variances)


def pool_two(
    count_a: float, mean_a: torch.Tensor, m2_a: torch.Tensor, count_b: float, mean_b: torch.Tensor, m2_b: torch.Tensor
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Pool two groups given as (count, mean, sum of squared deviations) (Chan, Golub and LeVeque 1979).

    The incremental form for running windows; the groups' counts are Python numbers, so no host sync.
    """
    total = count_a + count_b
    delta = mean_b - mean_a
    return total, mean_a + delta * (count_b / total), m2_a + m2_b + delta * delta * (count_a * count_b / total)


def pool_step(
    count: torch.Tensor,
    mean: torch.Tensor,
    m2: torch.Tensor,
    n: int | torch.Tensor,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    *,
    inplace: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool one batch into a running group held as tensors (Chan et al.'s update in Welford's form).

    With ``delta = m - mean`` and the new mean ``mean' = mean + delta n / (count + n)``::

        count' = count + n
        M2'    = M2 + n v + n delta (m - mean')

    where the last term is ``delta^2 count n / count'``: no cancellation. All on the device: no host read.

    Args:
        count, mean, m2: the running group's count (shape 1), per-channel mean and sum of squared deviations.
        n: the batch's count, a positive int, or a tensor (a count pooled over ranks) that may be 0, with
            ``count`` 0 too: the group then stays as it is.
        batch_mean, batch_var: the batch's per-channel mean and biased variance.
        inplace: write the new values into ``count``, ``mean`` and ``m2``; else return new tensors.

    Returns:
        ``(count', mean', M2', m - mean')``: the last is the batch mean against the pooled one.
    """
    delta = batch_mean - mean
    if isinstance(n, torch.Tensor):  # counts pooled over ranks: every rank may have been empty so far
        total = count + n
        share = (n / total.clamp(min=1.0)).to(mean.dtype)  # the batch's weight in the pooled mean
        new_mean = torch.lerp(mean, batch_mean, share)
        new_m2 = torch.addcmul(m2 + batch_var * n, delta, delta * (count * share))
        if not inplace:
            return total, new_mean, new_m2, batch_mean - new_mean
        for old, new in ((count, total), (mean, new_mean), (m2, new_m2)):
            old.copy_(new)
        return count, mean, m2, batch_mean - mean
    if inplace:
        count.add_(n)
        mean.addcdiv_(delta, count, value=n)
        spread = batch_mean - mean
        m2.add_(batch_var, alpha=n).addcmul_(delta, spread, value=n)
        return count, mean, m2, spread
    total = count + n
    new_mean = torch.addcdiv(mean, delta, total, value=n)
    spread = batch_mean - new_mean
    return total, new_mean, torch.addcmul(torch.add(m2, batch_var, alpha=n), delta, spread, value=n), spread

"""bndoctor.moments against float64 statistics of the concatenated raw values."""

from __future__ import annotations

import pytest
import torch

from bndoctor.moments import pool_columns, pool_step

CHANNELS = 5


def _batches(sizes, seed=0):
    """Batches (n, C) whose means differ a lot (the case where averaging variances is wrong)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, CHANNELS, generator=gen, dtype=torch.float64) * (1 + i) + 3 * i for i, n in enumerate(sizes)]


def _oracle(batches):
    x = torch.cat(batches)
    return x.shape[0], x.mean(0), ((x - x.mean(0)) ** 2).sum(0)


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int-count", "tensor-count"])
def test_pool_step_equals_the_statistics_of_all_batches_so_far(inplace, as_tensor):
    batches = _batches([2, 7, 1, 4])
    window = [torch.zeros(1, dtype=torch.float64), torch.zeros(CHANNELS, dtype=torch.float64)]
    window.append(torch.zeros(CHANNELS, dtype=torch.float64))
    for k, b in enumerate(batches, 1):
        n = torch.tensor(float(b.shape[0]), dtype=torch.float64) if as_tensor else b.shape[0]
        before = [t.clone() for t in window]
        count, mean, m2, spread = pool_step(*window, n, b.mean(0), b.var(0, correction=0), inplace=inplace)
        if inplace:
            assert count is window[0] and mean is window[1] and m2 is window[2]
        else:
            assert all(torch.equal(a, c) for a, c in zip(before, window))  # the inputs are left alone
            window = [count, mean, m2]
        n_all, mean_all, m2_all = _oracle(batches[:k])
        assert float(count) == n_all
        torch.testing.assert_close(mean, mean_all, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m2, m2_all, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(spread, b.mean(0) - mean_all, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("inplace", [True, False])
def test_pool_step_with_an_empty_tensor_count_leaves_an_empty_group_empty(inplace):
    """All ranks empty so far: count 0 pooled with count 0 stays 0, with finite zero statistics."""
    zeros = [torch.zeros(1), torch.zeros(CHANNELS), torch.zeros(CHANNELS)]
    count, mean, m2, _ = pool_step(
        *zeros, torch.tensor(0.0), torch.zeros(CHANNELS), torch.zeros(CHANNELS), inplace=inplace
    )
    assert float(count) == 0 and not mean.any() and not m2.any()


def test_pool_columns_keeps_the_input_dtype_when_asked_and_ignores_empty_rows():
    batches = _batches([3, 0, 5])
    counts = torch.tensor([3.0, 0.0, 5.0])
    means = torch.stack(
        [b.mean(0) if len(b) else torch.full((CHANNELS,), float("nan"), dtype=torch.float64) for b in batches]
    ).float()
    variances = torch.stack(
        [b.var(0, correction=0) if len(b) else torch.zeros(CHANNELS, dtype=torch.float64) for b in batches]
    ).float()
    means[1] = 0.0  # an empty row holds zeros (as pool_over_ranks sends)
    total, mean, m2 = pool_columns(counts, means, variances, dtype=None)
    assert mean.dtype == torch.float32 and m2.dtype == torch.float32
    n_all, mean_all, m2_all = _oracle(batches)
    assert torch.all(total == n_all)
    torch.testing.assert_close(mean.double(), mean_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m2.double(), m2_all, rtol=1e-5, atol=1e-4)
    assert pool_columns(counts, means, variances)[1].dtype == torch.float64  # the default pools in float64

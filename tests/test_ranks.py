"""rank_divergence and merge_running_stats with real gloo ranks."""

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from bndoctor.moments import pool
from tests._dist import run_ranks


def _net(sync):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3), nn.BatchNorm1d(3)
    )
    return bd.to_sync_bn(net) if sync else net


def _train_rank(rank, world_size, sync, merge):
    net = _net(sync)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(5):  # each rank sees its own "class": correlated data per rank
        net(torch.randn(4, 1, 4, 4, generator=gen) * (1 + rank) + 3 * rank)
    before = bd.rank_divergence(net)
    if merge:
        bd.merge_running_stats(net, samples=20 * (rank + 1))
    after = bd.rank_divergence(net)
    stats = {
        n: (m.running_mean.clone(), m.running_var.clone())
        for n, m in net.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    return before.max, after.max, stats


def test_local_bn_diverges_and_merge_makes_ranks_identical_with_pooled_formula():
    results = run_ranks(_train_rank, 3, False, True)
    for r in results:
        assert not isinstance(r, BaseException), r
    assert all(before > 0.5 for before, _, _ in results)
    assert all(after < 1e-6 for _, after, _ in results)
    # every rank holds the weighted pooled statistics of the three ranks
    local = [run_ranks_free_stats(rank) for rank in range(3)]
    weights = torch.tensor([20.0, 40.0, 60.0])
    for name, (mean, var) in results[0][2].items():
        means = torch.stack([s[name][0] for s in local]).double()
        variances = torch.stack([s[name][1] for s in local]).double()
        expected = pool(weights, means, variances)
        torch.testing.assert_close(mean.double(), expected.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var.double(), expected.var_biased, rtol=1e-5, atol=1e-6)
        assert expected.var_biased.sum() > (weights[:, None] * variances).sum(0).sum() / 120  # spread included


def run_ranks_free_stats(rank):
    """What a rank's local BN statistics are before merging (the same loop, single process)."""
    net = _net(False)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(5):
        net(torch.randn(4, 1, 4, 4, generator=gen) * (1 + rank) + 3 * rank)
    return {
        n: (m.running_mean.clone(), m.running_var.clone())
        for n, m in net.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def test_sync_bn_keeps_ranks_identical():
    results = run_ranks(_train_rank, 2, True, False)
    for r in results:
        assert not isinstance(r, BaseException), r
    assert all(before < 1e-6 for before, _, _ in results)


def test_single_process_and_bad_input():
    net = _net(False)
    report = bd.rank_divergence(net)
    assert report.world_size == 1 and report.max == 0.0 and len(report.layers) == 2
    assert "largest divergence 0" in str(report) and report.to_json()["layers"][0]["name"] == "1"
    bd.merge_running_stats(net)  # a no-op on one rank
    with pytest.raises(bd.BNDoctorError, match="non-negative number"):
        bd.merge_running_stats(net, samples=-1)

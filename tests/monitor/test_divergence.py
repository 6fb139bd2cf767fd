"""Under DDP-style training on 2 gloo ranks the monitor reports cross-rank divergence: large with local BN
and correlated data, zero with SyncBatchNorm."""

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from bndoctor.monitor import BNMonitor, ListSink
from tests._dist import run_ranks


def _rank(rank, world_size, sync):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    if sync:
        model = bd.to_sync_bn(model)
    sink = ListSink()
    monitor = BNMonitor(model, every=1, divergence_every=2, keep=True, sink=sink)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(6):
        x = torch.randn(4, 1, 6, 6, generator=gen) + 3.0 * rank  # each rank sees its own "class"
        model(x)
    monitor.close()
    divergence = [r["max"] for r in monitor.records if r["kind"] == "divergence"]
    return {"divergence": divergence, "alerts": [f.code for f in monitor.alerts], "written": len(sink.records)}


@pytest.mark.parametrize("sync", [False, True])
def test_divergence_is_reported_under_local_bn_and_vanishes_with_syncbn(sync):
    results = run_ranks(_rank, 2, sync)
    for r in results:
        assert not isinstance(r, BaseException), r
    rank0, rank1 = results
    assert len(rank0["divergence"]) == 3  # every 2nd of 6 samples
    assert rank1["written"] == 0 < rank0["written"]  # sinks and logs on rank 0 only
    if sync:
        assert max(rank0["divergence"]) < 1e-6 and "BN503" not in rank0["alerts"]
    else:
        assert min(rank0["divergence"]) > 0.5 and "BN503" in rank0["alerts"]

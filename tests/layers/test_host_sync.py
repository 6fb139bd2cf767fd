"""No host-device synchronisation in a training micro-step of bndoctor's layers.

A ``TorchDispatchMode`` records every aten op of one micro-step (forward and
backward; and, separately, the optimizer step whose hook closes the windows); none may
read a tensor back to the host (``_local_scalar_dense`` is what ``.item()``,
``float(t)``, ``bool(t)`` and ``if t:`` run). On a GPU each such read would
stall the stream. With sync, on 2 gloo ranks.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bndoctor as bd
from bndoctor.layers import _renormalize
from tests._dist import run_ranks

HOST_READS = ("aten._local_scalar_dense", "aten.item", "aten.equal", "aten.is_nonzero")


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _net(side=8):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * side * side, 10)
    )


def _build(name, sync=False, side=8):
    if name.startswith("accum"):
        return bd.to_accum_bn(_net(side), mode=name.split("-")[1], sync=sync)
    if name == "batch-renorm":
        return bd.to_batch_renorm(_net(side), warmup_steps=10)
    return bd.to_sync_bn(_net(side))


#: Input sides whose BN input (2 x 8 x side x side) takes the folded and the one-pass renorm path.
SIDES = {"folded": 8, "one-pass": 32}


def _host_reads(name, sync=False, side=8):
    model = _build(name, sync, side).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if name.startswith("accum"):
        bd.accumulate_bn(model, optimizer)
    x, y = torch.randn(2, 1, side, side), torch.randint(0, 10, (2,))
    F.cross_entropy(model(x), y).backward()  # first micro-batch of the window (and lazy set-up) outside
    recorder = Recorder()
    with recorder:
        F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return [op for op in recorder.ops if op.startswith(HOST_READS)], len(recorder.ops)


@pytest.mark.parametrize("path", list(SIDES))
@pytest.mark.parametrize("name", ["accum-renorm", "accum-progressive", "accum-blend", "batch-renorm"])
def test_no_host_read_in_a_micro_step(name, path):
    assert _renormalize.one_pass(torch.empty(2, 8, SIDES[path], SIDES[path])) == (path == "one-pass")
    reads, ops = _host_reads(name, side=SIDES[path])
    assert ops > 10 and reads == []


def _on_ranks(rank, world, name, side):
    return _host_reads(name, sync=True, side=side)


@pytest.mark.parametrize("path", list(SIDES))
@pytest.mark.parametrize("name", ["accum-renorm", "sync-bn"])
def test_no_host_read_in_a_synced_micro_step(name, path):
    for reads, ops in run_ranks(_on_ranks, 2, name, SIDES[path], timeout=30):
        assert ops > 10 and reads == []


def test_the_recorder_sees_a_host_read():
    recorder = Recorder()
    with recorder:
        float(torch.ones(1).sum())
    assert any(op.startswith(HOST_READS) for op in recorder.ops)


@pytest.mark.parametrize("mode", ["renorm", "blend"])
def test_no_host_read_when_the_optimizer_step_closes_the_windows(mode):
    """The hook's close (all layers together; blend one by one) decides validity on the device too."""
    torch.manual_seed(0)
    model = bd.to_accum_bn(
        nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4), nn.Flatten()),
        mode=mode,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bd.accumulate_bn(model, optimizer)
    for _ in range(2):
        model(torch.randn(2, 1, 8, 8)).square().mean().backward()
    recorder = Recorder()
    with recorder:
        optimizer.step()
    assert not [op for op in recorder.ops if op.startswith(HOST_READS)]
    assert not any(m.window_open for m in model.modules() if isinstance(m, bd.AccumBatchNorm))
    assert all(int(m.num_batches_tracked) == 1 for m in model.modules() if isinstance(m, bd.AccumBatchNorm))

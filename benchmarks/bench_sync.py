"""SyncBatchNorm cost: step time on 2 gloo ranks against local BN and a naive synced BN.

Each of 2 local processes (1 thread each) trains the tiny ResNet on digits-sized
inputs with local ``nn.BatchNorm2d``, with ``bndoctor.SyncBatchNorm`` and with
``NaiveSyncBN`` below — what one writes from the formulas: the per-channel sum
and sum of squares of the local batch and its count in one differentiable
``all_reduce``, the output as ``(x - mean) * invstd * weight + bias`` in
autograd (forward + backward of one micro-batch, no optimizer step, DDP
gradient all-reduce included for all), in interleaved rounds; the median per
variant is kept. Target (#18): bndoctor's layer <= 0.9 x the naive one.
Collectives (all_reduce, all_gather) are counted during one synced micro-step
and divided by the number of BN layers (expected: 2, one in forward, one in
backward).

    python benchmarks/bench_sync.py --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import bndoctor
from _publish import publish
from bndoctor.models import tiny_resnet

WORLD = 2


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class NaiveSyncBN(torch.nn.BatchNorm2d):
    """The straightforward synced BN: one differentiable all_reduce of (sum, sum of squares, count)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        channels = x.shape[1]
        count = torch.full((1,), float(x.numel() // channels))
        total = _AllReduce.apply(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        n = total[-1]
        mean = total[:channels] / n
        var = total[channels:-1] / n - mean * mean
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        shape = (1, channels, 1, 1)
        return (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape) * self.weight.view(
            shape
        ) + self.bias.view(shape)


def _naive(model):
    for name, child in model.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            naive = NaiveSyncBN(child.num_features, child.eps, child.momentum)
            naive.load_state_dict(child.state_dict())
            setattr(model, name, naive)
        else:
            _naive(child)
    return model


def _steps(model, x, y, steps):
    start = time.perf_counter()
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
    return (time.perf_counter() - start) / steps


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast")


def _count_collectives(fn) -> int:
    import torch.distributed as dist

    calls = []
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def counting(original):
        def call(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(dist, name, counting(original))
    try:
        fn()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return len(calls)


def _rank(rank, port, batches, rounds, steps, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    for batch in batches:
        torch.backends.mkldnn.enabled = batch > 8
        torch.manual_seed(0)
        local = DDP(tiny_resnet())
        synced = DDP(bndoctor.to_sync_bn(tiny_resnet()))
        torch.manual_seed(0)
        naive = DDP(_naive(tiny_resnet()))
        x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(rank))
        y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(rank))
        for model in (local, synced, naive):
            _steps(model, x, y, 3)
        times = {"local": [], "sync": [], "naive": []}
        for _ in range(rounds):
            times["local"].append(_steps(local, x, y, steps))
            times["sync"].append(_steps(synced, x, y, steps))
            times["naive"].append(_steps(naive, x, y, steps))
        with synced.no_sync():  # count SyncBN's collectives only, not DDP's gradient all-reduce
            calls = _count_collectives(lambda: F.cross_entropy(synced(x), y).backward())  # noqa: B023
        layers = sum(isinstance(m, bndoctor.SyncBatchNorm) for m in synced.modules())
        results[batch] = (*(statistics.median(times[k]) for k in ("local", "sync", "naive")), calls / layers)
    dist.destroy_process_group()
    if rank == 0:
        with open(os.path.join(out_dir, "result.pkl"), "wb") as f:
            pickle.dump(results, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--update", type=Path)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank, args=(port, args.batches, args.rounds, args.steps, out_dir), nprocs=WORLD)
        with open(os.path.join(out_dir, "result.pkl"), "rb") as f:
            results = pickle.load(f)
    lines = [
        f"torch {torch.__version__}, {platform.machine()}, {WORLD} gloo ranks on one machine, 1 thread each; "
        f"tiny ResNet (9 BN layers), forward + backward per micro-step, DDP for both; median of {args.rounds} "
        f"interleaved rounds x {args.steps} steps.",
        "",
        "| micro-batch per rank | local BN ms/step | naive synced BN ms/step | bndoctor SyncBatchNorm ms/step | "
        "bndoctor / local | bndoctor / naive (target <= 0.9) | collectives per BN layer per micro-step |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, (local, sync, naive, per_layer) in results.items():
        lines.append(
            f"| {batch} | {local * 1e3:.2f} | {naive * 1e3:.2f} | {sync * 1e3:.2f} | {sync / local:.2f} | "
            f"{sync / naive:.2f} | {per_layer:g} |"
        )
    text = "\n".join(lines)
    publish(
        text,
        args.update,
        f"python benchmarks/bench_sync.py --rounds {args.rounds} --steps {args.steps}",
        key="bench_sync",
        title="SyncBatchNorm: cost on CPU (gloo)",
    )


if __name__ == "__main__":
    main()

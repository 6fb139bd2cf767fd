"""SyncBatchNorm cost: step time on 2 gloo ranks as a ratio to local BN, and collectives per layer.

Each of 2 local processes (1 thread each) trains the tiny ResNet on digits-sized
inputs with local ``nn.BatchNorm2d`` and with ``bndoctor.SyncBatchNorm``
(forward + backward of one micro-batch, no optimizer step, DDP gradient
all-reduce included for both), in interleaved rounds; the median per variant
is kept. ``torch.distributed.all_reduce`` is counted during one synced
micro-step and divided by the number of BN layers (expected: 2, one in
forward, one in backward).

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


def _steps(model, x, y, steps):
    start = time.perf_counter()
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
    return (time.perf_counter() - start) / steps


def _count_all_reduce(fn) -> int:
    import torch.distributed as dist

    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        fn()
    finally:
        dist.all_reduce = original
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
        x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(rank))
        y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(rank))
        for model in (local, synced):
            _steps(model, x, y, 3)
        times = {"local": [], "sync": []}
        for _ in range(rounds):
            times["local"].append(_steps(local, x, y, steps))
            times["sync"].append(_steps(synced, x, y, steps))
        with synced.no_sync():  # count SyncBN's collectives only, not DDP's gradient all-reduce
            calls = _count_all_reduce(lambda: F.cross_entropy(synced(x), y).backward())  # noqa: B023
        layers = sum(isinstance(m, bndoctor.SyncBatchNorm) for m in synced.modules())
        results[batch] = (statistics.median(times["local"]), statistics.median(times["sync"]), calls / layers)
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
        "| micro-batch per rank | local BN ms/step | bndoctor SyncBatchNorm ms/step | ratio | all_reduce calls per "
        "BN layer per micro-step |",
        "|---|---|---|---|---|",
    ]
    for batch, (local, sync, per_layer) in results.items():
        lines.append(f"| {batch} | {local * 1e3:.2f} | {sync * 1e3:.2f} | {sync / local:.2f} | {per_layer:g} |")
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

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

With ``--device cuda`` both ranks share one GPU (NCCL refuses two ranks on one
device, so gloo carries the CUDA tensors) and ``torch.nn.SyncBatchNorm``, which
trains only on CUDA, joins the comparison.

    python benchmarks/bench_sync.py --update BENCHMARKS.md
    python benchmarks/bench_sync.py --device cuda --update BENCHMARKS.md   # its own section
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import statistics
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import bndoctor
from _device import add_arguments, clock, command_suffix, section, where
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
        count = torch.full((1,), float(x.numel() // channels), device=x.device)
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
    start = clock(x.device)
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
    return (clock(x.device) - start) / steps


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


def _rank(rank, port, batches, rounds, steps, out_dir, device_name):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    device = torch.device(device_name)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    for batch in batches:
        torch.backends.mkldnn.enabled = batch > 8
        builders = {
            "local": tiny_resnet,
            "sync": lambda: bndoctor.to_sync_bn(tiny_resnet()),
            "naive": lambda: _naive(tiny_resnet()),
        }
        if device.type == "cuda":
            builders["torch"] = lambda: torch.nn.SyncBatchNorm.convert_sync_batchnorm(tiny_resnet())
        x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(rank)).to(device)
        y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(rank)).to(device)
        models, failed = {}, {}
        for name, build in builders.items():
            torch.manual_seed(0)
            try:
                models[name] = DDP(build().to(device))
                _steps(models[name], x, y, 3)
            except (RuntimeError, ValueError) as exc:  # e.g. a collective gloo cannot run on this device (all ranks)
                failed[name] = str(exc).strip().splitlines()[0][:160]
                models.pop(name, None)
        times = {k: [] for k in models}
        for _ in range(rounds):
            for name, model in models.items():
                times[name].append(_steps(model, x, y, steps))
        per_layer = float("nan")
        if "sync" in models:
            synced = models["sync"]
            with synced.no_sync():  # count SyncBN's collectives only, not DDP's gradient all-reduce
                calls = _count_collectives(lambda: F.cross_entropy(synced(x), y).backward())  # noqa: B023
            per_layer = calls / sum(isinstance(m, bndoctor.SyncBatchNorm) for m in synced.modules())
        results[batch] = ({k: statistics.median(v) for k, v in times.items()}, per_layer, failed)
    if rank == 0:  # written before tear-down, which can abort after DDP on gloo (docs/trainers/torchrun.md)
        with open(os.path.join(out_dir, "result.pkl"), "wb") as f:
            pickle.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--update", type=Path)
    add_arguments(parser, "bench_sync")
    args = parser.parse_args()
    device = torch.device(args.device)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_rank, args=(port, args.batches, args.rounds, args.steps, out_dir, args.device), nprocs=WORLD)
        except mp.ProcessExitedException:  # a rank died in tear-down; the result, if written, is complete
            if not os.path.exists(os.path.join(out_dir, "result.pkl")):
                raise
        with open(os.path.join(out_dir, "result.pkl"), "rb") as f:
            results = pickle.load(f)
    on_gpu = device.type == "cuda"
    place = f"one {where(device)} shared by both" if on_gpu else f"one machine, {where(device)} each"
    lines = [
        f"torch {torch.__version__}, {WORLD} gloo ranks on {place}; "
        f"tiny ResNet (9 BN layers), forward + backward per micro-step, DDP for all; median of {args.rounds} "
        f"interleaved rounds x {args.steps} steps.",
        "",
        "| micro-batch per rank | local BN ms/step | naive synced BN ms/step | bndoctor SyncBatchNorm ms/step | "
        + ("torch.nn.SyncBatchNorm ms/step | bndoctor / torch | " if on_gpu else "")
        + "bndoctor / local | bndoctor / naive (target <= 0.9) | collectives per BN layer per micro-step |",
        "|---|---|---|---|---|---|---|" + ("---|---|" if on_gpu else ""),
    ]

    def ms(t, name):
        return f"{t[name] * 1e3:.2f}" if name in t else "failed"

    def ratio(t, a, b):
        return f"{t[a] / t[b]:.2f}" if a in t and b in t else "-"

    notes = []
    for batch, (t, per_layer, failed) in results.items():
        theirs = f"{ms(t, 'torch')} | {ratio(t, 'sync', 'torch')} | " if on_gpu else ""
        lines.append(
            f"| {batch} | {ms(t, 'local')} | {ms(t, 'naive')} | {ms(t, 'sync')} | {theirs}"
            f"{ratio(t, 'sync', 'local')} | {ratio(t, 'sync', 'naive')} | {per_layer:g} |"
        )
        notes += [f"- micro-batch {batch}, {name}: {error}" for name, error in failed.items()]
    if notes:
        lines += ["", "Variants that could not run:", *notes]
    text = "\n".join(lines)
    publish(
        text,
        args.update,
        f"python benchmarks/bench_sync.py --rounds {args.rounds} --steps {args.steps}{command_suffix(args)}",
        key=section(args, "bench_sync"),
        title="SyncBatchNorm: cost on CUDA (gloo, one GPU)" if on_gpu else "SyncBatchNorm: cost on CPU (gloo)",
    )


if __name__ == "__main__":
    main()

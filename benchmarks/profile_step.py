"""Where a micro-step's time goes with each BN layer type (torch.profiler), eager or compiled, on the device given.

For plain BN, accumulation-aware BN (renorm) and Batch Renorm: the median
time of a micro-step, the kernels it launches, the host-device copies and
synchronisations it makes, and the host operations with the most time of
their own. On a GPU at micro-batch 2 a step's time is mostly the host
launching kernels, so the launch count says most of what a layer costs.

    python benchmarks/profile_step.py --device cuda --compile --model tiny
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import bndoctor
from _device import clock
from bndoctor.models import resnet18, tiny_resnet

MICRO, ACCUM = 2, 8
MODELS = {"tiny": (tiny_resnet, (1, 8, 8)), "resnet18": (lambda: resnet18(num_classes=10), (3, 64, 64))}
LAYERS = {"plain BN": lambda m: m, "AccumBN renorm": bndoctor.to_accum_bn, "BatchRenorm": bndoctor.to_batch_renorm}
LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "aten::item")


def _window(step, opt, xs, ys) -> list[float]:
    times = []
    for x, y in zip(xs, ys):
        start = clock(x.device)
        (F.cross_entropy(step(x), y) / ACCUM).backward()
        times.append(clock(x.device) - start)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    factory, shape = MODELS[args.model]
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(MICRO, *shape, generator=gen).to(device) for _ in range(ACCUM)]
    ys = [torch.randint(0, 10, (MICRO,), generator=gen).to(device) for _ in range(ACCUM)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    print(f"torch {torch.__version__}, {args.model}, {'compiled' if args.compile else 'eager'}, {device}")
    for name, convert in LAYERS.items():
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = convert(factory()).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        if name.startswith("AccumBN"):
            bndoctor.accumulate_bn(model, opt)
        step = torch.compile(model) if args.compile else model
        for _ in range(3):
            _window(step, opt, xs, ys)
        times = [t for _ in range(5) for t in _window(step, opt, xs, ys)]
        with profile(activities=activities) as prof:
            _window(step, opt, xs, ys)
        events = prof.key_averages()
        per = {e.key: e.count / ACCUM for e in events}
        launches = sum(per.get(k, 0) for k in LAUNCH)
        syncs = {k: per[k] for k in SYNC if k in per}
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA") / ACCUM
        print(
            f"\n== {name}: {statistics.median(times) * 1e3:.3f} ms per micro-step (median of {len(times)}); "
            f"per micro-step (window of {ACCUM}, optimizer step included): {launches:.1f} launches, "
            f"{kernels:.1f} device kernels, {sum(per.get(k, 0) for k in per if k.startswith('aten::')):.0f} aten "
            f"calls; syncs/copies {syncs or 'none'}"
        )
        lookup = next((e for e in events if e.key == "TorchDynamo Cache Lookup"), None)
        if lookup is not None:
            print(f"   compiled-code lookup (guards): {lookup.cpu_time_total / ACCUM:.1f} us per micro-step")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()

"""Step time of accumulation-aware BN relative to plain BN at micro-batch 2 (target <= 1.10).

The tiny ResNet trains on digits-shaped inputs with 32 micro-batches of 2 per
optimizer step (forward + backward per micro-batch, SGD step per window), with
plain ``nn.BatchNorm2d`` and with ``bndoctor.AccumBatchNorm`` in each mode
(and the two-pass variant: ``collect_window`` over the window first);
interleaved rounds, median per variant, one thread.

    python benchmarks/bench_accum.py --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bndoctor
from _publish import publish
from bndoctor.models import resnet18, tiny_resnet

MICRO, ACCUM = 2, 32
MODELS = {
    "tiny-resnet (77k params, 1x8x8)": (tiny_resnet, (1, 8, 8)),
    "resnet18 (ours, 11M params, 3x64x64)": (lambda: resnet18(num_classes=10), (3, 64, 64)),
}


def _variants(factory) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    out = {}
    for name in ("plain BN", "AccumBN renorm", "AccumBN renorm, two passes", "AccumBN progressive", "AccumBN blend"):
        torch.manual_seed(0)
        model = factory()
        if name != "plain BN":
            model = bndoctor.to_accum_bn(model, mode=name.split(",")[0].split()[-1])
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if name != "plain BN":
            bndoctor.accumulate_bn(model, opt)
        out[name] = (model.train(), opt)
    return out


def _window(model, opt, xs, ys, two_pass: bool = False) -> float:
    start = time.perf_counter()
    if two_pass:
        bndoctor.collect_window(model, xs)
    for x, y in zip(xs, ys):
        (F.cross_entropy(model(x), y) / ACCUM).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / ACCUM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--update", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        f"torch {torch.__version__}, {platform.machine()}, 1 thread; micro-batch {MICRO} x {ACCUM} accumulation "
        f"steps, forward + backward per micro-batch and one SGD step per window; median of {args.rounds} "
        "interleaved windows.",
        "",
        "| model | oneDNN | layer | ms per micro-step | ratio to plain BN (target <= 1.10; <= 1.03 for ResNet-18) |",
        "|---|---|---|---|---|",
    ]
    # oneDNN off: as the harness runs (native kernels are faster at batch 2); on: torch's default
    for (label, (factory, shape)), onednn in [(m, o) for m in MODELS.items() for o in (False, True)]:
        torch.backends.mkldnn.enabled = onednn
        gen = torch.Generator().manual_seed(0)
        xs = [torch.randn(MICRO, *shape, generator=gen) for _ in range(ACCUM)]
        ys = [torch.randint(0, 10, (MICRO,), generator=gen) for _ in range(ACCUM)]
        variants = _variants(factory)
        for name, (model, opt) in variants.items():
            _window(model, opt, xs, ys, "two passes" in name)
        times = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, (model, opt) in variants.items():
                times[name].append(_window(model, opt, xs, ys, "two passes" in name))
        base = statistics.median(times["plain BN"])
        for name in variants:
            t = statistics.median(times[name])
            lines.append(f"| {label} | {'on' if onednn else 'off'} | {name} | {t * 1e3:.2f} | {t / base:.2f} |")
    text = "\n".join(lines)
    publish(
        text,
        args.update,
        f"python benchmarks/bench_accum.py --rounds {args.rounds}",
        key="bench_accum",
        title="Accumulation-aware BN: step time",
    )


if __name__ == "__main__":
    main()

"""Training-step time with ``bndoctor.BNMonitor`` at its default settings relative to none (target <= 1.03).

Forward, backward and SGD step per batch; the monitor samples one forward in
100 (``every=100``, the default) and writes JSONL to a temporary file.
Interleaved blocks of 100 steps, median per variant, one thread.

    python benchmarks/bench_monitor.py --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from _device import add_arguments, clock, command_suffix, section, where
from _publish import publish
from bndoctor.models import resnet18, tiny_resnet
from bndoctor.monitor import BNMonitor

STEPS = 100
MODELS = {
    "tiny-resnet (harness, 77k params), batch 2 x 1x8x8": (tiny_resnet, (2, 1, 8, 8), 100),
    "resnet18 (11M params), batch 8 x 3x64x64": (lambda: resnet18(num_classes=10), (8, 3, 64, 64), 100),
}


def _block(model, opt, x, y, steps) -> float:
    start = clock(x.device)
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (clock(x.device) - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--update", type=Path)
    add_arguments(parser, "bench_monitor")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    lines = [
        f"torch {torch.__version__}, {where(device)}; forward + backward + SGD step; BNMonitor "
        f"defaults (every=100, JSONL sink); median of {args.rounds} interleaved blocks of steps.",
        "",
        "| model | ms per step, no monitor | ms per step, monitor | ratio (target <= 1.03) |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for label, (factory, shape, steps) in MODELS.items():
            torch.backends.mkldnn.enabled = shape[0] >= 8
            gen = torch.Generator().manual_seed(0)
            x, y = torch.randn(*shape, generator=gen), torch.randint(0, 10, (shape[0],), generator=gen)
            x, y = x.to(device), y.to(device)
            variants = {}
            for name in ("plain", "monitor"):
                torch.manual_seed(0)
                model = factory().to(device).train()
                opt = torch.optim.SGD(model.parameters(), lr=0.01)
                if name == "monitor":
                    BNMonitor(model, sink=Path(tmp) / f"{len(variants)}.jsonl")
                variants[name] = (model, opt)
                _block(model, opt, x, y, 5)
            times = {k: [] for k in variants}
            for _ in range(args.rounds):
                for name, (model, opt) in variants.items():
                    times[name].append(_block(model, opt, x, y, steps))
            base, mon = statistics.median(times["plain"]), statistics.median(times["monitor"])
            lines.append(f"| {label} | {base * 1e3:.2f} | {mon * 1e3:.2f} | {mon / base:.3f} |")
    text = "\n".join(lines)
    publish(
        text,
        args.update,
        f"python benchmarks/bench_monitor.py --rounds {args.rounds}{command_suffix(args)}",
        key=section(args, "bench_monitor"),
        title="BNMonitor: overhead at default settings" + (" on CUDA" if device.type == "cuda" else ""),
    )


if __name__ == "__main__":
    main()

"""Step time under torch.compile (default backend): accumulation-aware BN / plain BN, both compiled (target <= 1.03).

Batch Renorm beside it (no target; under compile it reads its buffers through
copies the backward partitioner saves, see bndoctor/layers/renorm.py).

The tiny ResNet and the ResNet-18-sized network at micro-batch 2, forward +
backward per micro-batch, an SGD step every 8; each model compiled once
(compile time excluded: the first window warms up), then interleaved windows,
median, one thread, oneDNN off (as the harness).

    python benchmarks/bench_compile.py --update BENCHMARKS.md
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

import bndoctor
from _device import clock, command_suffix, section, timing_run, where
from _publish import publish
from bndoctor.models import resnet18, tiny_resnet

MICRO, ACCUM = 2, 8
LAYERS = {
    "plain BN": lambda model: model,
    "AccumBN renorm": bndoctor.to_accum_bn,
    "BatchRenorm": bndoctor.to_batch_renorm,
}
MODELS = {
    "tiny-resnet (77k params, 1x8x8)": (tiny_resnet, (1, 8, 8)),
    "resnet18 (ours, 11M params, 3x64x64)": (lambda: resnet18(num_classes=10), (3, 64, 64)),
}


def _window(step, opt, xs, ys) -> tuple[float, float]:
    """(ms per micro-step, the optimizer step included; ms of the optimizer step with its hooks: the window close)."""
    start = clock(xs[0].device)
    for x, y in zip(xs, ys):
        (F.cross_entropy(step(x), y) / ACCUM).backward()
    stepping = clock(xs[0].device)
    opt.step()
    opt.zero_grad(set_to_none=True)
    end = clock(xs[0].device)
    return (end - start) / ACCUM, end - stepping


def main() -> None:
    args, device, dnn = timing_run(__doc__, "bench_compile")
    lines = [
        f"torch {torch.__version__}, {where(device)}{dnn}; micro-batch {MICRO} x {ACCUM} "
        f"accumulation steps; `torch.compile(model)` (inductor); median of {args.rounds} interleaved windows after "
        "a warm-up window (compile time excluded).",
        "",
        "| model | layer | eager ms per micro-step | compiled ms per micro-step | compiled: optimizer step and window "
        "close, ms per window | compiled / compiled plain BN (target <= 1.03) |",
        "|---|---|---|---|---|---|",
    ]
    for label, (factory, shape) in MODELS.items():
        # Both networks run the same forward code, so without a reset the second one's compiles find the first's
        # cache entries: its input shape counts as changed (dynamo then traces symbolic shapes) and its variants
        # count towards the first's recompile limit. A user compiles one network: each starts from a clean cache.
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(0)
        xs = [torch.randn(MICRO, *shape, generator=gen).to(device) for _ in range(ACCUM)]
        ys = [torch.randint(0, 10, (MICRO,), generator=gen).to(device) for _ in range(ACCUM)]
        runs = {}
        for name, convert in LAYERS.items():
            for kind in ("eager", "compiled"):
                torch.manual_seed(0)
                model = convert(factory()).to(device).train()
                opt = torch.optim.SGD(model.parameters(), lr=0.01)
                if name.startswith("AccumBN"):
                    bndoctor.accumulate_bn(model, opt)
                runs[(name, kind)] = (torch.compile(model) if kind == "compiled" else model, opt)
        for step, opt in runs.values():
            _window(step, opt, xs, ys)  # compiles
        times = {k: [] for k in runs}
        for _ in range(args.rounds):
            for key, (step, opt) in runs.items():
                times[key].append(_window(step, opt, xs, ys))

        def median(key, part=0, times=times):
            return statistics.median(t[part] for t in times[key])

        base = median(("plain BN", "compiled"))
        for name in LAYERS:
            eager, compiled = median((name, "eager")), median((name, "compiled"))
            closing = median((name, "compiled"), 1)
            lines.append(
                f"| {label} | {name} | {eager * 1e3:.2f} | {compiled * 1e3:.2f} | {closing * 1e3:.2f} "
                f"| {compiled / base:.3f} |"
            )
            print(lines[-1], flush=True)  # a run stopped at a time limit still shows the models it finished
    publish(
        "\n".join(lines),
        args.update,
        f"python benchmarks/bench_compile.py --rounds {args.rounds}{command_suffix(args)}",
        key=section(args, "bench_compile"),
        title="Accumulation-aware BN under torch.compile: step time" + (" on CUDA" if device.type == "cuda" else ""),
    )


if __name__ == "__main__":
    main()

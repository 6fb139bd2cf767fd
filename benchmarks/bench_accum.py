"""Step time of accumulation-aware BN and Batch Renorm relative to plain BN at micro-batch 2 (target <= 1.10).

The tiny ResNet trains on digits-shaped inputs with 32 micro-batches of 2 per
optimizer step (forward + backward per micro-batch, SGD step per window), with
plain ``nn.BatchNorm2d``, with ``bndoctor.AccumBatchNorm`` in each mode (and
the two-pass variant: ``collect_window`` over the window first) and with
``bndoctor.BatchRenorm``; interleaved rounds, median per variant, one thread.
``--device cuda`` times the same on a GPU (synchronised before each clock
read; oneDNN does not apply there).

    python benchmarks/bench_accum.py --update BENCHMARKS.md
    python benchmarks/bench_accum.py --device cuda --update BENCHMARKS.md   # its own section
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import bndoctor
from _device import add_arguments, clock, command_suffix, section, where
from _publish import publish
from bndoctor.models import resnet18, tiny_resnet

MICRO, ACCUM = 2, 32
MODELS = {
    "tiny-resnet (77k params, 1x8x8)": (tiny_resnet, (1, 8, 8)),
    "resnet18 (ours, 11M params, 3x64x64)": (lambda: resnet18(num_classes=10), (3, 64, 64)),
}


VARIANTS = (
    "plain BN",
    "AccumBN renorm",
    "AccumBN renorm, two passes",
    "AccumBN progressive",
    "AccumBN blend",
    "BatchRenorm",
)


def _variants(factory, device) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    out = {}
    for name in VARIANTS:
        torch.manual_seed(0)
        model = factory()
        if name == "BatchRenorm":
            model = bndoctor.to_batch_renorm(model)
        elif name != "plain BN":
            model = bndoctor.to_accum_bn(model, mode=name.split(",")[0].split()[-1])
        model = model.to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if name.startswith("AccumBN"):
            bndoctor.accumulate_bn(model, opt)
        out[name] = (model.train(), opt)
    return out


def _window(model, opt, xs, ys, two_pass: bool = False) -> float:
    start = clock(xs[0].device)
    if two_pass:
        bndoctor.collect_window(model, xs)
    for x, y in zip(xs, ys):
        (F.cross_entropy(model(x), y) / ACCUM).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (clock(xs[0].device) - start) / ACCUM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--update", type=Path)
    add_arguments(parser, "bench_accum")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    lines = [
        f"torch {torch.__version__}, {where(device)}; micro-batch {MICRO} x {ACCUM} accumulation "
        f"steps, forward + backward per micro-batch and one SGD step per window; median of {args.rounds} "
        "interleaved windows.",
        "",
        "| model | oneDNN | layer | ms per micro-step | ratio to plain BN (target <= 1.10; <= 1.03 for ResNet-18) |",
        "|---|---|---|---|---|",
    ]
    # oneDNN off: as the harness runs (native kernels are faster at batch 2); on: torch's default
    settings = (False, True) if device.type == "cpu" else (None,)
    for (label, (factory, shape)), onednn in [(m, o) for m in MODELS.items() for o in settings]:
        if onednn is not None:
            torch.backends.mkldnn.enabled = onednn
        gen = torch.Generator().manual_seed(0)
        xs = [torch.randn(MICRO, *shape, generator=gen).to(device) for _ in range(ACCUM)]
        ys = [torch.randint(0, 10, (MICRO,), generator=gen).to(device) for _ in range(ACCUM)]
        variants = _variants(factory, device)
        for name, (model, opt) in variants.items():
            _window(model, opt, xs, ys, "two passes" in name)
        times = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, (model, opt) in variants.items():
                times[name].append(_window(model, opt, xs, ys, "two passes" in name))
        base = statistics.median(times["plain BN"])
        for name in variants:
            t = statistics.median(times[name])
            dnn = "n/a" if onednn is None else ("on" if onednn else "off")
            lines.append(f"| {label} | {dnn} | {name} | {t * 1e3:.2f} | {t / base:.2f} |")
    text = "\n".join(lines)
    command = f"python benchmarks/bench_accum.py --rounds {args.rounds}{command_suffix(args)}"
    title = "Accumulation-aware BN and Batch Renorm: step time" + (" on CUDA" if device.type == "cuda" else "")
    publish(text, args.update, command, key=section(args, "bench_accum"), title=title)


if __name__ == "__main__":
    main()

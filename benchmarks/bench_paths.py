"""Which renormalize path is cheaper at which size: one statistics pass or the folded BN call.

Batch Renorm and accumulation-aware BN (``renorm``) normalise with r and d.
``bndoctor.layers._renormalize.renormalize`` has two ways to do it: the folded call
(a statistics kernel for r and d, then training-mode BN with r and d folded
into the affine parameters, which computes the statistics again) and the
one-pass node (the statistics kernel's output reused: eval-mode BN forward,
BN backward with the batch's 1/sigma). The layer picks one-pass for CPU
inputs with spatial dimensions and at least ``ONE_PASS_FROM`` values (the
folded call on a GPU); this table says whether that rule holds on the device
it runs on. Each row is forward +
backward of one layer with a real upstream gradient, statistics included,
against plain training-mode BN of the same input; median of interleaved
rounds (CPU: one thread, oneDNN off).

    python benchmarks/bench_paths.py --update BENCHMARKS.md
    python benchmarks/bench_paths.py --device cuda --update BENCHMARKS.md   # its own section
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from _device import clock, command_suffix, section, timing_run, where
from _publish import publish
from bndoctor.layers import _batch, _renormalize

EPS = 1e-5
SHAPES = (
    (2, 64),  # (N, C): the folded call always
    (2, 16, 8, 8),  # the tiny ResNet's layers
    (2, 64, 8, 8),
    (2, 64, 16, 16),  # ResNet-18-sized network at micro-batch 2
    (2, 64, 32, 32),
    (8, 64, 16, 16),
    (8, 256, 14, 14),  # ResNet-50's layer3 at a small per-GPU batch
    (32, 64, 56, 56),  # ResNet-50's layer1 at batch 32
)


def _layer(shape, device, one_pass: bool | None):  # None: plain BN
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    grad = torch.randn(shape, generator=gen).to(device)
    w = (torch.rand(c, generator=gen) + 0.5).to(device).requires_grad_()
    b = torch.randn(c, generator=gen).to(device).requires_grad_()
    r = (torch.rand(c, generator=gen) + 0.5).to(device)
    d = torch.randn(c, generator=gen).to(device)

    def plain():
        F.batch_norm(x, None, None, w, b, True, 0.0, EPS).backward(grad)

    def renorm():
        with torch.no_grad():
            stats = _batch.batch_stats(x, EPS)
        _renormalize.renormalize(x, w, b, r, d, stats, eps=EPS).backward(grad)

    def chosen():
        saved = _renormalize.one_pass
        _renormalize.one_pass = lambda _x: one_pass
        try:
            renorm()
        finally:
            _renormalize.one_pass = saved

    return plain if one_pass is None else chosen


def _time(fn, device, repeat: int) -> float:
    start = clock(device)
    for _ in range(repeat):
        fn()
    return (clock(device) - start) / repeat


def main() -> None:
    args, device, dnn = timing_run(__doc__, "bench_paths")
    lines = [
        f"torch {torch.__version__}, {where(device)}{dnn}; one layer, forward + backward with statistics, "
        f"microseconds per call, median of {args.rounds} interleaved rounds. The layer takes one pass on this "
        "device in the rows marked *.",
        "",
        "| input | values | plain BN | folded call | one pass | one pass - folded |",
        "|---|---|---|---|---|---|",
    ]
    for shape in SHAPES:
        runs = {kind: _layer(shape, device, kind) for kind in (None, False, True)}
        numel = torch.Size(shape).numel()
        repeat = max(5, min(200, int(2e6 / numel)))
        for fn in runs.values():
            _time(fn, device, 3)  # warm-up
        times = {kind: [] for kind in runs}
        for _ in range(args.rounds):
            for kind, fn in runs.items():
                times[kind].append(_time(fn, device, repeat))
        plain, folded, one = (statistics.median(times[k]) * 1e6 for k in (None, False, True))
        mark = " *" if _renormalize.one_pass(torch.empty(shape, device=device)) else ""
        lines.append(
            f"| {'x'.join(map(str, shape))}{mark} | {numel} | {plain:.1f} | {folded:.1f} | {one:.1f} | "
            f"{one - folded:+.1f} |"
        )
        print(lines[-1], flush=True)
    publish(
        "\n".join(lines),
        args.update,
        f"python benchmarks/bench_paths.py --rounds {args.rounds}{command_suffix(args)}",
        key=section(args, "bench_paths"),
        title="Batch Renorm / accumulation-aware BN: one statistics pass or the folded call, per input size"
        + (" on CUDA" if device.type == "cuda" else ""),
    )


if __name__ == "__main__":
    main()

"""The exact accumulation mode's cost-accuracy curve: gradient error against batch 64 and step time, per pass.

One window of 32 micro-batches of 2, one class per micro-batch (the harness's
correlated sampler), at the initial weights of two networks: bndoctor's
resnet1d on MNIST-1D, and the ResNet-18-sized network on 3 x 32 x 32 inputs
whose mean depends on the class (a synthetic stand-in: the gradient error
needs inputs that differ between micro-batches, not real images).

* Gradient error: ``|g - g_64| / |g_64|`` over all parameters, where ``g_64``
  is plain BatchNorm's gradient on the window as one batch of 64 (mean loss),
  for accumulation-aware BN's one-pass ``renorm`` mode, and for the exact mode
  with the whole window's statistics collected first (``collect_window``) and
  0, 1, 2, ... correction passes, up to exact. resnet1d in float64; the
  ResNet-18-sized network in float32 (its floor is float32's rounding).
* Step time: a window (forward + backward per micro-batch, the exact mode's
  collection and replays, one SGD step) against the one-pass renorm window, in
  interleaved rounds, median, one thread, oneDNN off as in the harness.

    python benchmarks/bench_exact.py --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bndoctor
from _publish import publish
from bndoctor.bench.data import load_data
from bndoctor.models import resnet1d, resnet18

MICRO, ACCUM = 2, 32


def _mnist1d_window() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    data = load_data("mnist1d", "source")
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for k in range(ACCUM):
        label = k % int(data.num_classes)
        idx = (data.y_train == label).nonzero().flatten()
        pick = idx[torch.randperm(len(idx), generator=g)[:MICRO]]
        xs.append(data.x_train[pick])
        ys.append(data.y_train[pick])
    return xs, ys


def _synthetic_window(shape: tuple[int, ...], classes: int = 10) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn((classes, *shape), generator=g) * 0.5
    xs = [torch.randn((MICRO, *shape), generator=g) + centres[k % classes] for k in range(ACCUM)]
    ys = [torch.full((MICRO,), k % classes) for k in range(ACCUM)]
    return xs, ys


NETWORKS = {
    "resnet1d (MNIST-1D, float64)": (lambda: resnet1d(10), _mnist1d_window, torch.float64),
    "resnet18 (ours, 11M params, 3x32x32, float32)": (
        lambda: resnet18(num_classes=10),
        lambda: _synthetic_window((3, 32, 32)),
        torch.float32,
    ),
}


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _variant(base: torch.nn.Module, passes: int | str | None):
    """(model, optimizer, handle, collects) for ``"renorm"`` (one pass) or the exact mode with ``passes``."""
    if passes == "renorm":
        model = bndoctor.to_accum_bn(base)
    else:
        model = bndoctor.to_accum_bn(base, mode="exact", passes=passes)  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    handle = bndoctor.accumulate_bn(model, opt)
    return model.train(), opt, handle, passes != "renorm"


def _window(model, opt, handle, collects, xs, ys, *, step: bool = True) -> int:
    if collects:
        bndoctor.collect_window(model, xs)
    for x, y in zip(xs, ys):
        (F.cross_entropy(model(x), y) / ACCUM).backward()
    passes = handle.correct()
    if step:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return passes


def errors(factory, window, dtype) -> list[tuple[str, int, float]]:
    """(variant, passes run, relative gradient error) at the initial weights."""
    torch.manual_seed(0)
    base = factory().to(dtype)
    xs, ys = window()
    xs = [x.to(dtype) for x in xs]
    ref = copy.deepcopy(base).train()
    F.cross_entropy(ref(torch.cat(xs)), torch.cat(ys)).backward()
    target = _flat(ref)
    out = []
    for passes in ("renorm", 0, 1, 2, 3, 4, 6, 8, None):
        model, opt, handle, collects = _variant(base, passes)
        run = _window(model, opt, handle, collects, xs, ys, step=False)
        name = "renorm (one pass)" if passes == "renorm" else ("exact" if passes is None else f"{passes} passes")
        out.append((name, run, float((_flat(model) - target).norm() / target.norm())))
    return out


def times(factory, window, rounds: int) -> dict[str, float]:
    """Median seconds per window for renorm and the exact mode with 1, 2 and exact passes (float32)."""
    torch.manual_seed(0)
    base = factory()
    xs, ys = window()
    xs = [x.float() for x in xs]
    variants = {name: _variant(base, p) for name, p in (("renorm", "renorm"), ("1", 1), ("2", 2), ("exact", None))}
    seen: dict[str, list[float]] = {name: [] for name in variants}
    for v in variants.values():  # one warm-up window each
        _window(*v, xs, ys)
    for _ in range(rounds):
        for name, v in variants.items():
            start = time.perf_counter()
            _window(*v, xs, ys)
            seen[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in seen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--update", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        f"torch {torch.__version__}, CPU, one thread, oneDNN off; one window of {ACCUM} micro-batches of {MICRO}, "
        "one class per micro-batch, initial weights. Error: relative to batch-64 BatchNorm's gradient. Time: one "
        f"window with its SGD step, median of {args.rounds} interleaved rounds, against the one-pass renorm window.",
        "",
        "| network | variant | passes run | gradient error | window time vs renorm |",
        "|---|---|---|---|---|",
    ]
    with torch.backends.mkldnn.flags(enabled=False):
        for label, (factory, window, dtype) in NETWORKS.items():
            timed = times(factory, window, args.rounds)
            for name, run, error in errors(factory, window, dtype):
                key = {"renorm (one pass)": "renorm", "1 passes": "1", "2 passes": "2", "exact": "exact"}.get(name)
                ratio = "" if key is None else f"{timed[key] / timed['renorm']:.2f}x"
                if name == "renorm (one pass)":
                    ratio += f" ({timed['renorm']:.2f} s)"
                shown = name.replace("1 passes", "1 pass")
                lines.append(f"| {label} | {shown} | {run} | {error:.2g} | {ratio} |")
    publish(
        "\n".join(lines),
        args.update,
        "python benchmarks/bench_exact.py",
        key="bench_exact",
        title="Exact accumulation: passes, gradient error and step time",
    )


if __name__ == "__main__":
    main()

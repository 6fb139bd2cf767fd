"""Running statistics of short runs: 10- and 30-step accumulation runs evaluated as trained, and after recalibrate.

The tiny ResNet trains on digits for a few optimizer steps at micro-batch 2 x 32
accumulation steps (SGD, lr 0.05, momentum 0.9), shuffled or one class per
micro-batch, and is evaluated on the validation set with the running
statistics it ends with:

* plain BN (one EMA step per micro-batch: K = 32 times more steps than windows);
* accumulation-aware BN with plain EMA steps, one per window (``warm_start=False``);
* accumulation-aware BN as converted by default (``warm_start``: the windows
  averaged with weights growing towards the latest, polynomial-decay averaging);
* the same with ``momentum=1`` (the running statistics are the last window's);

and the exact mode (2 passes) with the default and with ``momentum=1``;
each also with its weights recalibrated (``bndoctor.recalibrate`` on 400
training samples). Several seeds; mean, sd and the worst seed's gap.

    python benchmarks/short_runs.py --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import bndoctor
from _publish import publish
from bndoctor.bench.data import load_data
from bndoctor.bench.samplers import schedule
from bndoctor.models import tiny_resnet

MICRO, ACCUM, LR = 2, 32, 0.05


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def train(seed: int, steps: int, sampler: str, variant: str) -> torch.nn.Module:
    """The model after ``steps`` optimizer steps of one variant (same data and initial weights per seed)."""
    data = load_data("digits", "source")
    torch.manual_seed(seed)
    model = tiny_resnet(10)
    exact = variant.startswith("exact")
    if variant != "plain BN":
        if exact:
            model = bndoctor.to_accum_bn(model, mode="exact", passes=2)
        else:
            model = bndoctor.to_accum_bn(model, warm_start=False if variant == "plain EMA" else None)
        if variant.endswith("momentum 1"):
            for layer in model.modules():
                if isinstance(layer, bndoctor.AccumBatchNorm):
                    layer.momentum = 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    bndoctor.remedies.attach_all(model, optimizer)
    rng = np.random.default_rng(seed)
    for done, logical in enumerate(schedule(data.y_train, MICRO, ACCUM, sampler, rng), 1):
        optimizer.zero_grad()
        if exact:  # the whole window's statistics first
            bndoctor.collect_window(model, [data.x_train[idx] for idx in logical])
        for idx in logical:
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).div(len(logical)).backward()
        optimizer.step()
        if done == steps:
            break
    return model


def recalibrated(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    data = load_data("digits", "source")
    model = copy.deepcopy(model)
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))[:400]
    bndoctor.recalibrate(model, [data.x_train[order[i : i + 50]] for i in range(0, 400, 50)], progress=False)
    return model


def table(seeds: int, steps: list[int]) -> str:
    data = load_data("digits", "source")
    labels = {
        "plain BN": "plain BN (an EMA step per micro-batch)",
        "plain EMA": "accumulation-aware BN, plain EMA per window (`warm_start=False`)",
        "warm start": "accumulation-aware BN, warm start (the default: the windows averaged, the latest weighed most)",
        "momentum 1": "accumulation-aware BN, warm start, `momentum=1` (the last window's)",
        "exact": "accumulation-aware BN, exact mode (2 passes, whole-window statistics collected first), warm start",
        "exact, momentum 1": "the same exact mode, `momentum=1`",
    }
    lines = [
        f"Tiny ResNet on digits, {' and '.join(map(str, steps))} optimizer steps at micro-batch {MICRO} x {ACCUM} "
        f"(SGD, lr {LR}, momentum "
        f"0.9), seeds 0..{seeds - 1}; validation accuracy with the running statistics the run ends with, and "
        "with the same weights after `bndoctor.recalibrate` on 400 training samples (the accumulation-aware "
        "runs share their weights: the running statistics do not enter training). Gap: as trained minus "
        "recalibrated, mean over seeds (the worst seed in brackets).",
        "",
        "| steps | micro-batches | running statistics | val acc % as trained | recalibrated | gap, pp (worst) |",
        "|---|---|---|---|---|---|",
    ]
    for count, (sampler, words), (variant, label) in itertools.product(
        steps, (("iid", "shuffled"), ("correlated", "one class each")), labels.items()
    ):
        trained, recal = [], []
        for seed in range(seeds):
            model = train(seed, count, sampler, variant)
            trained.append(_accuracy(model, data.x_val, data.y_val))
            recal.append(_accuracy(recalibrated(model, seed), data.x_val, data.y_val))
        gaps = [a - r for a, r in zip(trained, recal)]
        lines.append(
            f"| {count} | {words} | {label} "
            f"| {100 * statistics.fmean(trained):.1f} ± {100 * statistics.stdev(trained):.1f} "
            f"| {100 * statistics.fmean(recal):.1f} ± {100 * statistics.stdev(recal):.1f} "
            f"| {100 * statistics.fmean(gaps):+.1f} ({100 * min(gaps):+.1f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--update", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    publish(
        table(args.seeds, args.steps),
        args.update,
        f"python benchmarks/short_runs.py --seeds {args.seeds} --steps {' '.join(map(str, args.steps))}",
        key="short_runs",
        title="Accumulation-aware BN: running statistics of short runs",
    )


if __name__ == "__main__":
    main()

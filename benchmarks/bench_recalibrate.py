"""Recalibration: accuracy of the statistics, accuracy of the model, and throughput.

1. Statistics and accuracy. A tiny ResNet is trained with the harness
   scenario ``bn-2x32-corr`` (micro-batch 2 x 32, one class per micro-batch;
   3 seeds). Its BN statistics are then re-estimated on the training set in
   batches of 64 — shuffled, or class-correlated (each batch one class) — by:
   the EMA left by training; ``torch.optim.swa_utils.update_bn``; the seeds'
   recipe (train-mode forward passes with the default momentum, i.e. more
   EMA); and ``bndoctor.recalibrate``. The oracle is the float64 mean and
   variance of every BN input over the same train-mode pass, captured with
   forward hooks. Reported: mean |relative error| of running_var against
   the oracle, and validation accuracy.

2. Throughput. ``bndoctor.recalibrate`` against the physical limit, a
   train-mode no-grad forward over the same batches (which is what computes
   the batch statistics), in interleaved rounds; target ratio >= 0.95.
   ``torch.optim.swa_utils.update_bn`` in the same rounds for comparison.

    python benchmarks/bench_recalibrate.py --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import collections
import copy
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import bndoctor
from _publish import publish
from bndoctor.bench import SCENARIOS, run_scenario
from bndoctor.bench.data import load_digits
from bndoctor.models import resnet18, tiny_resnet

BATCH = 64


def _batches(order: str, seed: int, size: int = BATCH) -> list[torch.Tensor]:
    data = load_digits()
    rng = np.random.default_rng(seed)
    if order == "shuffled":
        idx = rng.permutation(len(data.y_train))
        chunks = [idx[i : i + size] for i in range(0, len(idx), size)]
    else:
        chunks = []
        for label in range(10):
            members = rng.permutation(np.flatnonzero(data.y_train.numpy() == label))
            chunks += [members[i : i + size] for i in range(0, len(members), size)]
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    return [data.x_train[torch.from_numpy(c)] for c in chunks if len(c) > 1]


def _oracle(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unbiased float64 variance of each BN input over one train-mode pass."""
    probe = copy.deepcopy(model).train()
    inputs = collections.defaultdict(list)
    for name, module in probe.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_hook(lambda m, a, o, name=name: inputs[name].append(a[0].detach().double()))
    with torch.no_grad():
        for batch in batches:
            probe(batch)
    return {
        name: torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in xs], dim=1).var(dim=1)
        for name, xs in inputs.items()
    }


def _var_error(model: nn.Module, oracle: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Mean and max over all channels of all layers of |running_var / oracle - 1|."""
    errors = torch.cat(
        [((model.get_submodule(name).running_var.double() - var) / var).abs() for name, var in oracle.items()]
    )
    return errors.mean().item(), errors.max().item()


def _accuracy(model: nn.Module) -> float:
    data = load_digits()
    model.eval()
    with torch.no_grad():
        return (model(data.x_val).argmax(1) == data.y_val).double().mean().item()


def _seeds_recipe(model: nn.Module, batches: list[torch.Tensor]) -> None:
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)


METHODS = {
    "EMA from training": lambda m, b: None,
    "seeds' recipe (EMA pass)": _seeds_recipe,
    "swa_utils.update_bn": lambda m, b: torch.optim.swa_utils.update_bn(b, m),
    "bndoctor.recalibrate": lambda m, b: bndoctor.recalibrate(m, b, progress=False),
}


def accuracy_table(seeds: int) -> str:
    results: dict[tuple[str, str], list[tuple[tuple[float, float], float]]] = collections.defaultdict(list)
    for seed in range(seeds):
        _, state = run_scenario(SCENARIOS["bn-2x32-corr"], seed)
        for order in ("shuffled", "correlated"):
            batches = _batches(order, seed)
            trained = tiny_resnet()
            trained.load_state_dict(state)
            oracle = _oracle(trained, batches)
            for method, apply in METHODS.items():
                model = copy.deepcopy(trained)
                apply(model, batches)
                results[(method, order)].append((_var_error(model, oracle), _accuracy(model)))
    lines = [
        f"Model: harness scenario `bn-2x32-corr`, seeds 0..{seeds - 1}; statistics re-estimated on the 1,438 "
        f"training images in batches of {BATCH}. Mean ± sd over seeds.",
        "",
        "| method | recalibration batches | running_var abs. relative error vs oracle: mean (max) | val accuracy % |",
        "|---|---|---|---|",
    ]
    for (method, order), values in results.items():
        errors = [e[0] for e, _ in values]
        worst = max(e[1] for e, _ in values)
        accs = [100 * a for _, a in values]
        lines.append(
            f"| {method} | {order} | {statistics.fmean(errors):.3g} ± {sd(errors):.2g} ({worst:.3g}) "
            f"| {statistics.fmean(accs):.1f} ± {sd(accs):.1f} |"
        )
    return "\n".join(lines)


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _time(fn, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def throughput_table(rounds: int) -> str:
    digits = _batches("shuffled", 0)
    cases = {
        "tiny-resnet, 1,438 digits in batches of 16": (tiny_resnet(), _batches("shuffled", 0, 16)),
        "tiny-resnet, 1,438 digits in batches of 64": (tiny_resnet(), digits),
        "tiny-resnet, 4,096 digits (the set cycled) in batches of 64": (tiny_resnet(), (digits * 3)[:64]),
        "resnet18 (ours), 256 images 3x32x32 in batches of 32": (
            resnet18(num_classes=10),
            [torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)],
        ),
    }
    lines = [
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s); median of {rounds} "
        "interleaved rounds.",
        "",
        "| model and data | train-mode no-grad forward (s) | bndoctor.recalibrate (s) | throughput ratio "
        "(target >= 0.95) | swa_utils.update_bn (s) | its ratio |",
        "|---|---|---|---|---|---|",
    ]
    for label, (model, batches) in cases.items():
        model.eval()

        def forward_only(model=model, batches=batches):
            was = model.training
            model.train()
            with torch.no_grad():
                for batch in batches:
                    model(batch)
            model.train(was)

        def recal(model=model, batches=batches):
            bndoctor.recalibrate(model, batches, progress=False)

        def swa(model=model, batches=batches):
            torch.optim.swa_utils.update_bn(batches, model)

        forward_only()
        recal()
        swa()
        base, ours, theirs = [], [], []
        for _ in range(rounds):
            base.append(_time(forward_only))
            ours.append(_time(recal))
            theirs.append(_time(swa))
        b, o, t = (statistics.median(v) for v in (base, ours, theirs))
        lines.append(f"| {label} | {b:.3f} | {o:.3f} | {b / o:.3f} | {t:.3f} | {b / t:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--update", type=Path, help="write the tables into this Markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = []
    if not args.skip_accuracy:
        parts.append("### Statistics and accuracy\n\n" + accuracy_table(args.seeds))
    parts.append("### Throughput\n\n" + throughput_table(args.rounds))
    text = "\n\n".join(parts)
    publish(
        text,
        args.update,
        f"python benchmarks/bench_recalibrate.py --seeds {args.seeds} --rounds {args.rounds} --threads {args.threads}",
        key="bench_recalibrate",
        title="recalibrate (PreciseBN)",
    )


if __name__ == "__main__":
    main()

"""Step time of a BN-folded model, as ratios against baselines measured in the same run.

Three versions of one ResNet-style network train for a few steps (forward +
backward + SGD step, train mode):

* ``no-norm``: the network built without norm layers (conv with bias) — the
  floor that folding should reach;
* ``frozen``: BN frozen with :func:`bndoctor.freeze_bn` (running statistics,
  trainable affine) — what fine-tuning with frozen BN costs without folding;
* ``folded``: the frozen model after :func:`bndoctor.fold_bn`.

Variants are timed in interleaved rounds and the median per variant is kept,
so that machine noise hits all of them alike. Target: folded / no-norm <= 1.03.

    python benchmarks/bench_fold.py                  # print the table
    python benchmarks/bench_fold.py --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

import bndoctor
from _publish import update
from bndoctor.models import resnet18, tiny_resnet

MODELS = {
    "tiny-resnet": (lambda norm: tiny_resnet(norm=norm), (64, 1, 8, 8), 10),
    "resnet18": (lambda norm: resnet18(num_classes=10, norm=norm), (8, 3, 64, 64), 10),
}


def _variants(name: str) -> dict[str, nn.Module]:
    factory, shape, _ = MODELS[name]
    torch.manual_seed(0)
    base = factory("batch")
    base.train()
    with torch.no_grad():  # give BN real running statistics
        for _ in range(3):
            base(torch.randn(shape))
    frozen = bndoctor.freeze_bn(base).train()
    folded = bndoctor.fold_bn(frozen).train()
    torch.manual_seed(0)
    plain = factory("none").train()
    return {"no-norm": plain, "frozen": frozen, "folded": folded}


def _time_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def measure(name: str, rounds: int, steps: int) -> dict[str, float]:
    _, shape, classes = MODELS[name]
    variants = _variants(name)
    x = torch.randn(shape)
    y = torch.randint(0, classes, (shape[0],))
    for model in variants.values():  # warm-up
        _time_steps(model, x, y, 2)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for key, model in variants.items():
            samples[key].append(_time_steps(model, x, y, steps))
    return {k: statistics.median(v) for k, v in samples.items()}


def render(results: dict[str, dict[str, float]], rounds: int, steps: int) -> str:
    lines = [
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s); "
        f"median of {rounds} interleaved rounds x {steps} steps (forward + backward + SGD step, train mode).",
        "",
        "| model | input | no-norm ms/step | frozen BN ms/step | folded ms/step "
        "| folded / no-norm (target <= 1.03) | folded / frozen |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in results.items():
        shape = "x".join(str(s) for s in MODELS[name][1])
        lines.append(
            f"| {name} | {shape} | {t['no-norm'] * 1e3:.2f} | {t['frozen'] * 1e3:.2f} | "
            f"{t['folded'] * 1e3:.2f} | {t['folded'] / t['no-norm']:.3f} | {t['folded'] / t['frozen']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--update", type=Path, help="write the table into this Markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {name: measure(name, args.rounds, args.steps) for name in args.models}
    table = render(results, args.rounds, args.steps)
    print(table)
    if args.update:
        command = (
            "python benchmarks/bench_fold.py "
            + " ".join(
                f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in (
                    ("models", args.models),
                    ("rounds", args.rounds),
                    ("steps", args.steps),
                    ("threads", args.threads),
                )
            )
            + f" --update {args.update}"
        )
        update(args.update, table, command)


if __name__ == "__main__":
    main()

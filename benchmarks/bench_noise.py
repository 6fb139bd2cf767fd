"""Gradient noise scale on the harness model, and steps-to-target vs batch size (McCandlish et al. 2018).

1. B_simple measured with ``bndoctor.GradientNoiseScale`` while the harness
   model (GroupNorm, so the batch changes only the gradient noise) trains at
   micro-batch 8 x 8 accumulation steps until its training loss reaches the
   target; the mean over the run.
2. For each batch size B (no accumulation), the fewest optimizer steps until
   an EMA of the training loss reaches the target, over a grid of learning
   rates (SGD, momentum 0.9); per seed, then the median over seeds.
3. A least-squares fit of S = S_min (1 + B_noise / B) to those steps, and the
   fitted B_noise next to the measured B_simple.

    python benchmarks/bench_noise.py --seeds 3 --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _publish import publish
from bndoctor.bench.noise import fit_noise_model, model_and_data, steps_to_target
from bndoctor.noise import GradientNoiseScale

BATCHES = (8, 16, 32, 64, 128, 256)
LRS = (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8)
TARGET = 0.15
MAX_STEPS = 4000


def _b_simple(seed: int, micro: int = 8, accum: int = 8, lr: float = 0.1) -> list[float]:
    """B_simple at every optimizer step until the EMA training loss reaches the target."""
    from bndoctor.bench.samplers import schedule

    model, data = model_and_data("group", seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gns = GradientNoiseScale(model, micro_batch=micro, accum_steps=accum, tail_coordinates=0).attach(optimizer)
    rng = np.random.default_rng(seed)
    ema, values = None, []
    while ema is None or ema > TARGET:
        for logical in schedule(data.y_train, micro, accum, "iid", rng):
            if len(logical) < accum:
                continue
            total = 0.0
            for idx in logical:
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                (loss / accum).backward()
                total += loss.item() / accum
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            values.append(gns.b_simple)
            ema = total if ema is None else 0.9 * ema + 0.1 * total
            if ema <= TARGET or len(values) > MAX_STEPS:
                break
        if len(values) > MAX_STEPS:
            break
    gns.detach()
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--update", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    simple = [_b_simple(seed) for seed in range(args.seeds)]
    # skip the first 20 steps: the EMA of the estimate is still warming up
    run_means = [statistics.fmean(v[20:]) for v in simple]
    per_batch: dict[int, list[int]] = {b: [] for b in BATCHES}
    best_lr: dict[int, list[float]] = {b: [] for b in BATCHES}
    for seed in range(args.seeds):
        for b in BATCHES:
            result = steps_to_target(b, target=TARGET, lrs=LRS, max_steps=MAX_STEPS, seed=seed)
            if result["steps"] is not None:
                per_batch[b].append(result["steps"])
                best_lr[b].append(result["lr"])
    batches = [b for b in BATCHES if per_batch[b]]
    steps = [statistics.median(per_batch[b]) for b in batches]
    s_min, b_noise = fit_noise_model(batches, steps)
    b_simple = statistics.fmean(run_means)
    lines = [
        f"torch {torch.__version__}, 1 thread; harness model with GroupNorm on digits, SGD momentum 0.9; target: EMA "
        f"training loss <= {TARGET}; {args.seeds} seeds; learning-rate grid {', '.join(map(str, LRS))}; "
        f"{time.perf_counter() - start:.0f} s.",
        "",
        "| batch B | steps to target (median; per seed) | best lr (per seed) | predicted S_min (1 + B_noise/B) |",
        "|---|---|---|---|",
    ]
    for b, s in zip(batches, steps):
        predicted = s_min * (1 + b_noise / b)
        lines.append(
            f"| {b} | {s:.0f} ({', '.join(map(str, per_batch[b]))}) | {', '.join(map(str, best_lr[b]))} "
            f"| {predicted:.0f} |"
        )
    lines += [
        "",
        f"Fit: S_min = {s_min:.0f} steps, B_noise = {b_noise:.0f}. Measured B_simple (GradientNoiseScale at "
        f"micro-batch 8 x 8, mean over the run to the target): {b_simple:.0f} "
        f"(per seed {', '.join(f'{m:.0f}' for m in run_means)}; from {min(v[20] for v in simple):.0f} early to "
        f"{max(v[-1] for v in simple):.0f} at the target).",
    ]
    text = "\n".join(lines)
    publish(
        text,
        args.update,
        f"python benchmarks/bench_noise.py --seeds {args.seeds}",
        key="bench_noise",
        title="Gradient noise scale: B_simple and steps to target vs batch size",
    )


if __name__ == "__main__":
    main()

"""Noise-scale experiments on the harness model (digits, tiny ResNet): what ``bndoctor noise`` runs.

Harness-only code (``bndoctor noise`` and ``benchmarks/bench_noise.py`` use it).

``measure_noise`` trains with gradient accumulation and records B_simple and
the tail index at every optimizer step. ``steps_to_target`` trains at one
logical batch with a grid of learning rates and counts the optimizer steps
until the training loss (an EMA) reaches a target — the experiment behind
McCandlish et al.'s S / S_min = 1 + B_noise / B.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BNDoctorError
from ..noise.scale import GradientNoiseScale

__all__ = ["NoiseRun", "fit_noise_model", "measure_noise", "model_and_data", "steps_to_target"]


@dataclass
class NoiseRun:
    """B_simple and alpha per optimizer step, with the per-epoch summary."""

    micro_batch: int
    accum_steps: int
    epochs: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def logical_batch(self) -> int:
        return self.micro_batch * self.accum_steps

    @property
    def b_simple(self) -> float:
        """B_simple at the end of training (smoothed)."""
        return self.epochs[-1]["b_simple"] if self.epochs else math.nan

    @property
    def alpha(self) -> float | None:
        values = [e["alpha"] for e in self.epochs if e["alpha"] is not None]
        return statistics.median(values) if values else None


def model_and_data(norm: str, seed: int) -> tuple[torch.nn.Module, Any]:
    from ..models import tiny_resnet
    from .data import load_digits

    torch.manual_seed(seed)
    data = load_digits()
    return tiny_resnet(data.num_classes, norm=norm), data  # type: ignore[arg-type]


def measure_noise(
    *,
    micro_batch: int = 4,
    accum_steps: int = 16,
    epochs: int = 4,
    lr: float = 0.05,
    norm: str = "batch",
    seed: int = 0,
    progress: Any = None,
) -> NoiseRun:
    """Train the harness model with accumulation; record B_simple and alpha at every optimizer step."""
    from .samplers import schedule

    if micro_batch < 2 and norm == "batch":
        raise BNDoctorError("BatchNorm needs micro_batch >= 2", hint="use --micro-batch 2 or more, or --norm group")
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, data = model_and_data(norm, seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        gns = GradientNoiseScale(model, micro_batch=micro_batch, accum_steps=accum_steps).attach(optimizer)
        rng = np.random.default_rng(seed)
        run = NoiseRun(micro_batch, accum_steps)
        for epoch in range(epochs):
            model.train()
            losses = []
            for logical in schedule(data.y_train, micro_batch, accum_steps, "iid", rng):
                if len(logical) < accum_steps:
                    continue  # the noise scale needs full windows
                for idx in logical:
                    loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                    (loss / accum_steps).backward()
                    losses.append(loss.item())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                last = gns.samples[-1]
                run.steps.append({"epoch": epoch + 1, **last.as_dict()})
            epoch_alphas = [s["alpha"] for s in run.steps if s["epoch"] == epoch + 1 and s["alpha"] is not None]
            run.epochs.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": statistics.fmean(losses) if losses else math.nan,
                    "b_simple": gns.b_simple,
                    "alpha": statistics.median(epoch_alphas) if epoch_alphas else None,
                }
            )
            if progress is not None:
                progress(epoch + 1, epochs)
        gns.detach()
    finally:
        torch.set_num_threads(threads)
    run.seconds = time.perf_counter() - start
    return run


def steps_to_target(
    batch: int,
    *,
    target: float,
    lrs: tuple[float, ...],
    max_steps: int,
    norm: str = "group",
    seed: int = 0,
    smoothing: float = 0.9,
) -> dict[str, Any]:
    """Fewest optimizer steps to an EMA training loss <= ``target`` at batch ``batch``, over the ``lrs`` grid."""
    from .samplers import schedule

    best: dict[str, Any] = {"batch": batch, "steps": None, "lr": None, "per_lr": {}}
    for lr in lrs:
        model, data = model_and_data(norm, seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        rng = np.random.default_rng(seed)
        ema, steps, reached = None, 0, None
        while steps < max_steps and reached is None:
            for (idx,) in schedule(data.y_train, batch, 1, "iid", rng):
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                value = loss.item()
                if not math.isfinite(value):
                    steps = max_steps
                    break
                ema = value if ema is None else smoothing * ema + (1 - smoothing) * value
                if ema <= target:
                    reached = steps
                    break
                if steps >= max_steps:
                    break
        best["per_lr"][lr] = reached
        if reached is not None and (best["steps"] is None or reached < best["steps"]):
            best["steps"], best["lr"] = reached, lr
    return best


def fit_noise_model(batches: list[int], steps: list[int]) -> tuple[float, float]:
    """Least squares of S = S_min (1 + B_noise / B), linear in 1/B; returns (S_min, B_noise)."""
    if len(batches) < 2 or len(batches) != len(steps):
        raise BNDoctorError("need at least two (batch, steps) pairs", hint="run steps_to_target at >= 2 batch sizes")
    inv = np.array([1.0 / b for b in batches])
    s = np.array(steps, dtype=float)
    slope, intercept = np.polyfit(inv, s, 1)
    s_min = float(intercept)
    return s_min, float(slope / intercept) if intercept > 0 else math.inf

"""Train scenarios over seeds, in one process or several, and collect the results.

Each run is self-contained and deterministic: the seed fixes the weights'
initialisation and the data order, and every run uses one intra-op thread,
so the same seed gives the same numbers whether runs go in parallel or not.
Scenarios that start from a pretrained model run after the scenario they
start from (same seed), which is added to the suite when it was not asked for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ..models import tiny_resnet
from .data import Digits, load_digits
from .samplers import schedule
from .scenarios import SCENARIOS, Scenario

__all__ = ["Progress", "RunResult", "SuiteResult", "load_suite", "run_scenario", "run_suite"]

#: ``progress(done, total, label)``: called after every epoch of every run.
Progress = Callable[[int, int, str], None]

LAST_K = 5
MKLDNN_MIN_BATCH = 8
TRAIN_SIZE = 1438  # digits training images; only used to weigh progress


@dataclass
class RunResult:
    """One scenario trained with one seed; accuracies are on the scenario's validation set."""

    scenario: str
    seed: int
    val_acc: list[float]
    train_loss: list[float]
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_acc(self) -> float:
        return self.val_acc[-1]

    @property
    def last_k(self) -> list[float]:
        return self.val_acc[-LAST_K:]

    @property
    def last5_mean(self) -> float:
        return statistics.fmean(self.last_k)

    @property
    def last5_std(self) -> float:
        values = self.last_k
        return statistics.pstdev(values) if len(values) > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "val_acc": self.val_acc,
            "train_loss": self.train_loss,
            "final_acc": self.final_acc,
            "last5_mean": self.last5_mean,
            "last5_std": self.last5_std,
            "wall_s": self.wall_s,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        return cls(
            data["scenario"], data["seed"], data["val_acc"], data["train_loss"], data["wall_s"], data.get("extra", {})
        )


def _set_bn_eval(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.eval()


RECAL_BATCH = 64


def _recalibrate(model: nn.Module, data: Digits, rng: np.random.Generator) -> None:
    from ..stats.recalibrate import recalibrate

    order = torch.from_numpy(rng.permutation(len(data.y_train)))
    batches = [data.x_train[order[i : i + RECAL_BATCH]] for i in range(0, len(order), RECAL_BATCH)]
    batches = [b for b in batches if len(b) > 1]
    recalibrate(model, batches, modules="*", progress=False)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    try:
        return (model(x).argmax(dim=1) == y).double().mean().item()
    finally:
        model.train(was_training)


def run_scenario(
    scenario: Scenario,
    seed: int,
    *,
    init_state: dict[str, torch.Tensor] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> tuple[RunResult, dict[str, torch.Tensor]]:
    """Train one scenario with one seed; return the result and the final state_dict."""
    threads = torch.get_num_threads()
    mkldnn = torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    # oneDNN convolutions cost about 1 ms of set-up per call; for tiny batches the
    # native kernels are about 1.7x faster per step (measured, batch 2: 1.7 vs 3.0 ms)
    torch.backends.mkldnn.enabled = mkldnn and scenario.micro_batch > MKLDNN_MIN_BATCH
    try:
        return _train(scenario, seed, init_state, on_epoch)
    finally:
        torch.backends.mkldnn.enabled = mkldnn
        torch.set_num_threads(threads)


def _train(
    scenario: Scenario,
    seed: int,
    init_state: dict[str, torch.Tensor] | None,
    on_epoch: Callable[[int], None] | None,
) -> tuple[RunResult, dict[str, torch.Tensor]]:
    start = time.perf_counter()
    data = load_digits(scenario.domain)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = tiny_resnet(data.num_classes, norm=scenario.norm)
    if init_state is not None:
        model.load_state_dict(init_state)
    if scenario.remedy is not None:
        model = scenario.remedy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=scenario.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(data.y_train) // scenario.micro_batch / scenario.accum_steps)
    total_steps = max(1, steps_per_epoch * scenario.epochs)
    lr_at = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    val_acc: list[float] = []
    train_loss: list[float] = []
    for epoch in range(scenario.epochs):
        model.train()
        if scenario.bn_eval:
            _set_bn_eval(model)
        loss_sum, seen = torch.zeros((), dtype=torch.float64), 0
        for logical in schedule(data.y_train, scenario.micro_batch, scenario.accum_steps, scenario.sampler, rng):
            total = sum(len(idx) for idx in logical)
            optimizer.zero_grad(set_to_none=True)
            for idx in logical:
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx], reduction="sum")
                (loss / total).backward()
                loss_sum += loss.detach()
                seen += len(idx)
            optimizer.step()
            lr_at.step()
        train_loss.append(loss_sum.item() / max(seen, 1))
        if scenario.recalibrate:
            _recalibrate(model, data, rng)
        val_acc.append(_accuracy(model, data.x_val, data.y_val))
        if on_epoch is not None:
            on_epoch(epoch + 1)
    result = RunResult(scenario.name, seed, val_acc, train_loss, time.perf_counter() - start)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return result, state


# --------------------------------------------------------------------------- suites


@dataclass
class SuiteResult:
    """All runs of a suite, plus what is needed to reproduce it."""

    scenarios: list[Scenario]
    seeds: list[int]
    runs: list[RunResult]
    wall_s: float
    command: str = ""

    def runs_of(self, name: str) -> list[RunResult]:
        return [r for r in self.runs if r.scenario == name]

    def summary(self, name: str) -> dict[str, float]:
        """Mean and spread over seeds of a scenario's metrics."""
        runs = self.runs_of(name)
        finals = [r.final_acc for r in runs]
        last5 = [r.last5_mean for r in runs]

        def sd(values: list[float]) -> float:
            return statistics.stdev(values) if len(values) > 1 else 0.0

        return {
            "seeds": len(runs),
            "final_mean": statistics.fmean(finals),
            "final_sd": sd(finals),
            "last5_mean": statistics.fmean(last5),
            "last5_sd": sd(last5),
            "last5_min": min(last5),
            "last5_max": max(last5),
            "jitter": statistics.fmean(r.last5_std for r in runs),
            "wall_s": statistics.fmean(r.wall_s for r in runs),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "seeds": self.seeds,
            "wall_s": self.wall_s,
            "torch": torch.__version__,
            "scenarios": [
                {**_scenario_json(s), "summary": self.summary(s.name)} for s in self.scenarios if self.runs_of(s.name)
            ],
            "runs": [r.to_json() for r in self.runs],
        }


def load_suite(path: str | Path) -> SuiteResult:
    """Read a ``results.json`` written by :func:`bndoctor.bench.report.write_report`."""
    from .scenarios import get_scenario

    data = json.loads(Path(path).read_text())
    scenarios = [get_scenario(s["name"]) for s in data["scenarios"]]
    runs = [RunResult.from_json(r) for r in data["runs"]]
    return SuiteResult(scenarios, list(data["seeds"]), runs, float(data["wall_s"]), data.get("command", ""))


def _scenario_json(scenario: Scenario) -> dict[str, Any]:
    data = dataclasses.asdict(scenario)
    data["remedy"] = getattr(scenario.remedy, "__name__", None)
    data["label"] = scenario.label()
    data["logical_batch"] = scenario.logical_batch
    return data


def _with_dependencies(scenarios: Sequence[Scenario]) -> list[Scenario]:
    names = [s.name for s in scenarios]
    ordered: list[Scenario] = []

    def add(s: Scenario) -> None:
        if s.pretrain is not None:
            add(
                SCENARIOS[s.pretrain] if s.pretrain not in names else next(x for x in scenarios if x.name == s.pretrain)
            )
        if all(x.name != s.name for x in ordered):
            ordered.append(s)

    for s in scenarios:
        add(s)
    return ordered


def _job(scenario: Scenario, seed: int, init_state: Any, queue: Any) -> tuple[RunResult, dict[str, torch.Tensor]]:
    callback = None if queue is None else (lambda epoch: queue.put((scenario.name, seed, epoch)))
    return run_scenario(scenario, seed, init_state=init_state, on_epoch=callback)


def run_suite(
    scenarios: Sequence[Scenario],
    seeds: Sequence[int],
    *,
    jobs: int = 1,
    epochs: int | None = None,
    progress: Progress | None = None,
) -> SuiteResult:
    """Run every scenario with every seed. ``epochs`` overrides each scenario's epoch count."""
    if epochs is not None:
        scenarios = [dataclasses.replace(s, epochs=epochs) for s in scenarios]
    planned = _with_dependencies(scenarios)
    if epochs is not None:
        planned = [dataclasses.replace(s, epochs=epochs) for s in planned]
    sources = {s.pretrain for s in planned if s.pretrain}
    # progress counts micro-batch steps, so that an epoch at batch 2 weighs 32x one at batch 64
    weight = {s.name: max(1, TRAIN_SIZE // s.micro_batch) for s in planned}
    total = sum(s.epochs * weight[s.name] for s in planned) * len(seeds)
    done = 0
    start = time.perf_counter()
    states: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    results: dict[tuple[str, int], RunResult] = {}

    def tick(name: str, seed: int, epoch: int) -> None:
        nonlocal done
        done += weight[name]
        if progress is not None:
            progress(done, total, f"{name} seed {seed} epoch {epoch}")

    def finish(key: tuple[str, int], outcome: tuple[RunResult, dict[str, torch.Tensor]]) -> None:
        results[key] = outcome[0]
        if key[0] in sources:
            states[key] = outcome[1]

    pending = [(s, seed) for seed in seeds for s in planned]
    if jobs <= 1:
        for s, seed in pending:
            finish(
                (s.name, seed),
                run_scenario(
                    s,
                    seed,
                    init_state=states.get((s.pretrain, seed)) if s.pretrain else None,
                    on_epoch=lambda e, s=s, seed=seed: tick(s.name, seed, e),
                ),
            )
    else:
        _run_parallel(pending, jobs, states, finish, tick)
    requested = {s.name for s in scenarios}
    runs = [results[(s.name, seed)] for s in planned for seed in seeds if s.name in requested or s.name in sources]
    shown = [s for s in planned if s.name in requested or s.name in sources]
    return SuiteResult(shown, list(seeds), runs, time.perf_counter() - start)


def _run_parallel(pending, jobs, states, finish, tick) -> None:
    import multiprocessing as mp

    context = mp.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        queue = manager.Queue()
        running: dict[Future, tuple[str, int]] = {}
        waiting = list(pending)
        while waiting or running:
            for item in list(waiting):
                s, seed = item
                if s.pretrain and (s.pretrain, seed) not in states:
                    continue  # its pretrained start is not ready yet
                waiting.remove(item)
                init = states.get((s.pretrain, seed)) if s.pretrain else None
                running[pool.submit(_job, s, seed, init, queue)] = (s.name, seed)
            if not running:
                raise RuntimeError("scenario dependencies cannot be satisfied")  # pragma: no cover
            finished, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
            while not queue.empty():
                tick(*queue.get())
            for future in finished:
                finish(running.pop(future), future.result())
        while not queue.empty():
            tick(*queue.get())

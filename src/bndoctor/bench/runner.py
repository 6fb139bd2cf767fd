"""Train scenarios over seeds, in one process or several, and collect the results.

Each run is self-contained and deterministic: the seed fixes the weights'
initialisation and the data order, and every run uses one intra-op thread,
so the same seed gives the same numbers whether runs go in parallel or not.
Scenarios that start from a pretrained model run after the scenario they
start from (same seed), which is added to the suite when it was not asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import BNDoctorError, NonFiniteStatisticsError
from ..models import resnet1d, tiny_resnet
from .data import Digits, load_data
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


def _recalibrate(model: nn.Module, data: Digits, rng: np.random.Generator) -> bool:
    """PreciseBN on shuffled training batches; False when the weights have diverged (every batch non-finite)."""
    from ..stats.recalibrate import recalibrate

    order = torch.from_numpy(rng.permutation(len(data.y_train)))
    batches = [data.x_train[order[i : i + RECAL_BATCH]] for i in range(0, len(order), RECAL_BATCH)]
    batches = [b for b in batches if len(b) > 1]
    try:
        recalibrate(model, batches, modules="*", progress=False)
    except NonFiniteStatisticsError:
        return False
    return True


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    try:
        return (model(x).argmax(dim=1) == y).double().mean().item()
    finally:
        model.train(was_training)


def _wants_mkldnn(scenario: Scenario) -> bool:
    """Whether oneDNN convolutions pay off: their set-up per call outweighs their speed at tiny batches
    (BENCHMARKS.md, "Measurements behind code choices")."""
    return scenario.micro_batch > MKLDNN_MIN_BATCH


def model_for(data: Digits, norm: Any = "batch") -> nn.Module:
    """The harness's model for the data's input shape: resnet1d for sequences ``(N, C, L)``, tiny_resnet for
    images ``(N, C, H, W)`` (both end in global average pooling, so any length or size fits)."""
    channels = int(data.x_train.shape[1])
    build = resnet1d if data.x_train.dim() == 3 else tiny_resnet
    return build(data.num_classes, norm=norm, in_channels=channels)


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
    torch.backends.mkldnn.enabled = mkldnn and _wants_mkldnn(scenario)
    try:
        if scenario.world_size > 1:
            return _run_distributed(scenario, seed, init_state, on_epoch)
        return _train(scenario, seed, init_state, on_epoch)
    finally:
        torch.backends.mkldnn.enabled = mkldnn
        torch.set_num_threads(threads)


def _train(
    scenario: Scenario,
    seed: int,
    init_state: dict[str, torch.Tensor] | None,
    on_epoch: Callable[[int], None] | None,
    rank: int = 0,
    world: int = 1,
) -> tuple[RunResult, dict[str, torch.Tensor]]:
    """The training loop; with ``world > 1`` this is one DDP rank (torch.distributed initialised)."""
    start = time.perf_counter()
    data = load_data(scenario.dataset, scenario.domain)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)  # the same on every rank: one global schedule, split by rank
    model, start_acc = _build(scenario, data, init_state)
    net = _ddp(model) if world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=scenario.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    from ..remedies import attach_all

    attach_all(model, optimizer)  # e.g. the window control of accumulation-aware BN, whichever remedy made it
    monitor = _monitor(model, rank, len(data.y_train) // scenario.micro_batch // world)
    group = scenario.accum_steps * world
    micro_batches = len(data.y_train) // scenario.micro_batch  # full micro-batches per epoch (iid)
    # the last logical batch of an epoch may be partial on one process; with several, only full ones run
    steps_per_epoch = math.ceil(micro_batches / group) if world == 1 else micro_batches // group
    total_steps = max(1, steps_per_epoch * scenario.epochs)
    lr_at = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    val_acc: list[float] = []
    train_loss: list[float] = []
    extra_diverged = 0
    for epoch in range(scenario.epochs):
        model.train()
        if scenario.bn_eval:
            _set_bn_eval(model)
        logical_batches = schedule(data.y_train, scenario.micro_batch, group, scenario.sampler, rng)
        train_loss.append(_epoch(scenario, data, model, net, optimizer, lr_at, logical_batches, rank, world, monitor))
        diverged = not math.isfinite(train_loss[-1])
        if scenario.recalibrate and not diverged:
            diverged = _recalibrate(model, data, rng) is False
        val_acc.append(_accuracy(model, data.x_val, data.y_val))
        if on_epoch is not None:
            on_epoch(epoch + 1)
        if diverged:  # a result, not a crash: the run is recorded with the accuracy it reached, and stops
            extra_diverged = epoch + 1
            for later in range(epoch + 1, scenario.epochs):
                val_acc.append(val_acc[-1])
                train_loss.append(math.nan)
                if on_epoch is not None:
                    on_epoch(later + 1)
            break
    result = RunResult(scenario.name, seed, val_acc, train_loss, time.perf_counter() - start)
    if extra_diverged:
        result.extra["diverged_epoch"] = extra_diverged
    if start_acc is not None:
        result.extra["start_acc"] = start_acc
    if monitor is not None:
        monitor.close()
        result.extra["monitor"] = {
            "alerts": sorted({f.code for f in monitor.alerts}),
            "alerted_layers": len({f.module for f in monitor.alerts}),
            "records": monitor.records,
        }
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return result, state


def _epoch(
    scenario: Scenario,
    data: Digits,
    model: nn.Module,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    logical_batches: Iterable[list[Any]],
    rank: int,
    world: int,
    monitor: Any = None,
) -> float:
    """One epoch of accumulated optimizer steps (this rank's micro-batches of each logical batch); the mean loss.

    ``net`` is ``model``, or its DDP wrapper on several ranks; ``monitor`` (a BNMonitor or None) labels its
    records with the optimizer step.
    """
    group = scenario.accum_steps * world
    loss_sum, seen = torch.zeros((), dtype=torch.float64), 0
    for logical in logical_batches:
        if world > 1 and len(logical) < group:
            continue  # every rank must take the same number of micro-steps
        total = sum(len(idx) for idx in logical)
        mine = logical[rank::world]
        if monitor is not None:
            monitor.set_step(scheduler.last_epoch)  # optimizer steps taken so far
        optimizer.zero_grad(set_to_none=True)
        if scenario.two_pass:
            from ..remedies import collect_window

            collect_window(model, [data.x_train[idx] for idx in mine])
        for step, idx in enumerate(mine):
            last = step == len(mine) - 1
            with net.no_sync() if world > 1 and not last else contextlib.nullcontext():  # type: ignore[operator]
                loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx], reduction="sum")
                (loss * world / total).backward()  # DDP averages over ranks: the global mean gradient
            loss_sum += loss.detach()
            seen += len(idx)
        optimizer.step()
        scheduler.step()
    return loss_sum.item() / max(seen, 1)


def _build(
    scenario: Scenario, data: Digits, init_state: dict[str, torch.Tensor] | None
) -> tuple[nn.Module, float | None]:
    """The scenario's model with its start weights and remedies, and the start weights' accuracy (or None)."""
    from ..remedies import apply_actions

    model = model_for(data, scenario.norm)
    start_acc = None
    if init_state is not None:
        model.load_state_dict(init_state)
        start_acc = _accuracy(model, data.x_val, data.y_val)  # the pretrained model on this domain, untouched
    if scenario.remedy is not None:
        model = scenario.remedy(model)
    return apply_actions(model, scenario.actions()).model, start_acc


def _monitor(model: nn.Module, rank: int, forwards_per_epoch: int) -> Any:
    """A BNMonitor in memory, about 12 samples per epoch, when the model has BN layers; else None."""
    from ..monitor import BNMonitor

    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return None
    return BNMonitor(model, every=max(5, forwards_per_epoch // 12), keep=rank == 0, divergence_every=5, log=False)


def _ddp(model: nn.Module) -> nn.Module:
    """DDP that does not overwrite buffers in forward: each rank keeps the statistics of its own batches."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return DistributedDataParallel(model, forward_sync_buffers=False)  # ranks start identical anyway
    return DistributedDataParallel(model, broadcast_buffers=False)


def _rank_entry(
    rank: int, world: int, port: int, scenario: Scenario, seed: int, init_state: Any, queue: Any, out_dir: str
) -> None:
    import os
    import pickle

    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = _wants_mkldnn(scenario)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    callback = (lambda epoch: queue.put(epoch)) if rank == 0 else None
    result, state = _train(scenario, seed, init_state, callback, rank, world)
    # write before tear-down: a crash while gloo/DDP threads shut down must not lose the result
    with open(os.path.join(out_dir, f"{rank}.pt"), "wb") as f:
        pickle.dump((result, state if rank == 0 else None), f)
    dist.barrier()
    dist.destroy_process_group()


def _run_distributed(
    scenario: Scenario,
    seed: int,
    init_state: dict[str, torch.Tensor] | None,
    on_epoch: Callable[[int], None] | None,
) -> tuple[RunResult, dict[str, torch.Tensor]]:
    """Run one scenario on ``scenario.world_size`` gloo ranks (local processes); report rank 0, keep all ranks."""
    import os
    import pickle
    import queue as queue_module
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    epochs = context.Queue()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = mp.start_processes(
            _rank_entry,
            args=(scenario.world_size, port, scenario, seed, init_state, epochs, out_dir),
            nprocs=scenario.world_size,
            join=False,
            start_method="spawn",
        )
        done = False
        while not done:
            try:
                done = procs.join(timeout=0.2)
            except mp.ProcessExitedException:
                # a rank that saved its result and died in tear-down still counts; a missing result does not
                if not all(os.path.exists(os.path.join(out_dir, f"{r}.pt")) for r in range(scenario.world_size)):
                    raise
                done = True
            while True:
                try:
                    epoch = epochs.get_nowait()
                except queue_module.Empty:
                    break
                if on_epoch is not None:
                    on_epoch(epoch)
        outcomes = []
        for rank in range(scenario.world_size):
            with open(os.path.join(out_dir, f"{rank}.pt"), "rb") as f:
                outcomes.append(pickle.load(f))
    result, state = outcomes[0]
    result.wall_s = time.perf_counter() - start
    result.extra["world_size"] = scenario.world_size
    result.extra["rank_val_acc"] = [r.val_acc for r, _ in outcomes]
    result.extra["rank_last5"] = [r.last5_mean for r, _ in outcomes]
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

    path = Path(path)
    hint = "rerun the suite (bndoctor bench --out DIR) to write a fresh results.json"
    try:
        data = json.loads(path.read_text())
        scenarios = [get_scenario(s["name"]) for s in data["scenarios"]]
        runs = [RunResult.from_json(r) for r in data["runs"]]
        return SuiteResult(scenarios, list(data["seeds"]), runs, float(data["wall_s"]), data.get("command", ""))
    except FileNotFoundError:
        raise BNDoctorError(f"no results.json at {str(path)!r}", hint=hint) from None
    except json.JSONDecodeError as exc:
        raise BNDoctorError(f"{str(path)!r} is not JSON ({exc.msg}, line {exc.lineno})", hint=hint) from None
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, BNDoctorError):
            raise
        raise BNDoctorError(
            f"{str(path)!r} is not a results.json written by bndoctor bench ({type(exc).__name__}: {exc})", hint=hint
        ) from None


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

    def run_here(s: Scenario, seed: int) -> None:
        init = states.get((s.pretrain, seed)) if s.pretrain else None
        finish((s.name, seed), run_scenario(s, seed, init_state=init, on_epoch=lambda e: tick(s.name, seed, e)))

    pending = [(s, seed) for seed in seeds for s in planned]
    # multi-rank scenarios start their own processes: run them from here, one at a time, after the rest
    ranked = [(s, seed) for s, seed in pending if s.world_size > 1]
    pending = [(s, seed) for s, seed in pending if s.world_size == 1]
    if jobs <= 1:
        for s, seed in pending:
            run_here(s, seed)
    else:
        _run_parallel(pending, jobs, states, finish, tick)
    for s, seed in ranked:
        run_here(s, seed)
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

"""What both callbacks do at the end of an epoch: recalibrate, merge ranks, and build the monitor."""

from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from .. import distributed
from ..monitor import BNMonitor


def make_monitor(model: nn.Module, sink: Any, default_dir: str, options: dict[str, Any]) -> BNMonitor:
    if sink == "auto":
        sink = os.path.join(default_dir, "bn_monitor.jsonl")
    return BNMonitor(model, sink=sink, **options)


def end_of_epoch(
    model: nn.Module,
    data: Any,
    *,
    recalibrate: bool,
    recalibrate_samples: int | None,
    merge_ranks: bool,
    forward: Any = None,
) -> dict[str, Any]:
    """Recalibrate BN statistics on ``data`` and/or merge them across ranks; returns what was done."""
    done: dict[str, Any] = {}
    if recalibrate and data is not None:
        from ..stats.recalibrate import recalibrate as run_recalibration

        report = run_recalibration(model, data, num_samples=recalibrate_samples, forward=forward, progress=False)
        done["recalibrated_samples"] = report.samples
    if merge_ranks and distributed.active():
        from ..ranks import merge_running_stats

        merge_running_stats(model)
        done["merged_ranks"] = distributed.world_size()
    return done


class MonitorCallbackCore:
    """What the Lightning and Hugging Face callbacks share: options, the monitor, the epoch-end work."""

    def _setup_core(
        self,
        sink: Any,
        recalibrate: bool,
        recalibrate_samples: int | None,
        recalibrate_forward: Any,
        merge_ranks: bool,
        monitor_options: dict[str, Any],
    ) -> None:
        self.sink = sink
        self.recalibrate = recalibrate
        self.recalibrate_samples = recalibrate_samples
        self.recalibrate_forward = recalibrate_forward
        self.merge_ranks = merge_ranks
        self.monitor_options = monitor_options
        self.monitor: BNMonitor | None = None
        self.epochs: list[dict[str, Any]] = []

    def _start(self, model: nn.Module, default_dir: str, state: dict[str, Any] | None) -> None:
        self.monitor = make_monitor(model, self.sink, default_dir, self.monitor_options)
        if state is not None:
            self.monitor.load_state_dict(state)

    def _epoch_end(self, model: nn.Module, data: Any, epoch: Any) -> None:
        if not (self.recalibrate or self.merge_ranks):
            return
        done = end_of_epoch(
            model,
            data if self.recalibrate else None,
            recalibrate=self.recalibrate,
            recalibrate_samples=self.recalibrate_samples,
            forward=self.recalibrate_forward,
            merge_ranks=self.merge_ranks,
        )
        self.epochs.append({"epoch": epoch, **done})

    @property
    def alerts(self) -> list[Any]:
        return [] if self.monitor is None else list(self.monitor.alerts)

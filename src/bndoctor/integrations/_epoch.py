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

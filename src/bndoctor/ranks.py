"""Running statistics across ranks: measure how far they drifted apart, and merge them exactly.

Under DDP each rank's BN layers update their running statistics from that
rank's batches only. With ``broadcast_buffers=False`` (or any loop that does
not broadcast buffers), or when ranks see different data (one video, patient
or shard per rank), the ranks end with different statistics and evaluate
differently. :func:`rank_divergence` measures it; :func:`merge_running_stats`
replaces every rank's statistics by their pooled value,

    mean = sum_r w_r mean_r / W,   var = sum_r w_r (var_r + (mean_r - mean)^2) / W

— the variance of the mixture, which includes the spread of the rank means.
Averaging the variances, as timm's ``distribute_bn`` and OpenMMLab do, drops
that term. Weights ``w_r`` are the samples each rank saw when the caller
passes them, else equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from . import distributed
from ._table import render
from ._walk import BNInfo, ModuleSelection, with_running_stats
from .errors import BNDoctorError
from .moments import pool

__all__ = ["DivergenceReport", "LayerDivergence", "merge_running_stats", "rank_divergence"]


@dataclass(frozen=True)
class LayerDivergence:
    """Spread of one layer's running statistics across ranks, per channel, summarised.

    ``name``: the layer's path; ``mean_max`` / ``mean_avg`` and ``var_max`` /
    ``var_avg``: the largest and the average over channels of:

    ``mean_*``: (max - min over ranks of running_mean) / sqrt(mean over ranks of running_var), i.e. in
    units of the channel's standard deviation. ``var_*``: (max - min of running_var) / mean of running_var.
    """

    name: str
    mean_max: float
    mean_avg: float
    var_max: float
    var_avg: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DivergenceReport:
    layers: list[LayerDivergence]
    world_size: int

    @property
    def max(self) -> float:
        return max((max(la.mean_max, la.var_max) for la in self.layers), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "max": self.max, "layers": [la.to_json() for la in self.layers]}

    def __str__(self) -> str:
        rows = [
            [la.name, f"{la.mean_max:.3g}", f"{la.mean_avg:.3g}", f"{la.var_max:.3g}", f"{la.var_avg:.3g}"]
            for la in self.layers
        ]
        head = f"running statistics across {self.world_size} rank(s): largest divergence {self.max:.3g}"
        return head + "\n" + render(["layer", "mean max", "mean avg", "var max", "var avg"], rows)


def _gather(records: list[BNInfo], extra: float, group: Any) -> tuple[torch.Tensor, int]:
    """All ranks' ``[extra, mean_1, var_1, mean_2, var_2, ...]`` as float64, shape (world, D)."""
    device = records[0].module.running_mean.device if records else torch.device("cpu")
    parts = [torch.tensor([extra], dtype=torch.float64, device=device)]
    for r in records:
        parts += [r.module.running_mean.detach().double(), r.module.running_var.detach().double()]
    local = torch.cat(parts)
    if not distributed.active(group):
        return local.unsqueeze(0), 1
    return distributed.all_gather_stack(local, group), distributed.world_size(group)


def _split(gathered: torch.Tensor, records: list[BNInfo]):
    offset = 1
    for r in records:
        c = int(r.num_features or 0)
        yield r, gathered[:, offset : offset + c], gathered[:, offset + c : offset + 2 * c]
        offset += 2 * c


def rank_divergence(
    model: nn.Module, process_group: Any = None, *, modules: ModuleSelection = None
) -> DivergenceReport:
    """How far each BN layer's running statistics differ across ranks (collective: call on every rank).

    Args:
        model: the model (the same layers on every rank).
        process_group: the ranks to compare (default: all).
        modules: the layers to compare; default: all with running statistics.

    Returns:
        A :class:`DivergenceReport`: per layer the spread over ranks of the running mean (in the channel's
        standard deviations) and of the running variance (relative), largest and average over channels.
    """
    records = with_running_stats(model, modules)
    gathered, world = _gather(records, 0.0, process_group)
    tiny = torch.finfo(torch.float64).tiny
    layers = []
    for record, means, variances in _split(gathered, records):
        mean_spread = (means.max(0).values - means.min(0).values) / variances.mean(0).clamp(min=tiny).sqrt()
        var_spread = (variances.max(0).values - variances.min(0).values) / variances.mean(0).clamp(min=tiny)
        layers.append(
            LayerDivergence(
                record.name,
                float(mean_spread.max()),
                float(mean_spread.mean()),
                float(var_spread.max()),
                float(var_spread.mean()),
            )
        )
    return DivergenceReport(layers, world)


def merge_running_stats(
    model: nn.Module,
    process_group: Any = None,
    *,
    samples: float | None = None,
    modules: ModuleSelection = None,
) -> DivergenceReport:
    """Give every rank the pooled running statistics of all ranks (collective: call on every rank).

    The merge is exact (:func:`bndoctor.moments.pool`: the spread of the ranks'
    means counts, unlike an average of variances). ``num_batches_tracked`` is
    left as it is.

    Args:
        model: the model (the same layers on every rank).
        process_group: the ranks to merge over (default: all).
        samples: how many samples this rank's statistics stand for (e.g. the samples it trained on); every
            rank must pass it or none (equal weights).
        modules: the layers to merge; default: all with running statistics.

    Returns:
        A :class:`DivergenceReport` of how far the ranks differed *before* the merge.
    """
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, (int, float)) or samples < 0):
        raise BNDoctorError(
            f"expected samples to be a non-negative number or None (got {samples!r})",
            hint="pass how many samples this rank's statistics come from, or None for equal weights",
        )
    before = rank_divergence(model, process_group, modules=modules)
    records = with_running_stats(model, modules)
    gathered, _ = _gather(records, -1.0 if samples is None else float(samples), process_group)
    weights = gathered[:, 0]
    if (weights < 0).any() and not (weights < 0).all():
        raise BNDoctorError(
            "some ranks passed samples= to merge_running_stats and others did not",
            hint="pass samples on every rank, or on none",
        )
    if (weights < 0).all() or weights.sum() <= 0:
        weights = torch.ones_like(weights)
    with torch.no_grad():
        for record, means, variances in _split(gathered, records):
            merged = pool(weights, means, variances)
            record.module.running_mean.copy_(merged.mean.to(record.module.running_mean.dtype))
            record.module.running_var.copy_(merged.var_biased.to(record.module.running_var.dtype))
    return before

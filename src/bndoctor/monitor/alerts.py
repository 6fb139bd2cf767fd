"""The monitor's alerts: each code's rule and its explanation, side by side.

:data:`ALERTS` is the table ``bndoctor explain`` reads; :class:`~bndoctor.monitor.BNMonitor` calls the
rules below with what one sample measured. Changing an alert (its threshold, its words, its fix) is an
edit here only.
"""

from __future__ import annotations

from ..findings import ERROR_BELOW, Alert, Finding

__all__ = [
    "ALERTS",
    "COLLAPSE_FRACTION",
    "DIVERGENCE_ALERT",
    "MIN_EFFECTIVE_BATCH",
    "collapsed",
    "diverged",
    "nonfinite",
    "small_effective_batch",
]

#: the effective-batch alert fires below this many independent samples (check's error threshold)
MIN_EFFECTIVE_BATCH = ERROR_BELOW
#: the collapse alert fires when at least this fraction of a layer's channels has a running variance below eps
COLLAPSE_FRACTION = 0.25
#: the divergence alert fires when ranks' running statistics differ by at least this much
DIVERGENCE_ALERT = 0.25


SMALL_EFFECTIVE_BATCH = Alert(
    "BN101",
    "error",
    "batch statistics worth fewer independent samples than a reliable normalisation batch needs (monitor)",
    "the layer normalises with statistics that jump from batch to batch, so training and evaluation see "
    "different networks: the normalisation batch is too small or its samples are alike, or the running "
    "statistics lag the weights (few optimizer steps per running-statistics update, a high learning rate).",
    "see bndoctor check: accumulation-aware BN (to_accum_bn), SyncBN (to_sync_bn), GroupNorm (convert_bn), "
    "or freeze_bn when fine-tuning; recalibrate the statistics after training.",
)
NONFINITE = Alert(
    "BN501",
    "error",
    "NaN or Inf in a BN layer's input or running statistics (monitor)",
    "the statistics are lost for every later step.",
    "lower the learning rate, clip gradients, check the data, keep BN in float32; recalibrate(model, loader) "
    "rebuilds the statistics afterwards.",
)
COLLAPSED = Alert(
    "BN502",
    "warning",
    "running variance below eps in a quarter of a layer's channels or more (monitor)",
    "those channels carry almost no signal (dead units before the layer).",
    "look for dead units before this layer: the activation (ReLU), the learning rate, the weight decay.",
)
DIVERGED = Alert(
    "BN503",
    "warning",
    "running statistics differ across DDP ranks (monitor)",
    "each rank evaluates differently.",
    "to_sync_bn(model) for training, or merge_running_stats(model) (the exact pooled merge, not an average of "
    "variances) before evaluation and checkpointing.",
)

#: code -> alert, for ``bndoctor explain`` (BN101 is also a code of ``bndoctor check``, which explains it first)
ALERTS: dict[str, Alert] = {a.code: a for a in (SMALL_EFFECTIVE_BATCH, NONFINITE, COLLAPSED, DIVERGED)}


def nonfinite(name: str, step: int, found: bool) -> Finding | None:
    """BN501 when the layer's input or running statistics hold NaN or Inf."""
    if not found:
        return None
    return NONFINITE.finding(name, "NaN or Inf in the layer's input or running statistics", {"step": step})


def collapsed(name: str, step: int, fraction: float) -> Finding | None:
    """BN502 when at least :data:`COLLAPSE_FRACTION` of the channels have a running variance below eps."""
    if not fraction >= COLLAPSE_FRACTION:
        return None
    return COLLAPSED.finding(
        name,
        f"{fraction:.0%} of the channels have a running variance below eps: they carry (almost) no signal",
        {"collapsed": fraction, "step": step},
    )


def small_effective_batch(
    name: str, step: int, effective: float, values_per_channel: int, window: int, threshold: float
) -> Finding | None:
    """BN101 when the median effective batch of the last ``window`` samples is below ``threshold``."""
    if not effective < threshold:
        return None
    return SMALL_EFFECTIVE_BATCH.finding(
        name,
        f"the batch statistics are worth about {effective:.1f} independent samples (median of the last {window} "
        f"samples; the batch holds {values_per_channel} values per channel): the normalisation batch is too small "
        "or its samples are alike, or the running statistics lag the weights (few optimizer steps per "
        "running-statistics update, a high learning rate)",
        {"effective_batch": effective, "values_per_channel": values_per_channel, "step": step},
    )


def diverged(name: str, step: int, world_size: int, mean_max: float, var_max: float) -> Finding | None:
    """BN503 when the ranks' running statistics differ by at least :data:`DIVERGENCE_ALERT`."""
    worst = max(mean_max, var_max)
    if not worst >= DIVERGENCE_ALERT:
        return None
    return DIVERGED.finding(
        name,
        f"running statistics differ across {world_size} ranks by up to {worst:.2f} (mean in standard deviations, "
        "variance relative): each rank will evaluate differently",
        {"mean_max": mean_max, "var_max": var_max, "step": step},
    )

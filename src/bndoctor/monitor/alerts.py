"""The monitor's alerts: each code's rule and its explanation, side by side, and the state the rules keep.

:data:`ALERTS` is the table ``bndoctor explain`` reads. :class:`Rules` applies them to one sample after
another: :class:`~bndoctor.monitor.BNMonitor` feeds it while a model trains, and
``benchmarks/alert_calibration.py`` replays stored run files through the same object, which is how the
thresholds below were set and how their sensitivity and specificity are measured (BENCHMARKS.md, "Monitor
alerts on labelled runs"). Changing an alert (its threshold, its words, its fix) is an edit here only.

What the two batch-statistics rules read, per sample and layer (:mod:`bndoctor.monitor`): ``shift``, the
squared distance of the statistics' mean from the running mean, and ``within``, the variance of the
samples' own means inside the micro-batch, both in running standard deviations. For m independent samples
the mean of m of them sits about ``within / m`` from the running mean, so ``D = shift * m / within`` is 1;
samples alike (one class per micro-batch) make it larger: the design effect ``D = 1 + (m - 1) * rho`` of
cluster sampling (Kish 1965) with ``rho`` the share of the samples' variance that the micro-batch's samples
have in common. The statistics of N images drawn as micro-batches of m are then worth
``N / (1 + (m - 1) * rho)`` independent samples (``n_eff``, never more than N).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from ..findings import Alert, Finding

__all__ = [
    "ALERTS",
    "ALIKE_ALERT",
    "COLLAPSE_FRACTION",
    "DIVERGENCE_ALERT",
    "MISMATCH_ALERT",
    "LayerSample",
    "Rules",
    "collapsed",
    "diverged",
    "effective_batch",
    "nonfinite",
    "normalisation_batch",
]

#: BN101 fires when the normalisation batch's share of shared variance, rho * m / N, reaches this. For a plain
#: BN layer (N = m) it is the share of variance the samples of a micro-batch have in common: one class per
#: micro-batch measured 0.5-1 on digits, shuffled micro-batches at most 0.26; pooling k micro-batches (ranks)
#: caps it at 1 / k. On MNIST-1D, whose classes differ in shape rather than in channel means, it stays below
#: 0.3 with one class per micro-batch too: BN101 misses those runs (BENCHMARKS.md, "Monitor alerts on
#: labelled runs")
ALIKE_ALERT = 0.3
#: BN504 fires when the window statistics sit this many times further from the running statistics than the
#: sampling noise of the window's images puts them (median over layers and samples)
MISMATCH_ALERT = 100.0
#: the collapse alert fires when at least this fraction of a layer's channels has a running variance below eps
COLLAPSE_FRACTION = 0.25
#: the divergence alert fires when ranks' running statistics differ by at least this much
DIVERGENCE_ALERT = 0.25


SMALL_EFFECTIVE_BATCH = Alert(
    "BN101",
    "error",
    "the samples of each micro-batch are alike: the batch statistics are worth about one sample (monitor)",
    "each micro-batch is normalised with statistics that carry what its samples share (their class, their "
    "source), so the network learns from statistics that evaluation, with the running statistics, does not "
    "have: training and evaluation see different networks. Shuffled micro-batches, however small, do not "
    "raise it; a normalisation batch that pools several micro-batches (ranks, an accumulation window) dilutes it.",
    "shuffle so that each micro-batch mixes classes; or normalise over more than one micro-batch: "
    "accumulation-aware BN (to_accum_bn), SyncBN across ranks (to_sync_bn); or GroupNorm (convert_bn); "
    "freeze_bn when fine-tuning.",
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
MISMATCH = Alert(
    "BN504",
    "error",
    "accumulation-aware BN trains with window statistics far from its running statistics (monitor)",
    "the window statistics the layers normalise with sit much further from the running statistics than the "
    "window's sampling noise explains, so evaluation runs a different network than training shaped "
    "(measured with the 'progressive' and 'blend' modes, whose gradient lets the features drift per window).",
    "use mode='renorm' (the default of to_accum_bn); recalibrate(model, loader) before evaluating.",
)

#: code -> alert, for ``bndoctor explain`` (BN101 is also a code of ``bndoctor check``, which explains it first)
ALERTS: dict[str, Alert] = {a.code: a for a in (SMALL_EFFECTIVE_BATCH, NONFINITE, COLLAPSED, DIVERGED, MISMATCH)}


@dataclass
class LayerSample:
    """What one sample recorded at one layer, in the run file's terms (:mod:`bndoctor.monitor`).

    ``norm`` says which statistics the layer normalises with in training: ``"batch"`` (its micro-batch),
    ``"ranks"`` (the micro-batches of every rank), ``"window"`` (an accumulation window so far) or
    ``"running"`` (its running statistics: frozen layers, Batch Renormalization). ``images`` is the number of
    samples in the micro-batch, ``batch`` the number of samples behind the statistics it normalises with.
    ``window`` is the window's value count, None unless ``norm == "window"``; ``drift_mean`` and
    ``drift_var`` are None at a layer's first sample; figures that could not be measured are NaN.
    """

    n: int
    frozen: bool
    nonfinite: bool
    window: float | None
    shift: float
    image_spread: float
    within: float
    n_eff: float
    var_ratio: float
    collapsed: float
    drift_mean: float | None
    drift_var: float | None
    images: int = 0
    batch: float = math.nan
    norm: str = "batch"

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        if out["window"] is None:
            del out["window"]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerSample:
        """A layer's entry of a run file's ``sample`` record (missing figures are NaN)."""
        nan = math.nan
        return cls(
            n=int(data.get("n", 0)),
            frozen=bool(data.get("frozen", False)),
            nonfinite=bool(data.get("nonfinite", False)),
            window=data.get("window"),
            shift=_number(data.get("shift")),
            image_spread=_number(data.get("image_spread")),
            within=_number(data.get("within")),
            n_eff=_number(data.get("n_eff")),
            var_ratio=_number(data.get("var_ratio")),
            collapsed=_number(data.get("collapsed"), 0.0),
            drift_mean=data.get("drift_mean"),
            drift_var=data.get("drift_var"),
            images=int(data.get("images", 0)),
            batch=_number(data.get("batch"), nan),
            norm=str(data.get("norm", "running" if data.get("frozen") else "batch")),
        )


def _number(value: Any, default: float = math.nan) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def normalisation_batch(
    norm: str, images: int, *, world_size: int = 1, window: float | None = None, n: int = 0
) -> float:
    """Samples behind the statistics a layer normalises with (``LayerSample.batch``): the micro-batch's
    ``images``, times ``world_size`` for ranks, the ``window``'s value count over the micro-batch's ``n`` values
    per channel (times its images) for a window; NaN for running statistics or a window not measured."""
    if norm == "batch":
        return float(images)
    if norm == "ranks":
        return float(images * world_size)
    if norm == "window" and window is not None and n:
        return window * images / n
    return math.nan


def design_effect(sample: LayerSample) -> float:
    """``shift * k / within``: how many times further the normalisation mean sits from the running mean than
    k independent samples put it (k: the micro-batch, or the window's samples); NaN where not measurable."""
    if sample.nonfinite or sample.norm == "running" or sample.images < 2 or math.isnan(sample.within):
        return math.nan
    if not sample.within > 0:  # copies of one sample: any shift is all shared
        return math.inf if sample.shift > 0 else math.nan
    k = sample.batch if sample.norm == "window" else sample.images
    value = sample.shift * k / sample.within
    return value if not math.isnan(value) else math.nan


def alike(design: float, images: int) -> float:
    """The share of variance the samples of a micro-batch of ``images`` have in common, from the design
    effect (clipped to [0, 1]; 0 for one image)."""
    if images < 2 or math.isnan(design):
        return 0.0
    return min(max((design - 1.0) / (images - 1), 0.0), 1.0)


def effective_batch(batch: float, images: int, rho: float) -> float:
    """``batch / (1 + (images - 1) * rho)``: the independent samples the statistics of ``batch`` samples,
    drawn as micro-batches of ``images`` samples sharing ``rho`` of their variance, are worth."""
    return batch / (1.0 + max(images - 1, 0) * rho)


class Rules:
    """The alert rules with what they remember: recent samples and the codes raised (once per layer or model).

    ``warmup``: training forwards before the batch-statistics rules may fire (the running statistics lag the
    weights early on); ``window``: samples whose median each rule reads. :meth:`sample` returns the new
    findings of one sample; :meth:`divergence` those of a cross-rank check.
    """

    def __init__(self, *, warmup: int = 50, window: int = 5) -> None:
        self.warmup = warmup
        self.window = window
        self.raised: set[tuple[str, str | None]] = set()
        self.history: dict[str, list[float]] = {"batch": [], "window": []}
        self.layer_design: dict[str, list[float]] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"raised": sorted([list(k) for k in self.raised], key=str), "history": dict(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raised = {(code, module) for code, module in state.get("raised", [])}
        history = state.get("history", {})
        for key in self.history:
            values = history.get(key)
            if isinstance(values, list):
                self.history[key] = [float(v) for v in values]

    def layer_effective_batch(self, name: str, sample: LayerSample) -> float:
        """The layer's ``n_eff`` for the run file: its batch at the layer's recent design effect (median)."""
        recent = self.layer_design.setdefault(name, [])
        design = design_effect(sample)
        if not math.isnan(design):
            recent.append(design)
            del recent[: -self.window]
        if sample.norm == "running" or not math.isfinite(sample.batch):
            return math.nan
        rho = alike(statistics.median(recent), sample.images) if recent else 0.0
        return effective_batch(sample.batch, sample.images, rho)

    def sample(self, step: int, forwards: int, layers: dict[str, LayerSample]) -> list[Finding]:
        found: list[Finding] = []
        for name, layer in layers.items():
            found.append(nonfinite(name, step, layer.nonfinite))
            if not layer.nonfinite:
                found.append(collapsed(name, step, layer.collapsed))
        found.append(self._alike(step, forwards, layers))
        found.append(self._mismatch(step, forwards, layers))
        return [f for f in found if f is not None and self._new(f)]

    def divergence(self, step: int, world_size: int, layers: dict[str, tuple[float, float]]) -> list[Finding]:
        found = [diverged(name, step, world_size, mean, var) for name, (mean, var) in layers.items()]
        return [f for f in found if f is not None and self._new(f)]

    def _new(self, finding: Finding) -> bool:
        key = (finding.code, finding.module)
        if key in self.raised:
            return False
        self.raised.add(key)
        return True

    def _recent(self, key: str, value: float) -> list[float]:
        values = self.history[key]
        if not math.isnan(value):
            values.append(value)
            del values[: -self.window]
        return values

    def _alike(self, step: int, forwards: int, layers: dict[str, LayerSample]) -> Finding | None:
        """BN101: the micro-batches of the layers that normalise with them are made of alike samples."""
        own = {n: s for n, s in layers.items() if s.norm in ("batch", "ranks") and not s.frozen}
        designs = [d for d in map(design_effect, own.values()) if not math.isnan(d)]
        recent = self._recent("batch", statistics.median(designs) if designs else math.nan)
        if forwards <= self.warmup or len(recent) < self.window or not own:
            return None
        images = max(s.images for s in own.values())
        batch = max((s.batch for s in own.values() if math.isfinite(s.batch)), default=images)
        rho = alike(statistics.median(recent), images)
        share = rho * images / batch if batch > 0 else 0.0
        if not share >= ALIKE_ALERT:
            return None
        worth = effective_batch(batch, images, rho)
        return SMALL_EFFECTIVE_BATCH.finding(
            None,
            f"the samples of each micro-batch share about {rho:.0%} of their variance (median over {len(own)} "
            f"layer(s) and the last {self.window} samples): the statistics of {batch:g} sample(s) are worth about "
            f"{worth:.1f} independent one(s)",
            {
                "alike": rho,
                "effective_batch": worth,
                "micro_batch": images,
                "normalisation_batch": batch,
                "layers": len(own),
                "step": step,
            },
        )

    def _mismatch(self, step: int, forwards: int, layers: dict[str, LayerSample]) -> Finding | None:
        """BN504: window statistics far from the running statistics, beyond the window's sampling noise."""
        windows = [s for s in layers.values() if s.norm == "window" and not s.frozen]
        designs = [d for d in map(design_effect, windows) if not math.isnan(d)]
        recent = self._recent("window", statistics.median(designs) if designs else math.nan)
        if forwards <= self.warmup or len(recent) < self.window or not windows:
            return None
        level = statistics.median(recent)
        if not level >= MISMATCH_ALERT:
            return None
        return MISMATCH.finding(
            None,
            f"the window statistics sit about {level:.0f} times further from the running statistics than the "
            f"window's sampling noise explains (median over {len(windows)} layer(s) and the last {self.window} "
            "samples)",
            {"mismatch": level, "layers": len(windows), "step": step},
        )


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

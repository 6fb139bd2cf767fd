"""BNMonitor: BatchNorm health during training, sampled every N forward passes.

At a sampled forward each monitored layer records, per channel and then
averaged over channels (running statistics read *before* the layer updates
them):

* ``shift``: (mu_B - mu_run)^2 / (var_run + eps), the standardised distance
  between the mean the layer normalises with (the micro-batch's; for
  :class:`bndoctor.AccumBatchNorm` its window so far) and the running mean;
  ``image_spread``: the same for each sample's own mean (over its spatial
  positions); ``within``: the variance of the samples' own means inside the
  micro-batch (unbiased, standardised like ``shift``; NaN for one sample).
* ``images``: samples in the micro-batch; ``batch``: samples behind the
  statistics the layer normalises with (the micro-batch, the micro-batches of
  all ranks for SyncBN, the window so far for accumulation-aware BN); ``norm``:
  which of those (``batch``, ``ranks``, ``window``; ``running`` for layers in
  eval mode and Batch Renormalization, which normalise with running statistics).
* ``n_eff``: the *effective normalisation batch*, how many independent samples
  the statistics are worth: ``batch / (1 + (images - 1) * rho)``, where
  ``rho`` (the share of variance the samples of a micro-batch have in common)
  comes from how much further the mean sits from the running mean than
  ``within`` predicts for independent samples (the design effect of cluster
  sampling, Kish 1965; median over the layer's last ``window`` samples). It
  never exceeds ``batch``: shuffled micro-batches give about ``batch``, one
  class per micro-batch about ``batch / images``.
* ``var_ratio``: var_B / var_run (near 1 - 1/n when healthy).
* ``drift_mean`` / ``drift_var``: how far the running statistics moved since
  the previous sample (standardised mean change; mean |log| variance ratio).
* ``nonfinite``: NaN/Inf in the input or the buffers; ``collapsed``: the
  fraction of channels whose running variance fell below the layer's eps.

Every ``divergence_every`` samples under torch.distributed, the cross-rank
spread of running statistics (:func:`bndoctor.rank_divergence`, one
collective) is recorded too. Alerts are :class:`bndoctor.Finding` objects
with the codes of ``bndoctor check`` (BN101: micro-batches of alike
samples) plus BN501-BN504 for what only a running model shows; each is raised once
per layer (or once for the model), kept in ``monitor.alerts``, written to the
sinks and logged on rank zero. The rules and their thresholds, measured on
labelled runs, are in :mod:`bndoctor.monitor.alerts`. A sampled forward through
the root also records ``mode_gap``, the train/eval gap of the model's output
(:mod:`bndoctor.monitor._probe`; ``probe=False`` skips that extra no-grad
forward).

A training forward is counted wherever the BN layers are called from: each
monitored layer carries a forward pre-hook, so a LightningModule whose
``training_step`` calls ``self.net(x)``, a loop that calls submodules one by
one, or a wrapper around the model are all sampled. A forward of the root
module (pre- and post-hooks on it) is one forward, also when it calls the root
again inside (Lightning runs ``training_step`` through the module's
``__call__`` under DDP, and ``training_step`` calls ``self(x)``); layers called
outside the root's forward form one forward until a layer runs a second time
(or :meth:`BNMonitor.set_step`, :meth:`BNMonitor.pop_metrics` or
:meth:`BNMonitor.close` is called). The hooks stay the same for the whole run,
so a model compiled with ``torch.compile`` after the monitor was made is
sampled too. Between samples the cost is those hooks counting; the figures
are computed only in a sampled forward (the first training forward is always
one). A run that trains while none of the monitored layers runs in training
mode (they were replaced by a converted copy, or the model trains in eval mode)
gets one :class:`bndoctor.BNDoctorWarning`, after 10 steps or at
:meth:`BNMonitor.close`. Alerts raised by one sample are logged as one line per
code (``BN502 warning on 53 layers: layer1.0.bn1, ... (+50)``); the run file
keeps one record per layer.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import distributed
from .._validate import positive_int
from .._version import __version__
from .._walk import ModuleSelection, with_running_stats
from ..errors import BNDoctorError, BNDoctorWarning, require_module
from ..findings import Finding
from ..layers import normalisation_statistics
from ..layers._base import compiling, pools_ranks, replaying
from ..layers.renorm import BatchRenorm
from ._probe import mode_gap
from .alerts import LayerSample, Rules, normalisation_batch
from .sinks import JsonlSink, Sink

__all__ = ["BNMonitor"]

log = logging.getLogger("bndoctor.monitor")

#: set_step calls with no monitored layer run in training mode before the monitor warns that it sees nothing
_SILENT_STEPS = 10


@dataclass
class _Figures:
    """One layer's figures of one sample as read from the device; NaN where the sample did not measure one.

    ``check`` is finite exactly when the layer's input and running statistics are; ``window`` is the count
    the layer normalises with when it pools an accumulation window.
    """

    check: float
    window: float
    shift: float
    image_spread: float
    within: float
    var_ratio: float
    collapsed: float
    drift_mean: float
    drift_var: float


#: the order in which a sample stacks its figures on the device (one host read per sample)
_FIGURES = tuple(f.name for f in fields(_Figures))


@dataclass
class _Measured:
    """A layer's sample between its forward and the host read: its figures still on the device."""

    n: int  # values per channel of the layer's input
    frozen: bool
    figures: torch.Tensor  # stacked in _FIGURES order
    window: bool  # the layer normalised with an accumulation window
    drift: bool  # an earlier sample exists to measure drift against
    images: int = 0  # samples in the micro-batch
    norm: str = "batch"  # which statistics the layer normalises with (alerts.LayerSample)


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _layer_list(names: list[str], shown: int = 3) -> str:
    listed = ", ".join(names[:shown])
    return listed + (f", ... (+{len(names) - shown})" if len(names) > shown else "")


def group_alerts(findings: Iterable[Finding], shown: int = 3) -> list[str]:
    """One line per finding code: ``BN101 error on 53 layers: layer1.0.bn1, ... (+50): <first layer's message>``.

    ``findings`` in the order raised; ``shown`` layer names listed per line.

    A code raised on one layer keeps its ``str(finding)``. The full list is in
    the run file (one ``alert`` record per layer); ``bndoctor explain CODE``
    says what a code means and how to fix it.
    """
    by_code: dict[str, list[Finding]] = {}
    for finding in findings:
        by_code.setdefault(finding.code, []).append(finding)
    lines = []
    for code, group in by_code.items():
        if len(group) == 1:
            lines.append(str(group[0]))
            continue
        first = group[0]
        names = _layer_list([f.where for f in group], shown)
        summary = first.message.split(": ")[0]
        lines.append(f"{code} {first.severity} on {len(group)} layers: {names}: {summary} (at {first.where})")
    return lines


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """A record's summary for a trainer's logger: a few scalars, not one per layer.

    Samples give ``bn/effective_batch_min`` and ``_median`` (over layers),
    ``bn/var_ratio_mean``, ``bn/drift_mean_max``, ``bn/collapsed_max``; a
    cross-rank check ``bn/rank_divergence``; a noise record
    ``noise/b_simple`` (and ``noise/alpha`` when the tail index is known).
    """
    kind = record.get("kind")
    out: dict[str, float] = {}
    if kind == "sample":
        layers = record.get("layers") or {}

        def finite(key: str) -> list[float]:
            values = (v.get(key) for v in layers.values())
            return [float(x) for x in values if isinstance(x, (int, float)) and math.isfinite(x)]

        n_eff, var_ratio, drift, collapsed = (
            finite("n_eff"),
            finite("var_ratio"),
            finite("drift_mean"),
            finite("collapsed"),
        )
        if n_eff:
            out["bn/effective_batch_min"] = min(n_eff)
            out["bn/effective_batch_median"] = statistics.median(n_eff)
        if var_ratio:
            out["bn/var_ratio_mean"] = statistics.fmean(var_ratio)
        if drift:
            out["bn/drift_mean_max"] = max(drift)
        if collapsed:
            out["bn/collapsed_max"] = max(collapsed)
    elif kind == "divergence" and isinstance(record.get("max"), (int, float)):
        out["bn/rank_divergence"] = float(record["max"])
    elif kind == "noise":
        for key in ("b_simple", "alpha"):
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"noise/{key}"] = float(value)
    return out


def _sinks(sink: Any) -> list[Sink]:
    if sink is None:
        return []
    if isinstance(sink, (str, Path)):
        return [JsonlSink(sink)]
    if isinstance(sink, Iterable) and not hasattr(sink, "write"):
        return [s for item in sink for s in _sinks(item)]
    if not callable(getattr(sink, "write", None)):
        raise BNDoctorError(
            f"expected a sink: a path (JSONL), or an object with write(record) and close() (got {type(sink).__name__})",
            hint="e.g. sink='bn_monitor.jsonl' or sink=[bndoctor.monitor.LoggingSink()]",
        )
    return [sink]


class BNMonitor:
    """Watch the BN layers of ``model`` while it trains; see the module docstring for what is recorded.

    ``every``: sample one training forward in ``every`` (default 100).
    ``sink``: a JSONL path, a sink object, or a list of them (default: none,
    records only in memory when ``keep=True``). ``modules`` selects layers as
    everywhere in bndoctor. ``warmup``: training forwards before the
    batch-statistics alerts may fire (early in training the running statistics
    lag behind the fast-changing weights; default 50); ``window``: samples
    whose median those alerts read (default 5). ``probe``: record the
    train/eval gap of sampled forwards (default ``True``).
    ``divergence_every``: samples between cross-rank checks (0: never).
    ``all_ranks``: write and log on every rank (default: rank 0 only);
    ``log=False`` keeps alerts off the ``bndoctor.monitor`` logger. ``keep``
    keeps every record in ``monitor.records``.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 100,
        sink: Any = None,
        modules: ModuleSelection = None,
        warmup: int = 50,
        window: int = 5,
        divergence_every: int = 10,
        keep: bool = False,
        all_ranks: bool = False,
        log: bool = True,
        probe: bool = True,
    ) -> None:
        require_module(model)
        positive_int(every, "every", hint="e.g. every=100")
        positive_int(window, "window", hint="e.g. window=5")
        positive_int(divergence_every, "divergence_every", minimum=0, hint="0 turns the cross-rank check off")
        self.model = model
        self.root = _unwrap(model)
        records = with_running_stats(self.root, modules)
        if not records:
            raise BNDoctorError(
                f"{type(self.root).__name__} has no BN layer with running statistics to monitor",
                hint="models with GroupNorm/LayerNorm only have nothing for BNMonitor to watch",
            )
        self.layers = {r.name: r for r in records}
        self.every = every
        self.warmup = warmup
        self.window = window
        self.rules = Rules(warmup=warmup, window=window)
        self.divergence_every = divergence_every
        self.rank = distributed.rank()
        self.world_size = distributed.world_size()
        self.writes = all_ranks or self.rank == 0
        self.sinks = _sinks(sink) if self.writes else []
        self.keep = keep
        self.log = log
        self.probe = bool(probe)
        self.records: list[dict[str, Any]] = []
        self.alerts: list[Finding] = []
        self.forwards = 0
        self.samples = 0
        self.step: int | None = None  # set by set_step (e.g. the optimizer step of a framework)
        self._previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._current: dict[str, _Measured] = {}
        self._depth = 0  # calls of the root in progress (1 in a forward; more when the root calls itself)
        self._open = False  # a forward is in progress (through the root, or layers called outside it)
        self._sampling = False  # the forward in progress is sampled
        self._visited: set[str] = set()  # layers the forward in progress has called
        self._layers_ran = False  # some monitored layer ran in a training forward
        self._trained = 0  # training forwards of this monitor (forwards also counts a resumed run's)
        self._steps: set[int] = set()  # steps set_step has seen while no monitored layer ran
        self._warned = False
        self._probing = False  # the eval-mode forward of the train/eval gap is running
        self._gap: torch.Tensor | None = None  # that gap, until the sample is read
        self._forward_at_entry: Any = None  # the root's instance-level forward when its forward began
        self._pending: list[Finding] = []  # alerts of the current sample, logged together
        self._fresh: dict[str, float] = {}  # summaries since the last pop_metrics()
        self._closed = False
        self._counter = self.root.register_forward_pre_hook(self._enter_root, with_kwargs=True)
        self._leaver = self.root.register_forward_hook(self._leave_root, with_kwargs=True, always_call=True)
        self._layer_hooks = [
            record.module.register_forward_pre_hook(self._layer_hook(name)) for name, record in self.layers.items()
        ]
        self._emit(
            {
                "kind": "start",
                "bndoctor": __version__,
                "model": type(self.root).__name__,
                "every": every,
                "window": window,
                "layers": list(self.layers),
                "rank": self.rank,
                "world_size": self.world_size,
                "time": time.time(),
            }
        )

    # ------------------------------------------------------------------ public

    def set_step(self, step: int) -> None:
        """Label the next records with this step (frameworks pass their global step).

        Called between forwards: a sampled forward that never finished (an
        interrupt inside the model) is dropped here; layers called outside the
        root's forward end their forward here.
        """
        self._end_forward(record=not self._depth)
        self._depth = 0
        self.step = int(step)
        if not self._layers_ran:
            self._steps.add(self.step)
            if len(self._steps) >= _SILENT_STEPS:
                self._warn_silent()

    def write(self, kind: str, **values: Any) -> None:
        """Add a record of your own (e.g. ``kind="noise"``) to the sinks, labelled with the current step."""
        step = self.step if self.step is not None else self.forwards
        self._emit({"kind": kind, "step": step, "time": time.time(), **values})

    def pop_metrics(self) -> dict[str, float]:
        """The summary scalars recorded since the last call (see :func:`metrics_of`), for a trainer's logger.

        Includes ``bn/alerts``, the number of alerts raised so far, whenever
        anything new was recorded.
        """
        if not self._depth:
            self._end_forward()
        fresh, self._fresh = self._fresh, {}
        if fresh:
            fresh["bn/alerts"] = float(len(self.alerts))
        return fresh

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: counters, alerts already raised, the recent history."""
        return {"forwards": self.forwards, "samples": self.samples, **self.rules.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.forwards = int(state.get("forwards", 0))
        self.samples = int(state.get("samples", 0))
        self.rules.load_state_dict(state)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Remove every hook and close the sinks (idempotent)."""
        if self._closed:
            return
        if not self._depth:
            self._end_forward()
        self._closed = True
        self._open = self._sampling = False
        self._current = {}
        self._counter.remove()
        self._leaver.remove()
        for handle in self._layer_hooks:
            handle.remove()
        if not self._layers_ran and (self._trained or self._steps):
            self._warn_silent()
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> BNMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ hooks

    def _enter_root(self, module: nn.Module, args: Any, kwargs: Any = None) -> None:
        if self._probing or replaying():
            return
        self._depth += 1
        if self._depth > 1:  # the root called inside its own forward: part of the outer call
            return
        self._end_forward()  # layers called outside the root before it: their forward ends here
        self._begin_forward()
        # a framework may swap the root's forward for this call (Lightning runs training_step through it)
        self._forward_at_entry = module.__dict__.get("forward")

    def _leave_root(self, module: nn.Module, args: Any, kwargs: Any = None, output: Any = None) -> None:
        if self._probing or replaying():
            return
        self._depth = max(self._depth - 1, 0)
        if self._depth:
            return
        raised = output is None and sys.exc_info()[1] is not None  # the forward raised: drop its sample
        redirected = module.__dict__.get("forward") is not self._forward_at_entry
        if self._sampling and self._current and not raised and self.probe and not redirected and not compiling():
            self._probe(module, args, kwargs or {}, output)
        self._end_forward(record=not raised)

    def _probe(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        """The train/eval gap of this forward; a model the eval-mode call fails on is not probed again."""
        self._probing = True
        try:
            self._gap = mode_gap(module, args, kwargs, output)
        except Exception as exc:  # the probe must never break training: the gap is simply not recorded
            self.probe = False
            log.debug("train/eval gap not measured for %s: %s", type(module).__name__, exc)
        finally:
            self._probing = False

    def _begin_forward(self) -> None:
        self._open, self._visited, self._current = True, set(), {}
        self._sampling = False
        if self._closed or not self.root.training:
            return
        self.forwards += 1
        self._trained += 1
        self._sampling = (self.forwards - 1) % self.every == 0

    def _end_forward(self, record: bool = True) -> None:
        if not self._open:
            return
        self._open = False
        if self._sampling:
            self._sampling = False
            if record and self._current:
                self._finish()
        self._current = {}

    def _layer_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if self._probing or replaying():
                return
            if self._depth:  # inside the root's forward, which counted it: between samples, little to do
                if not self._layers_ran:
                    self._layers_ran = self.root.training
                if self._sampling:
                    self._measure_input(name, module, args)
                return
            if self._closed:
                return
            if not self._open or name in self._visited:
                self._end_forward()  # outside the root, a layer that runs again starts the next forward
                self._begin_forward()
            self._visited.add(name)
            if not self._layers_ran:
                self._layers_ran = self.root.training
            if self._sampling:
                self._measure_input(name, module, args)

        return hook

    def _measure_input(self, name: str, module: nn.Module, args: Any) -> None:
        if name not in self._current and args and isinstance(args[0], torch.Tensor):
            self._current[name] = self._measure(name, module, args[0])

    def _warn_silent(self) -> None:
        """One warning per monitor when a run trains and none of the monitored layers runs in training mode."""
        if self._warned:
            return
        self._warned = True
        names = _layer_list(list(self.layers))
        where = f"{self._trained} training forwards of the root" if self._trained else f"{len(self._steps)} steps"
        message = (
            f"BNMonitor sampled nothing: none of the {len(self.layers)} BN layers it watches ({names}) ran in "
            f"training mode during {where}. Create the monitor on the model that trains, after any conversion "
            "(to_accum_bn, convert_bn, to_sync_bn return copies unless inplace=True), and train in train() mode"
        )
        warnings.warn(message, BNDoctorWarning, stacklevel=3)
        self._emit({"kind": "warning", "step": self.step, "message": message, "time": time.time()})

    @torch.no_grad()
    def _measure(self, name: str, module: nn.Module, x: torch.Tensor) -> _Measured:
        """One layer's figures as device tensors (read to the host once per sample, in :meth:`_read`)."""
        record = self.layers[name]
        eps = float(getattr(module, "eps", 1e-5))
        running_mean = module.running_mean.detach().double()
        running_var = module.running_var.detach().double()
        x = x.detach()
        n = x.numel() // x.shape[1] if x.dim() > 1 else x.numel()
        nan = torch.full((), math.nan, dtype=torch.float64, device=running_mean.device)
        figures = dict.fromkeys(_FIGURES, nan)
        # NaN or Inf anywhere in the input or the running statistics makes this float64 sum non-finite (a
        # float32 / 16-bit input cannot overflow it): one number to read instead of three isfinite kernels each
        figures["check"] = running_mean.sum() + running_var.sum()
        scale = running_var + eps
        window = None
        if n >= 1:
            values = x.double().transpose(0, 1).reshape(x.shape[1], x.shape[0], -1)  # (C, images, positions)
            image_means = values.mean(2)  # (C, images)
            mean_b = image_means.mean(1)
            var_b = values.reshape(x.shape[1], -1).var(1, unbiased=False)
            figures["check"] = figures["check"] + mean_b.sum()
            window = normalisation_statistics(module, mean_b, var_b, n)
            if window is not None:  # accumulation-aware BN normalises with its window, not the micro-batch
                figures["window"] = torch.as_tensor(window[0], dtype=torch.float64, device=nan.device)
                mean_b, var_b = window[1], window[2]
            figures["shift"] = ((mean_b - running_mean) ** 2 / scale).mean()
            figures["image_spread"] = ((image_means - running_mean.unsqueeze(1)) ** 2 / scale.unsqueeze(1)).mean()
            if x.shape[0] > 1:
                figures["within"] = (image_means.var(1) / scale).mean()
            figures["var_ratio"] = (var_b / scale).mean()
        figures["collapsed"] = (running_var < eps).double().mean()
        previous = self._previous.get(name)
        if previous is not None:
            p_mean, p_var = previous
            figures["drift_mean"] = ((running_mean - p_mean) ** 2 / scale).mean().sqrt()
            figures["drift_var"] = (scale / (p_var + eps)).log().abs().mean()
        self._previous[name] = (running_mean.clone(), running_var.clone())
        stacked = torch.stack([figures[k].reshape(()) for k in _FIGURES])
        images = int(x.shape[0]) if x.dim() > 1 else 1
        if not module.training:
            norm = "running"
        elif window is not None:
            norm = "window"
        elif isinstance(module, BatchRenorm):  # corrected towards the running statistics (r, d)
            norm = "running"
        elif pools_ranks(module):
            norm = "ranks"
        else:
            norm = "batch"
        return _Measured(n, record.frozen, stacked, window is not None, previous is not None, images, norm)

    def _read(self, measured: dict[str, _Measured], gap: torch.Tensor | None) -> tuple[dict[str, LayerSample], float]:
        """Every layer's device figures and the train/eval gap as numbers, with one host read for the sample."""
        if not measured:
            return {}, math.nan
        stacked = [m.figures for m in measured.values()]
        extra = torch.full_like(stacked[0], math.nan)
        if gap is not None:
            extra[0] = gap.to(extra.device)
        stacked.append(extra)
        if len({t.device for t in stacked}) > 1:  # a model spread over devices: gather on the host
            stacked = [t.cpu() for t in stacked]
        *rows, last = torch.stack(stacked).tolist()
        layers = {name: self._sample(name, m, _Figures(*row)) for (name, m), row in zip(measured.items(), rows)}
        return layers, last[0]

    def _sample(self, name: str, measured: _Measured, figures: _Figures) -> LayerSample:
        nonfinite = not math.isfinite(figures.check)
        ok = not nonfinite and measured.n >= 1
        shift = spread = within = var_ratio = math.nan
        if ok:
            shift, spread, within, var_ratio = figures.shift, figures.image_spread, figures.within, figures.var_ratio
        drift = measured.drift and not nonfinite
        images = measured.images
        window = figures.window if ok else None
        batch = normalisation_batch(measured.norm, images, world_size=self.world_size, window=window, n=measured.n)
        sample = LayerSample(
            n=measured.n,
            frozen=measured.frozen,
            nonfinite=nonfinite,
            window=figures.window if measured.window and ok else None,
            shift=shift,
            image_spread=spread,
            within=within,
            n_eff=math.nan,
            var_ratio=var_ratio,
            collapsed=figures.collapsed,
            drift_mean=figures.drift_mean if drift else None,
            drift_var=figures.drift_var if drift else None,
            images=images,
            batch=batch,
            norm=measured.norm,
        )
        sample.n_eff = self.rules.layer_effective_batch(name, sample) if ok else math.nan
        return sample

    def _finish(self) -> None:
        self.samples += 1
        step = self.step if self.step is not None else self.forwards
        layers, gap = self._read(self._current, self._gap)
        self._current, self._gap = {}, None
        self._emit(
            {
                "kind": "sample",
                "step": step,
                "forward": self.forwards,
                "rank": self.rank,
                "time": time.time(),
                "mode_gap": gap,
                "layers": {name: sample.to_json() for name, sample in layers.items()},
            }
        )
        self._alerts_from_sample(step, layers)
        if self.divergence_every and self.world_size > 1 and self.samples % self.divergence_every == 0:
            self._divergence(step)
        self._log_pending(step)

    # ------------------------------------------------------------------ alerts

    def _alert(self, step: int, finding: Finding) -> None:
        self.alerts.append(finding)
        self._emit({"kind": "alert", "step": step, "finding": finding.as_dict()})
        self._pending.append(finding)

    def _log_pending(self, step: int) -> None:
        """One log line per code for the alerts of this sample (all layers of BN101 together)."""
        pending, self._pending = self._pending, []
        if not (pending and self.writes and self.log):
            return
        for line in group_alerts(pending):
            log.warning("step %s: %s", step, line)

    def _alerts_from_sample(self, step: int, layers: dict[str, LayerSample]) -> None:
        for finding in self.rules.sample(step, self.forwards, layers):
            self._alert(step, finding)

    def _divergence(self, step: int) -> None:
        from ..ranks import rank_divergence

        report = rank_divergence(self.root, modules=list(self.layers))
        layers = {la.name: {"mean_max": la.mean_max, "var_max": la.var_max} for la in report.layers}
        self._emit({"kind": "divergence", "step": step, "max": report.max, "layers": layers})
        for finding in self.rules.divergence(
            step, self.world_size, {la.name: (la.mean_max, la.var_max) for la in report.layers}
        ):
            self._alert(step, finding)

    def _emit(self, record: dict[str, Any]) -> None:
        self._fresh.update(metrics_of(record))
        if self.keep:
            self.records.append(record)
        for sink in self.sinks:
            sink.write(record)

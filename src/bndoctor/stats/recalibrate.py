"""Recalibrate BatchNorm running statistics with the model's final weights (PreciseBN).

Running statistics are an exponential moving average (EMA) of batch
statistics: at small batch they are dominated by the last few batches, and
they lag the weights. Recalibration runs the model over data and replaces them
by the exact statistics of the whole pass (Wu & Johnson, "Rethinking 'Batch'
in BatchNorm", 2021, call this PreciseBN).

How the pass runs:

* every module is in eval mode (dropout off), except the BN layers being
  recalibrated, which normalise with batch statistics as in training, so that
  later layers see the activations they see during training;
* per layer and per forward the count ``n`` (batch x spatial positions), the
  batch mean and the biased batch variance are recorded, and pooled in float64
  with :func:`bndoctor.moments.pool` — weighted by ``n``, including the
  spread of the batch means (``torch.optim.swa_utils.update_bn`` averages the
  batch variances instead and comes out too low when batches differ);
* by default the batch statistics are the ones torch's BN kernel computes
  anyway (read from the buffers with ``momentum=1``), so recalibration costs
  about one no-grad forward; ``exact=True`` recomputes them from each layer's
  input in float64 (slower; used automatically for half-precision buffers,
  third-party frozen BN and SyncBatchNorm);
* under torch.distributed the pooled moments of every rank are gathered with
  one collective and pooled again, so every rank ends with the statistics of
  the union of all ranks' data — also when ranks hold different amounts,
  including none.

``running_var`` receives the *unbiased* pooled variance ``M2 / (N - 1)``, the
convention torch's BN uses for its running estimate (N is batch x positions
over the whole pass, so the two differ by a factor ``N / (N - 1)``).

Whatever happens — including an exception in the user's forward on any rank
— the model's modes, momentum, hooks and buffers are restored first; new
statistics are written only after the pass succeeded everywhere.
"""

from __future__ import annotations

import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import distributed
from .._batches import Forward, batch_size, default_forward, model_device, to_device
from .._state import Snapshot, preserved
from .._table import render
from .._validate import positive_int
from .._walk import BNInfo, ModuleSelection, find_bn, require_running_stats, select, warn_unsupported
from ..errors import BNDoctorError, BNDoctorWarning, NonFiniteStatisticsError, require_module
from ..families import has_plain_forward
from ..layers import apply_post_ops, pools_ranks
from ..moments import Moments, merge, pool, pool_columns

__all__ = ["LayerChange", "RecalibrationReport", "recalibrate"]


@dataclass(frozen=True)
class LayerChange:
    """How far one layer's statistics moved.

    ``name``: the layer's path; ``reached``: whether any batch reached it;
    ``count``: the pooled values per channel; ``batches``: the batches that
    reached it; ``mean_change`` / ``var_change``: how far the running mean
    (in standard deviations) and variance (relative) moved.
    """

    name: str
    reached: bool
    count: int
    batches: int
    mean_change: float
    var_change: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RecalibrationReport:
    """What :func:`recalibrate` did.

    ``layers``: one :class:`LayerChange` per layer; ``samples`` counts this
    rank, ``global_samples`` all ranks; ``batches`` on this rank;
    ``world_size``; ``seconds`` taken; ``domain``: the statistics set written
    (``None``: the running buffers); ``skipped``: batches left out with
    ``nonfinite="skip"``.
    """

    layers: list[LayerChange]
    samples: int
    global_samples: int
    batches: int
    world_size: int
    seconds: float
    domain: str | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def unreached(self) -> list[str]:
        return [layer.name for layer in self.layers if not layer.reached]

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "global_samples": self.global_samples,
            "batches": self.batches,
            "world_size": self.world_size,
            "seconds": self.seconds,
            "domain": self.domain,
            "skipped": self.skipped,
            "unreached": self.unreached,
            "layers": [layer.to_json() for layer in self.layers],
        }

    def __str__(self) -> str:
        head = (
            f"recalibrated {sum(la.reached for la in self.layers)} BN layer(s) on {self.global_samples} samples "
            f"({self.batches} batches on this rank, world size {self.world_size}) in {self.seconds:.2f} s"
        )
        rows = [
            [la.name, la.count if la.reached else "not reached", f"{la.mean_change:.3g}", f"{la.var_change:.3g}"]
            for la in self.layers
        ]
        table = render(["layer", "values/channel", "mean change", "var change"], rows)
        notes = []
        if self.unreached:
            notes.append(f"not reached by the forward (statistics kept): {', '.join(self.unreached)}")
        if self.skipped:
            notes.append(f"skipped: {', '.join(self.skipped)}")
        return "\n".join([head, table, *notes])


# --------------------------------------------------------------------------- collection


def _values_per_channel(x: torch.Tensor) -> int:
    return x.numel() // x.shape[1] if x.dim() > 1 else x.numel()


class _Sample(NamedTuple):
    """One call's batch statistics at one layer, in float64."""

    count: int  # values per channel
    mean: torch.Tensor
    var: torch.Tensor  # biased
    batch: int  # the index of the batch whose forward made the call


@dataclass(eq=False)
class _Layer:
    """One layer during the pass: how it records, and what it recorded."""

    record: BNInfo
    fast: bool  # read the statistics torch's kernel leaves in the buffers (else compute them, exact)
    calls: int = 0  # calls over all batches
    calls_in_batch: int = 0  # calls in the forward of the current batch (fast layers)
    last_n: int = 0  # values per channel of the last call (fast layers)
    samples: list[_Sample] = field(default_factory=list)  # exact layers' calls, fast layers' repeated calls

    @property
    def module(self) -> Any:
        return self.record.module

    @property
    def channels(self) -> int:
        return int(self.record.num_features or 0)


def _reads_kernel_statistics(record: BNInfo, exact: bool, device: torch.device) -> bool:
    """Whether the layer's batch statistics can be read from its buffers after a momentum-1 call (plain torch BN)."""
    module = record.module
    return (
        not exact
        and isinstance(module, _BatchNorm)
        and not isinstance(module, nn.SyncBatchNorm)
        and has_plain_forward(module)
        and module.running_mean.dtype in (torch.float32, torch.float64)
        and module.running_mean.device == device
    )


class _Pass:
    """Records, for every selected layer and every call, the count, mean and variance of its batch.

    Layers take one of two paths. *Fast* (plain torch BN with float32/64
    buffers): the layer runs in training mode with ``momentum=1``, so after a
    call its buffers hold exactly that call's batch mean and unbiased
    variance; they are read once per batch for all fast layers together (one
    ``torch.cat``), and only a layer called twice in one forward has its first
    call's values copied. *Exact*: the batch moments are computed in float64
    from the layer's input. Calls are intercepted by a per-instance
    ``forward`` wrapper (cheaper than forward hooks), which the snapshot
    removes again.
    """

    def __init__(self, records: list[BNInfo], exact: bool) -> None:
        device = records[0].module.running_mean.device if records else None
        self.layers = [_Layer(r, _reads_kernel_statistics(r, exact, device)) for r in records]
        self.fast = [layer for layer in self.layers if layer.fast]
        self.fast_buffers = [layer.module.running_mean for layer in self.fast]
        self.fast_buffers += [layer.module.running_var for layer in self.fast]
        self.fast_channels = sum(layer.channels for layer in self.fast)
        self.batch = 0  # index of the batch being fed
        # per batch, for all fast layers: values per channel of each; their means then unbiased variances
        self.fast_counts: list[list[int]] = []
        self.fast_stats: list[torch.Tensor] = []

    def patch(self, snapshot: Snapshot, model: nn.Module) -> None:
        """Prepare the model for the pass: eval mode but the recorded layers, which record each call."""
        for module in model.modules():
            snapshot.set_mode(module, False)  # dropout off; frozen layers included
        for layer in self.layers:
            module = layer.module
            if layer.fast:
                snapshot.set_mode(module, True)
                module.momentum = 1.0  # running buffers receive exactly the batch statistics
                if module.num_batches_tracked is not None:  # torch's BN then counts no calls: work thrown away
                    snapshot.hide_buffer(module, "num_batches_tracked")
            elif isinstance(module, _BatchNorm):
                snapshot.set_mode(module, True)
                module.track_running_stats = False  # batch statistics, buffers untouched
            snapshot.patch(module, "forward", self._wrapper(layer))
        self._clear_fast_buffers()

    def _clear_fast_buffers(self) -> None:
        # momentum 1 keeps 0 x old: zeros, so that a NaN of an earlier batch cannot leak into the next
        if self.fast_buffers:
            torch._foreach_zero_(self.fast_buffers)

    def _wrapper(self, layer: _Layer) -> Callable[..., Any]:
        module = layer.module
        original = type(module).forward.__get__(module)
        if pools_ranks(module):
            # statistics are pooled across ranks once, after the pass: each rank normalises locally (no
            # collective per forward, so uneven data cannot leave a rank waiting), then its drop/act if any
            def original(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                return apply_post_ops(module, _BatchNorm.forward(module, x))

        if layer.fast:

            def fast_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if layer.calls_in_batch:  # called again in this forward: keep the previous call
                    self._keep(layer)
                out = original(x, *args, **kwargs)
                layer.calls_in_batch += 1
                layer.last_n = _values_per_channel(x)
                return out

            return fast_forward

        def exact_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(x.detach().double(), dim=dims, correction=0)
            layer.samples.append(_Sample(_values_per_channel(x), mean, var, self.batch))
            layer.calls += 1
            return original(x, *args, **kwargs)

        return exact_forward

    def _keep(self, layer: _Layer) -> None:
        module, n = layer.module, layer.last_n
        var = module.running_var.double() * ((n - 1) / n if n > 1 else 0.0)
        layer.samples.append(_Sample(n, module.running_mean.double().clone(), var, self.batch))

    def end_batch(self) -> None:
        self.batch += 1
        if not self.fast:
            return
        self.fast_stats.append(torch.cat(self.fast_buffers))
        counts = []
        for layer in self.fast:
            calls = layer.calls_in_batch
            counts.append(layer.last_n if calls else 0)
            layer.calls += calls
            layer.calls_in_batch = 0
        self.fast_counts.append(counts)
        self._clear_fast_buffers()

    def nonfinite_batches(self) -> dict[int, str]:
        """Batch index -> the first layer whose statistics of that batch hold NaN or Inf (one host read per layer)."""
        first: dict[int, int] = {}  # batch -> index of the first bad layer (module order)
        index = {layer: i for i, layer in enumerate(self.layers)}  # _Layer hashes by identity

        def mark(batch: int, layer: _Layer) -> None:
            first[batch] = min(first.get(batch, index[layer]), index[layer])

        if self.fast_stats:
            stats = torch.isfinite(torch.stack(self.fast_stats))
            finite = stats[:, : self.fast_channels] & stats[:, self.fast_channels :]
            owner = [layer for layer in self.fast for _ in range(layer.channels)]
            for batch, column in (~finite).nonzero().tolist():
                mark(batch, owner[column])
        for layer in self.layers:
            if layer.samples:
                means = torch.stack([sample.mean for sample in layer.samples])
                variances = torch.stack([sample.var for sample in layer.samples])
                rows = (~(torch.isfinite(means) & torch.isfinite(variances))).any(1).tolist()
                for sample, row_bad in zip(layer.samples, rows):
                    if row_bad:
                        mark(sample.batch, layer)
        return {batch: self.layers[first[batch]].record.name for batch in sorted(first)}

    def moments(self, skip: frozenset[int] = frozenset()) -> list[Moments]:
        """Pooled moments per layer over every batch but those in ``skip``."""
        fast = self._fast_moments(skip)
        out = []
        for layer in self.layers:
            parts = [fast[layer]] if layer in fast else []
            samples = [sample for sample in layer.samples if sample.batch not in skip]
            if samples:
                counts = torch.tensor([sample.count for sample in samples], dtype=torch.float64)
                means = torch.stack([sample.mean for sample in samples])
                parts.append(pool(counts.to(means.device), means, torch.stack([sample.var for sample in samples])))
            if not parts:
                zeros = torch.zeros(layer.channels, dtype=torch.float64, device=layer.module.running_mean.device)
                parts.append(Moments(0.0, zeros, zeros.clone()))
            out.append(merge(parts) if len(parts) > 1 else parts[0])
        return out

    def _fast_moments(self, skip: frozenset[int]) -> dict[_Layer, Moments]:
        """Each fast layer's pooled moments over the kept batches, pooled for all layers at once."""
        keep = [b for b in range(len(self.fast_stats)) if b not in skip]
        if not keep:
            return {}
        channels = [layer.channels for layer in self.fast]
        stats = torch.stack([self.fast_stats[b] for b in keep]).double()
        means, variances = stats[:, : self.fast_channels], stats[:, self.fast_channels :]
        counts = torch.tensor([self.fast_counts[b] for b in keep], dtype=torch.float64, device=means.device)
        counts = counts.repeat_interleave(torch.tensor(channels, device=means.device), dim=1)
        variances = variances * torch.where(counts > 1, (counts - 1) / counts.clamp(min=1), 0.0)  # to biased
        total, mean, m2 = pool_columns(counts, means, variances)
        out, start = {}, 0
        for layer, c in zip(self.fast, channels):
            out[layer] = Moments(float(total[start]), mean[start : start + c], m2[start : start + c])
            start += c
        return out


def _require_same_layout(records: list[BNInfo], group: Any) -> None:
    """Every rank must recalibrate the same layers with the same channels: checked with one all_gather first.

    Otherwise the pooled tensors of the ranks would not line up (a gloo abort, or statistics of one layer
    written into another); every rank raises the same error instead.
    """
    layout = ";".join(f"{r.name}:{r.num_features}" for r in records)
    distributed.require_agreement(
        [len(records), sum(int(r.num_features or 0) for r in records), zlib.crc32(layout.encode())],
        group,
        what="recalibrate needs the same BN layers on every rank (statistics left unchanged on every rank)",
        describe=lambda row: f"{int(row[0])} layers / {int(row[1])} channels",
        hint="build the same model on every rank (and pass the same modules=) before recalibrating",
    )


def _gather_moments(local: list[Moments], used: int, group: Any) -> tuple[list[Moments], int]:
    """Pool every layer's moments across ranks with one all_gather; also sum the samples used."""
    parts = [torch.tensor([float(used)], dtype=torch.float64)]
    for m in local:
        parts += [torch.tensor([m.count], dtype=torch.float64), m.mean.cpu(), m.m2.cpu()]
    gathered = distributed.all_gather_stack(torch.cat(parts), group)  # (world, D)
    out = []
    offset = 1
    for m in local:
        channels = m.mean.numel()
        counts = gathered[:, offset]
        means = gathered[:, offset + 1 : offset + 1 + channels]
        m2 = gathered[:, offset + 1 + channels : offset + 1 + 2 * channels]
        offset += 1 + 2 * channels
        pooled = pool(counts, means, m2 / counts.clamp(min=1).unsqueeze(-1))
        out.append(Moments(pooled.count, pooled.mean.to(m.mean.device), pooled.m2.to(m.mean.device)))
    return out, int(gathered[:, 0].sum().item())


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' values as one float64 vector on the host (one concatenation when they share a device)."""
    if len({t.device for t in tensors}) == 1:
        return torch.cat(tensors).double().cpu()
    return torch.cat([t.double().cpu() for t in tensors])


def _relative_changes(new: torch.Tensor, old: torch.Tensor, sizes: list[int]) -> list[float]:
    """``|new - old| / |old|`` (Euclidean norms) per consecutive part of ``sizes`` values, for all parts at once."""
    if not sizes:
        return []
    part = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    diff = torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, part, (new - old) ** 2).sqrt()
    scale = torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, part, old**2).sqrt()
    return torch.where(scale > 0, diff / scale.clamp(min=1e-300), diff).tolist()


class _Progress:
    """A ``tqdm.auto`` bar (terminal, notebook or log file), on rank zero, with the loader's real total.

    Counts samples against ``num_samples`` when one is given, else batches against ``len(data)`` when the
    loader has a length, else batches with no total. A user callable ``progress(done, limit)`` is called
    with the samples done instead.
    """

    def __init__(self, progress: bool | Callable[[int, int | None], None], data: Any, num_samples: int | None):
        self.callback = progress if callable(progress) else None
        self.bar: Any = None
        if self.callback is not None or not progress or distributed.rank() != 0:
            return
        from tqdm.auto import tqdm

        total = num_samples if num_samples is not None else (len(data) if hasattr(data, "__len__") else None)
        self.per_sample = num_samples is not None
        self.bar = tqdm(total=total, unit="sample" if self.per_sample else "batch", desc="recalibrating")

    def update(self, samples: int, used: int, limit: int | None) -> None:
        if self.callback is not None:
            self.callback(used, limit)
        elif self.bar is not None:
            self.bar.update(samples if self.per_sample else 1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- public


def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    num_samples: int | None = None,
    forward: Forward | None = None,
    device: torch.device | str | None = None,
    modules: ModuleSelection = None,
    progress: bool | Callable[[int, int | None], None] = True,
    process_group: Any = None,
    exact: bool = False,
    domain: str | None = None,
    nonfinite: Literal["raise", "skip"] = "raise",
) -> RecalibrationReport:
    """Replace BN running statistics by the exact statistics of ``data`` under the current weights.

    Works on the model in place (it only changes running statistics). By
    default every BN layer with running statistics is recalibrated except
    frozen ones. Layers the forward never reaches keep their statistics and
    are listed in the report. Distributed: call it on every rank.

    Args:
        model: the model; its modes, momentum, hooks and buffers are restored whatever happens.
        data: any iterable of batches: tensors, tuples/lists (input first), dicts (passed as keyword
            arguments), or anything ``forward(model, batch)`` understands; nested tensors are moved to
            ``device``.
        num_samples: a budget per process, in whole batches (None: all of ``data``); when the data run out
            first a :class:`~bndoctor.errors.BNDoctorWarning` says how many samples were used.
        forward: ``forward(model, batch)``; the default feeds the batch as above.
        device: where batches are moved (default: the model's device).
        modules: the layers to recalibrate (frozen ones included when named); default: all but frozen.
        progress: a ``tqdm`` bar on rank zero (terminal, notebook or log file) counting samples against
            ``num_samples``, or batches against ``len(data)``; ``False`` for none; a callable
            ``progress(samples_done, num_samples)`` to report elsewhere.
        process_group: the ranks to pool over (default: the global group when torch.distributed is
            initialised).
        exact: compute every layer's batch moments in float64 from its input instead of reading them from
            torch's BN kernel (slower; automatic where the kernel's cannot be used).
        domain: also store the new statistics as a named set (see :func:`bndoctor.use_stats`).
        nonfinite: a batch whose statistics hold NaN or Inf in any layer is an error with ``"raise"``
            (nothing is written; the error names the first such batch and layer, on every rank);
            ``"skip"`` pools the finite batches only, with a warning.

    Returns:
        A :class:`RecalibrationReport`: per layer how far its statistics moved, and the samples used.

    Raises:
        BNDoctorError: bad arguments, no batches, non-finite statistics (``nonfinite="raise"``), a failure
            on another rank, or ranks whose layers differ.
    """
    _check_arguments(model, data, num_samples, nonfinite)
    start = time.perf_counter()
    targets, skipped = _targets(model, modules)
    device = torch.device(device) if device is not None else model_device(model)
    dist_on = distributed.active(process_group)
    if dist_on:
        _require_same_layout(targets, process_group)
    recorder = _Pass(targets, exact)
    error: BaseException | None = None
    with preserved(model, [r.module for r in targets]) as snapshot, torch.no_grad():
        try:
            recorder.patch(snapshot, model)
            used, batches = _feed(model, data, recorder, forward or default_forward, device, num_samples, progress)
            bad = _nonfinite_batches(recorder, nonfinite, batches)
            local = recorder.moments(frozenset(bad))
        except BaseException as exc:  # re-raised below, after the ranks agreed
            error = exc
    if dist_on:
        _agree_across_ranks(error, process_group)
    if error is not None:
        raise error
    if bad:
        first, layer = next(iter(bad.items()))
        warnings.warn(
            f"recalibrate skipped {len(bad)} batch(es) with NaN or Inf statistics (first: batch {first} at '{layer}')",
            BNDoctorWarning,
            stacklevel=2,
        )
    pooled, global_samples = _gather_moments(local, used, process_group) if dist_on else (local, used)
    _require_samples(global_samples, used, num_samples, dist_on)
    changes = _write(recorder, pooled)
    if domain is not None:
        from .domains import store_stats

        store_stats(model, domain, modules=[r.name for r in targets])
    world = distributed.world_size(process_group) if dist_on else 1
    return RecalibrationReport(
        changes, used, global_samples, batches, world, time.perf_counter() - start, domain, skipped
    )


def _check_arguments(model: Any, data: Any, num_samples: int | None, nonfinite: str) -> None:
    require_module(model)
    if nonfinite not in ("raise", "skip"):
        raise BNDoctorError(f"expected nonfinite='raise' or 'skip' (got {nonfinite!r})", hint="the default refuses")
    positive_int(num_samples, "num_samples", none_ok=True, hint="e.g. num_samples=2048, or None to use all the data")
    if isinstance(data, (torch.Tensor, Mapping)) or not isinstance(data, Iterable):
        raise BNDoctorError(
            f"expected `data` to be an iterable of batches (got {type(data).__name__})",
            hint="pass a DataLoader or a list of batches, e.g. [x[i:i + 64] for i in range(0, len(x), 64)]",
        )


def _targets(model: nn.Module, modules: ModuleSelection) -> tuple[list[BNInfo], list[str]]:
    """The layers to recalibrate, and those left out by default (frozen, no running statistics) with why."""
    records = select(find_bn(model), modules)
    skipped: list[str] = []
    if modules is None:
        skipped = [f"{r.name} (frozen)" for r in records if r.frozen]
        skipped += [
            f"{r.name} (track_running_stats=False)"
            for r in records
            if not r.frozen and not r.track_running_stats and not r.lazy
        ]
        records = [r for r in records if not r.frozen and r.track_running_stats]
    warn_unsupported(records, "recalibrate")
    targets = [r for r in records if not r.opaque]
    for record in targets:
        require_running_stats(record, "recalibrate")
    return targets, skipped


def _feed(
    model: nn.Module,
    data: Iterable[Any],
    recorder: _Pass,
    forward: Forward,
    device: torch.device,
    num_samples: int | None,
    progress: bool | Callable[[int, int | None], None],
) -> tuple[int, int]:
    """Run the pass over ``data`` until the budget is spent: returns the samples and batches fed."""
    show = _Progress(progress, data, num_samples)
    used = batches = 0
    try:
        for batch in data:
            batch = to_device(batch, device)
            forward(model, batch)
            recorder.end_batch()
            size = batch_size(batch)
            used += size
            batches += 1
            show.update(size, used, num_samples)
            if num_samples is not None and used >= num_samples:
                break
    finally:
        show.close()
    return used, batches


def _nonfinite_batches(recorder: _Pass, nonfinite: str, batches: int) -> dict[int, str]:
    """The batches with NaN or Inf statistics (batch -> first layer); with ``"raise"`` any is an error."""
    bad = recorder.nonfinite_batches()
    if bad and nonfinite == "raise":
        first, layer = next(iter(bad.items()))
        raise NonFiniteStatisticsError(
            f"batch {first} gives NaN or Inf statistics at '{layer}' ({len(bad)} of {batches} batches "
            "non-finite); running statistics left unchanged",
            hint="check the data and the model's weights; or pass nonfinite='skip' to pool the finite batches only",
        )
    return bad


def _agree_across_ranks(error: BaseException | None, group: Any) -> None:
    """Every rank learns whether the pass failed anywhere: a rank that succeeded raises when another failed."""
    flags = distributed.all_ok(error is None, group)
    if error is None and not all(flags):
        failed = [i for i, ok in enumerate(flags) if not ok]
        raise BNDoctorError(
            f"recalibration failed on rank(s) {failed}; statistics left unchanged on every rank",
            hint="see the error raised on those ranks",
        )


def _require_samples(global_samples: int, used: int, num_samples: int | None, dist_on: bool) -> None:
    if global_samples == 0:
        raise BNDoctorError(
            "recalibrate got no batches from `data`" + (" on any rank" if dist_on else ""),
            hint="pass a non-empty DataLoader or list of batches",
        )
    if num_samples is not None and used < num_samples:
        warnings.warn(
            f"recalibrate: the data ran out after {used} samples (num_samples={num_samples}); "
            f"statistics use those {used}",
            BNDoctorWarning,
            stacklevel=3,
        )


@torch.no_grad()
def _write(recorder: _Pass, pooled: list[Moments]) -> list[LayerChange]:
    """Write the pooled statistics into the layers the pass reached; report how far each moved."""
    modules = [layer.module for layer in recorder.layers]
    buffers = [m.running_mean for m in modules] + [m.running_var for m in modules]
    old = _flat(buffers) if buffers else None
    for module, moments in zip(modules, pooled):
        if moments.count > 0:
            module.running_mean.copy_(moments.mean.to(module.running_mean.dtype))
            module.running_var.copy_(moments.var_unbiased.to(module.running_var.dtype))
    both = _relative_changes(_flat(buffers), old, [t.numel() for t in buffers]) if buffers else []
    mean_changes, var_changes = both[: len(modules)], both[len(modules) :]
    return [
        LayerChange(layer.record.name, m.count > 0, int(m.count), layer.calls, dm, dv)
        for layer, m, dm, dv in zip(recorder.layers, pooled, mean_changes, var_changes)
    ]

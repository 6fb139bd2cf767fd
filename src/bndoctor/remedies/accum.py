"""Accumulation-aware BatchNorm: conversion, window control, and its fixer and prescription.

    model = bndoctor.to_accum_bn(model)              # BN -> AccumBatchNorm
    handle = bndoctor.accumulate_bn(model, optimizer)
    for i, (x, y) in enumerate(loader):              # an unchanged accumulation loop
        loss_fn(model(x), y).div(accum).backward()
        if (i + 1) % accum == 0:
            optimizer.step()                         # closes the window: one running-stats update
            optimizer.zero_grad()

``accumulate_bn`` registers an optimizer step post-hook, so any loop that
calls ``optimizer.step()`` once per accumulation window works as it is —
plain loops, DDP with ``no_sync``, and frameworks that step the optimizer
after ``accumulate_grad_batches`` micro-batches. For custom loops,
``with bndoctor.accumulation_window(model): ...`` opens and closes a window
explicitly.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from .._batches import Forward, batch_size, concat_batches, default_forward
from .._walk import ModuleSelection
from ..errors import BNDoctorError, BNDoctorWarning, caller_stacklevel, require_module
from ..findings import Action
from ..layers import AccumBatchNorm, AccumMode, pools_ranks
from ..layers.accum import close_windows_together, require_mode, require_passes
from ..training import TrainingSetup, torch_optimizer
from ._registry import FixStep, Prescription, Remedy, register_remedy
from ._replay import WindowReplay, exact_layers, require_exact_passes
from ._swap import revert_layers, swap_layers

__all__ = [
    "AccumulationHandle",
    "accumulate_bn",
    "accumulation_window",
    "close_windows",
    "collect_window",
    "correct_window",
    "from_accum_bn",
    "to_accum_bn",
]


def to_accum_bn(
    model: nn.Module,
    *,
    mode: AccumMode = "renorm",
    sync: bool | None = None,
    process_group: Any = None,
    warm_start: bool | None = None,
    passes: int | None = None,
    modules: ModuleSelection = None,
    inplace: bool = False,
) -> nn.Module:
    """Replace trainable BN layers by :class:`bndoctor.AccumBatchNorm` (state and class remembered).

    Each layer then normalises every micro-batch with the statistics of its
    accumulation window so far and commits them to its running statistics once
    per optimizer step; attach the window control with :func:`accumulate_bn`
    (bndoctor's Lightning and Hugging Face callbacks do it for you).

    Args:
        model: the model.
        mode: the gradient through the window statistics: ``"renorm"`` (default; Batch Renormalization's,
            Ioffe 2017: the micro-batch is normalised with its own statistics and corrected to the window's
            with constants r and d), ``"progressive"`` (the exact gradient of normalising with the window so
            far), or ``"blend"`` (progressive, and while the window fills, the previous window's statistics
            stand in for the samples still missing), or ``"exact"``: batch-N BatchNorm's gradient, reached by
            replaying the window ``passes`` times when it closes (docs/accumulation.md, "Exact mode"). With
            :func:`collect_window` before each window's gradient pass the forward statistics are the whole
            window's too, and the window's parameter gradient and running statistics are those of one batch
            of micro-batch x accumulation steps (x world size with ``sync``), to rounding; without it, each
            micro-batch is normalised with the window so far.
        sync: pool each window across the ranks of ``process_group`` too, so the normalisation batch is
            micro-batch x accumulation steps x world size; ``None`` (default) syncs exactly the layers that
            are SyncBatchNorm now (bndoctor's or torch's), keeping their process group unless one is given.
        process_group: the ranks to pool over (default: all).
        warm_start: commit the first windows as a mean weighing the latest most, so that a short run's running
            statistics do not keep their initial values (one EMA step per window is K times fewer steps than
            plain BN takes). ``None`` (default): for layers whose running statistics are still the initial
            values (mean 0, variance 1, nothing counted) when their first window commits; statistics that
            were trained or loaded (fine-tuning) take plain EMA steps. ``True``/``False``: always/never.
        passes: ``mode="exact"`` only: the correction passes at each window's close, the cost knob (each is
            about one more forward and backward of the window). ``None`` (default): as many as the gradient
            needs to be exact (the longest chain of BN layers); 1 or 2 come close at a fraction of that.
        modules: the layers to convert; default: all.
        inplace: change ``model`` itself; by default a copy is changed.

    Returns:
        The model's root (a new object unless ``inplace=True``).
    """
    require_mode(mode)
    require_passes(passes)
    if passes is not None and mode != "exact":
        raise BNDoctorError(
            f"passes={passes} needs mode='exact' (got mode={mode!r})",
            hint="to_accum_bn(model, mode='exact', passes=...) or drop passes",
        )
    if sync is not None and not isinstance(sync, bool):
        raise BNDoctorError(f"expected sync True, False or None (got {sync!r})", hint="None follows the model")

    def make(record: Any) -> AccumBatchNorm:
        synced = pools_ranks(record.module) if sync is None else sync
        group = process_group if process_group is not None else getattr(record.module, "process_group", None)
        # built where the layer lives, so the open window starts on its device (float64 for a float64 layer)
        source = next(
            (t for t in (getattr(record.module, "running_mean", None), record.module.weight) if t is not None), None
        )
        return AccumBatchNorm(
            int(record.num_features or 0),
            mode=mode,
            sync=synced,
            process_group=group if synced else None,
            device=None if source is None else source.device,
            dtype=None if source is None else source.dtype,
            warm_start=warm_start,
            passes=passes,
        )

    return swap_layers(model, make, modules=modules, inplace=inplace, operation="to_accum_bn")


def from_accum_bn(model: nn.Module, *, dims: int | None = None, inplace: bool = False) -> nn.Module:
    """Turn AccumBatchNorm layers back into the BatchNorm class they came from (for export).

    Args:
        model: the model.
        dims: 1, 2 or 3: the BatchNorm class for layers built directly (not by :func:`to_accum_bn`).
        inplace: change ``model`` itself; by default a copy is changed.

    Returns:
        The model's root (a new object unless ``inplace=True``).

    Raises:
        BNDoctorError: a layer's window is open: its last micro-batches have not been committed to the
            running statistics yet (call ``optimizer.step()`` or :func:`close_windows` first).
    """
    return revert_layers(model, (AccumBatchNorm,), dims=dims, inplace=inplace)


def _layers(model: nn.Module) -> list[AccumBatchNorm]:
    require_module(model)
    layers = [m for m in model.modules() if isinstance(m, AccumBatchNorm)]
    if not layers:
        raise BNDoctorError(
            f"{type(model).__name__} has no AccumBatchNorm layer",
            hint="convert it first: model = bndoctor.to_accum_bn(model)",
        )
    return layers


def close_windows(model: nn.Module) -> int:
    """Commit every open window of ``model`` (one running-statistics update each); returns how many."""
    layers = _layers(model)
    closed = sum(layer.window_open for layer in layers)
    close_windows_together(layers)
    return closed


class AccumulationHandle:
    """Returned by :func:`accumulate_bn`; ``remove()`` detaches the window control.

    Built by ``accumulate_bn`` from the model, its accumulation-aware
    ``layers`` and the optimizer ``hooks``; ``steps`` counts the windows
    closed. ``replay`` is the exact mode's :class:`~bndoctor.remedies._replay.WindowReplay`
    (None without exact-mode layers).
    """

    def __init__(self, model: nn.Module, layers: list[AccumBatchNorm], hooks: list[Any]) -> None:
        self._model = model
        self._layers = layers
        self._hooks = hooks
        self.replay: WindowReplay | None = None
        self.steps = 0

    def correct(self) -> int:
        """Exact mode: replay the open window and correct the gradient now; returns the passes run.

        ``optimizer.step()`` does it anyway; call it earlier when something between the last backward and
        the step reads the gradient (clipping, a GradScaler's unscaling). Once per window.
        """
        if self.replay is None:
            return 0
        return self.replay.correct(list(self._model.parameters()))

    def remove(self) -> None:
        if not self._hooks:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.replay is not None:
            _REPLAYS.pop(self.replay.layers[0], None)
            self.replay.remove()
            self.replay = None
        for layer in self._layers:
            layer.release_control()


#: exact-mode layer (the first of a model's) -> the replay that corrects its windows, for correct_window
_REPLAYS: weakref.WeakKeyDictionary[nn.Module, WindowReplay] = weakref.WeakKeyDictionary()


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel: replays call it, not the wrapper (whose forward syncs)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def accumulate_bn(model: nn.Module, optimizer: torch.optim.Optimizer) -> AccumulationHandle:
    """Close the accumulation window of every AccumBatchNorm of ``model`` after each ``optimizer.step()``.

    Framework wrappers (Accelerate's ``AcceleratedOptimizer``, Lightning's) are
    unwrapped: the hook sits on the torch optimizer inside, whose ``step()``
    runs once per real update.

    With exact-mode layers (``to_accum_bn(model, mode="exact")``) it also
    records each micro-batch's call into the model and, when the optimizer
    steps, replays the window and corrects the gradient before the step runs
    (:meth:`AccumulationHandle.correct` or :func:`correct_window` do it
    earlier, for loops that clip or unscale gradients before stepping). A
    step given a closure runs the window's last micro-batch inside ``step``
    (Lightning's), so the hook leaves it alone: bndoctor's Lightning callback
    corrects in ``on_before_optimizer_step``, after the closure and before
    gradient clipping.

    Args:
        model: the model holding AccumBatchNorm layers.
        optimizer: the optimizer whose steps end the windows.

    Returns:
        An :class:`AccumulationHandle`; ``handle.remove()`` detaches the hooks again.
    """
    layers = _layers(model)
    optimizer = torch_optimizer(optimizer)
    handle = AccumulationHandle(model, layers, [])
    exact = exact_layers(model)
    if exact:
        handle.replay = WindowReplay(_unwrap(model), exact, require_exact_passes(exact))
        _REPLAYS[exact[0]] = handle.replay

    def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if kwargs.get("closure") is None and not (args and callable(args[0])):
            handle.correct()

    def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        handle.steps += 1
        close_windows_together(layers)
        replay = handle.replay
        if replay is not None:
            if replay.calls and not replay.corrected and not replay.warned:
                replay.warned = True
                warnings.warn(
                    "the exact accumulation mode did not correct this window: the optimizer stepped with a closure, "
                    "which runs the last micro-batch inside step(); call bndoctor.correct_window(model) after the "
                    "last backward (in Lightning, bndoctor's BNMonitorCallback does it)",
                    BNDoctorWarning,
                    stacklevel=caller_stacklevel(),
                )
            replay.clear()

    if exact:
        handle._hooks.append(optimizer.register_step_pre_hook(before_step))
    handle._hooks.append(optimizer.register_step_post_hook(after_step))
    for layer in layers:
        layer.acquire_control()
    return handle


def correct_window(model: nn.Module) -> int:
    """Exact mode: replay the open window and correct the gradient now; returns the passes run (0: nothing to do).

    For loops that read the gradient between the last backward and ``optimizer.step()``::

        loss.backward()                                  # the window's last micro-batch
        bndoctor.correct_window(model)                   # before clipping
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()                                 # does not correct twice

    Args:
        model: the model holding exact-mode AccumBatchNorm layers, with window control attached.

    Returns:
        The correction passes run (0 when the window was corrected already or recorded nothing).

    Raises:
        BNDoctorError: ``model`` has no exact-mode AccumBatchNorm layer, or no window control
            (:func:`accumulate_bn` or :func:`accumulation_window`) records its calls.
    """
    layers = _layers(model)
    exact = [layer for layer in layers if layer.mode == "exact"]
    if not exact:
        raise BNDoctorError(
            f"{type(model).__name__} has no exact-mode AccumBatchNorm layer",
            hint="convert it with bndoctor.to_accum_bn(model, mode='exact')",
        )
    replay = _REPLAYS.get(exact[0])
    if replay is None:
        raise BNDoctorError(
            "nothing records this model's micro-batches for the exact mode's replays",
            hint="attach the window control first: bndoctor.accumulate_bn(model, optimizer)",
        )
    return replay.correct(list(_unwrap(model).parameters()))


@contextmanager
def accumulation_window(model: nn.Module) -> Iterator[nn.Module]:
    """One accumulation window: micro-batches inside share statistics; leaving commits them.

    On an exception the window is discarded (nothing is committed). Windows do
    not nest.

    Args:
        model: the model holding AccumBatchNorm layers.

    Returns:
        A context manager that yields ``model``.

    Raises:
        BNDoctorError: on leaving, when a window's statistics hold NaN or Inf (the window is discarded; the
            error names the first such layer).
    """
    layers = _layers(model)
    for layer in layers:
        if layer.window_open:
            raise BNDoctorError(
                "an accumulation window is already open (forward passes since the last optimizer step)",
                hint="call optimizer.step() first, or bndoctor.close_windows(model)",
            )
    acquired: list[AccumBatchNorm] = []
    ok = False
    exact = exact_layers(model)
    replay = _REPLAYS.get(exact[0]) if exact else None
    own = replay is None and bool(exact)
    try:
        for layer in layers:
            layer.acquire_control(block=True)  # raises if a block is open already
            acquired.append(layer)
        if own:  # exact mode without accumulate_bn: this block records the calls and corrects at its end
            replay = _REPLAYS[exact[0]] = WindowReplay(_unwrap(model), exact, require_exact_passes(exact))
        yield model
        if replay is not None:
            replay.correct(list(_unwrap(model).parameters()))
        ok = True
        bad = next((layer for layer in layers if not layer.window_finite()), None)
        if bad is not None:
            ok = False
            name = next((n for n, m in model.named_modules() if m is bad), type(bad).__name__)
            raise BNDoctorError(
                f"the accumulation window's statistics hold NaN or Inf at '{name}'; the window was discarded and "
                "the running statistics are unchanged",
                hint="check the micro-batches and the weights (a learning rate too high, a bad sample)",
            )
    finally:
        if own and replay is not None:
            _REPLAYS.pop(exact[0], None)
            replay.remove()
        for layer in acquired:
            layer.release_control(block=True)
            if not ok:
                layer.reset_window()
        if ok:
            close_windows_together(acquired)


def collect_window(model: nn.Module, batches: Iterable[Any], *, forward: Forward | None = None) -> int:
    """First of two passes: gather the whole window's statistics before its gradient pass.

    Runs ``model`` without gradients over the window's micro-batches (each
    layer normalising with the window so far, as in the single pass). Until
    the window closes, every AccumBatchNorm then normalises each micro-batch
    with the statistics of the *whole* window, so early micro-batches see the
    same statistics as late ones::

        bndoctor.collect_window(model, [x for x, _ in window])
        for x, y in window:
            loss_fn(model(x), y).div(len(window)).backward()
        optimizer.step()                      # closes the window

    Costs one extra forward per micro-batch. Layers deeper in the network see
    inputs normalised progressively during this pass and with the full-window
    statistics in the gradient pass, so their collected statistics are a
    close approximation.

    With exact-mode layers (``to_accum_bn(model, mode="exact")``) the
    micro-batches are joined into one batch (tensors along dimension 0) and
    run at once, so every layer's statistics are exactly the whole window's:
    each layer's depend on the layers before it having normalised with the
    whole window's statistics too, which one forward of the joined batch
    gives (a no-grad forward of micro-batch x accumulation steps samples; with
    ``sync`` the layers pool it over the ranks). A model that draws random
    numbers between BN layers (dropout) draws other numbers here than in the
    gradient pass, so its statistics are then not exactly those the gradient
    pass normalises.

    Args:
        model: the model holding AccumBatchNorm layers with window control attached.
        batches: the window's micro-batches.
        forward: ``forward(model, batch)``: how a batch is fed (default: a tensor, or the first element of a
            tuple/list, or a dict as keyword arguments).

    Returns:
        The number of samples collected on this rank.
    """
    layers = _layers(model)
    for layer in layers:
        if layer.window_open or layer.holds_collected:
            raise BNDoctorError(
                "collect_window needs a fresh window, but forward passes have run since the last optimizer step",
                hint="call collect_window first in each window, before its gradient pass",
            )
        if not layer.training:
            raise BNDoctorError(
                "collect_window needs the model in training mode (the AccumBatchNorm layers are in eval mode)",
                hint="call model.train() first",
            )
    feed = forward or default_forward
    samples = 0
    if any(layer.mode == "exact" for layer in layers):  # the whole window's statistics, exactly: one batch
        batches = list(batches)
        batches = [concat_batches(batches)] if batches else []
    for layer in layers:
        layer.acquire_control()
    try:
        with torch.no_grad():
            for batch in batches:
                feed(model, batch)
                samples += batch_size(batch)
    except BaseException:
        for layer in layers:
            layer.reset_window()
        raise
    finally:
        for layer in layers:
            layer.release_control()
    for layer in layers:
        layer.hold_collected()
    return samples


def _fix(step: FixStep) -> nn.Module:
    before = step.classes()
    sync = bool(any(dict(a.options).get("sync") for a in step.actions))
    if sync:  # pool across ranks: sync first, then accumulate (a later to_sync_bn finds nothing left to do)
        from .sync import to_sync_bn

        step.model = to_sync_bn(step.model, modules=step.selection, inplace=True)
        step.note("to_sync_bn")
    mode = step.option("mode", "renorm")
    passes = step.option("passes", None) if mode == "exact" else None
    step.model = to_accum_bn(step.model, mode=mode, passes=passes, modules=step.selection, inplace=True)
    step.note("to_accum_bn", before=before, suffix=" (pooled across ranks)" if sync else "")
    step.changes.append("  then call bndoctor.accumulate_bn(model, optimizer) once the optimizer exists")
    return step.model


def _prescribe(setup: TrainingSetup) -> Prescription | None:
    if setup.accum_steps == 1 or setup.finetune:
        return None
    span = "micro-batch x accumulation" + (" x world size" if setup.world_size > 1 else "")
    ranks = setup.world_size > 1
    convert = f"model = bndoctor.to_accum_bn({'bndoctor.to_sync_bn(model)' if ranks else 'model'})"
    if setup.trainer == "lightning":  # the layer-sync plugin, not to_sync_bn, pools the windows across ranks
        how = "model = bndoctor.to_accum_bn(model) before Trainer.fit; BNMonitorCallback attaches the window control"
        how += " and Trainer(plugins=[BNDoctorSync()]) pools the windows across ranks" if ranks else ""
    elif setup.trainer == "huggingface":
        how = f"{convert} before Trainer(...); BNMonitorTrainerCallback attaches the window control"
    else:
        how = f"{convert}; bndoctor.accumulate_bn(model, optimizer)"

    return Prescription(
        f"accumulation-aware BN normalises over the window ({span}): {how}",
        Action("to_accum_bn", options=(("sync", ranks),)),
    )


register_remedy(
    Remedy(
        "to_accum_bn",
        fix=_fix,
        order=55,
        layer=AccumBatchNorm,
        revert=from_accum_bn,
        prescribe=_prescribe,
        attach=accumulate_bn,
    )
)

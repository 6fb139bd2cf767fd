"""BN monitoring for a training script that does not import bndoctor: what ``bndoctor watch`` runs inside it.

``bndoctor watch -- python train.py`` starts the script with this package's
``_boot`` folder first on ``PYTHONPATH`` and its settings in the
``BNDOCTOR_WATCH`` environment variable. The ``sitecustomize`` there waits
for ``import torch`` (it imports nothing before) and then calls
:func:`start`, which registers PyTorch's global hooks:

* ``torch.nn.modules.module.register_module_forward_pre_hook`` (and a forward
  hook): the first outermost training-mode call of a module that holds BN
  layers with running statistics (through DDP or DataParallel: the module
  inside) gets a :class:`bndoctor.BNMonitor`; every later call costs one
  counter update.
* ``torch.optim.optimizer.register_optimizer_step_post_hook``: optimizer steps
  label the records, and a script that accumulates gradients (two or more
  training forwards per step, or several ranks) gets a
  :class:`bndoctor.GradientNoiseScale` on that optimizer from its third step.

Every process monitors (under ``torchrun`` every rank, so that the cross-rank
check can run); rank zero writes the run file and logs the alerts. The
process's exit closes everything. Models called only in eval mode, and
scripts run with ``python -I`` or ``-E`` (which ignore ``PYTHONPATH``), are
not monitored.
"""

from __future__ import annotations

import atexit
import json
import os
import weakref
from typing import Any

import torch
import torch.nn as nn

from .. import distributed
from .._walk import with_running_stats
from ..monitor import JsonlSink
from ._epoch import MonitorCallbackCore

__all__ = ["ENV", "Watcher", "start"]

ENV = "BNDOCTOR_WATCH"


class _SharedSink(JsonlSink):
    """One run file for every model of the process; closed once, when the process ends."""

    def close(self) -> None:  # the monitors close their sinks; the watcher closes this one
        pass

    def really_close(self) -> None:
        super().close()


class Watcher:
    """The global hooks of one process and the monitors they built; see the module docstring.

    ``options``: ``out`` (the run file), ``every``, ``warmup``,
    ``divergence_every``, ``noise`` (track the gradient noise scale where
    the script accumulates; default true).
    """

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = dict(options)
        self.out = self.options.pop("out", None)
        self.noise = bool(self.options.pop("noise", True))
        self.depth = 0
        self.steps = 0
        self.micro_batch: int | None = None
        self.cores: list[tuple[Any, MonitorCallbackCore]] = []  # (weakref to the model, its monitor's core)
        self._seen: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._forwards_at_step: dict[int, list[int]] = {}  # id(core) -> training forwards at each step
        self._sink: _SharedSink | None = None
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ install

    def install(self) -> Watcher:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handles = [
            register_module_forward_pre_hook(self._enter),
            register_module_forward_hook(self._leave, always_call=True),
            register_optimizer_step_post_hook(self._after_step),
        ]
        atexit.register(self.close)
        return self

    def close(self) -> None:
        """Remove the global hooks, close every monitor and the run file (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for _, core in self.cores:
            core._stop()
        if self._sink is not None:
            self._sink.really_close()
            self._sink = None

    # ------------------------------------------------------------------ hooks

    def _enter(self, module: nn.Module, args: Any) -> None:
        self.depth += 1
        if self.depth != 1 or not module.training:
            return
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
            self.micro_batch = int(args[0].shape[0])
        if module not in self._seen:
            self._seen.add(module)
            self._adopt(module, args)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.depth = max(self.depth - 1, 0)

    def _adopt(self, module: nn.Module, args: Any) -> None:
        """A model's first outermost training call: monitor it if it holds BN layers with running statistics."""
        inner = module
        while isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = inner.module
        if inner is not module:
            self._seen.add(inner)
        if not with_running_stats(inner) or any(model() is inner for model, _ in self.cores):
            return
        if self._sink is None and self.out and distributed.rank() == 0:
            self._sink = _SharedSink(self.out)
        core = MonitorCallbackCore(sink=self._sink, attach=False, log_metrics=False, **self.options)
        core._start(inner, ".", None)
        self.cores.append((weakref.ref(inner), core))
        if inner is module and core.monitor is not None:
            # torch collected this call's pre-hooks before the monitor existed; its forward hook will run
            core.monitor._enter_root(module, args)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1
        for model_ref, core in self.cores:
            monitor = core.monitor
            model = model_ref()
            if monitor is None or model is None:
                continue
            monitor.set_step(self.steps)
            history = self._forwards_at_step.setdefault(id(core), [])
            history.append(monitor.forwards)
            if self.noise and core.noise is None and len(history) >= 3 and self.micro_batch:
                self._start_noise(core, model, optimizer, history)

    def _start_noise(self, core: MonitorCallbackCore, model: nn.Module, optimizer: Any, history: list[int]) -> None:
        """Gradient noise scale where the steps hold several micro-batches (accumulation) or ranks."""
        per_step = [b - a for a, b in zip(history[-3:], history[-2:])]
        accum = per_step[-1]
        if accum < 1 or per_step[0] != accum:  # not a steady loop yet, or this optimizer is not the model's
            return
        owned = {id(p) for p in model.parameters()}
        if not any(id(p) in owned for group in optimizer.param_groups for p in group["params"]):
            return
        world = distributed.world_size()
        if accum * world < 2:
            return
        core.noise_scale = True
        core._start_noise(model, optimizer, self.micro_batch, accum, world)


def start(options: dict[str, Any] | None = None) -> Watcher | None:
    """Install the watcher in this process (called by ``bndoctor watch``'s ``sitecustomize``).

    ``options`` default to the JSON in the ``BNDOCTOR_WATCH`` environment
    variable; without either nothing is installed.
    """
    if options is None:
        raw = os.environ.get(ENV)
        if not raw:
            return None
        options = json.loads(raw)
    return Watcher(options).install()

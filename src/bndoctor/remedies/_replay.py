"""The exact accumulation mode's replays: record each micro-batch's call, replay the window, correct the gradient.

While a window is open, :class:`WindowReplay` keeps the outermost call of
each training forward into the part of the model that holds exact-mode
AccumBatchNorm layers: the module, its arguments (detached copies) and the
random number generators' states, so that dropout and augmentation inside the
model draw the same again. At the window's close (:meth:`WindowReplay.correct`)
it replays the window ``passes`` times. Each pass runs every recorded call
again and back-propagates, from no loss at all, only what each layer injects
at its input: the difference between the window-wide and the micro-batch
centring of the gradient that reached the layer's output in the previous pass
(:mod:`bndoctor.layers._exact`). A pass changes the gradient reaching the
layers above each layer, which the next pass corrects in turn; once no
gradient reaches any layer's output (after as many passes as the longest
chain of BN layers), the window's gradient is batch-N BatchNorm's. The
parameter gradients of the passes are summed, averaged over the ranks when a
process group is active (as DDP averages), and added to ``.grad``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .. import distributed
from ..errors import BNDoctorError
from ..layers import AccumBatchNorm
from ..layers._base import replay_scope

__all__ = ["WindowReplay", "exact_layers"]


def exact_layers(model: nn.Module) -> list[AccumBatchNorm]:
    return [m for m in model.modules() if isinstance(m, AccumBatchNorm) and m.mode == "exact"]


def _detached(value: Any) -> Any:
    """A copy of a call's arguments: tensors detached and cloned (a loader may reuse its buffers)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return type(value)({k: _detached(v) for k, v in value.items()})  # type: ignore[call-arg]
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_detached(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


class _Recorded:
    __slots__ = ("args", "cpu", "cuda", "kwargs", "module")

    def __init__(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.module = module
        self.args = _detached(args)
        self.kwargs = _detached(kwargs)
        self.cpu = torch.get_rng_state()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = torch.cuda.get_rng_state_all() if cuda else None

    def replay(self) -> None:
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            self.module(*self.args, **self.kwargs)


class WindowReplay:
    """Records the window's calls into ``model``'s exact-mode layers and corrects the gradient at its close.

    ``passes``: the correction passes (None: until the gradient is exact).
    """

    def __init__(self, model: nn.Module, layers: list[AccumBatchNorm], passes: int | None) -> None:
        self.layers = layers
        self.passes = passes
        self.calls: list[_Recorded] = []
        self.corrected = False
        self.passes_run = 0  # passes the last correction ran
        self.warned = False  # a window closed without its correction (a closure step), warned once
        self._depth = 0
        self._replaying = False
        self._root = model
        self._modes: list[tuple[nn.Module, bool]] = []
        ids = {id(layer) for layer in layers}
        holders = [m for m in model.modules() if any(id(d) in ids for d in m.modules())]
        self._hooks = []
        for module in holders:
            self._hooks.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
            self._hooks.append(module.register_forward_hook(self._leave, always_call=True))

    # ----------------------------------------------------------------- recording

    def _enter(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self._depth == 0 and not self._replaying and torch.is_grad_enabled() and self._recording():
            if self.calls and not any(layer.recorded_calls for layer in self.layers):
                self.clear()  # the window closed without the optimizer hook (close_windows): a new one begins
            if not self.calls:  # the modules' train/eval modes, which the replays restore
                self._modes = [(m, m.training) for m in self._root.modules()]
            self.calls.append(_Recorded(module, args, kwargs))
            self.corrected = False
        self._depth += 1

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth = max(self._depth - 1, 0)

    def _recording(self) -> bool:
        return any(layer.training and layer.controlled for layer in self.layers)

    def clear(self) -> None:
        """Forget the window's calls (the window closed or was discarded)."""
        self.calls.clear()
        self.corrected = False

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.clear()

    # ----------------------------------------------------------------- correcting

    def correct(self, params: list[nn.Parameter]) -> int:
        """Replay the window and add the correction to the ``params``' gradients; returns the passes run.

        Runs once per window (a second call before the window closes does nothing). The layers' states are
        restored if a replay raises; the gradients are then left as the gradient pass made them.
        """
        if self.corrected or not self.calls or not any(layer.recorded_calls for layer in self.layers):
            return 0
        self.corrected = True
        params = [p for p in params if p.requires_grad]
        limit = self.passes
        if limit is None:  # the longest chain of BN calls within one micro-batch bounds the passes needed
            limit = sum(layer.recorded_calls for layer in self.layers) // len(self.calls) + 1
        group = next((layer.process_group for layer in self.layers if layer.sync), None)
        synced = any(layer.sync for layer in self.layers) and distributed.active(group)
        active = [layer for layer in self.layers if layer.recorded_calls]
        grads: list[torch.Tensor | None] = [None] * len(params)
        run = 0
        self._replaying = True
        restore: list[tuple[nn.Module, bool]] = []
        try:
            for m, recorded in self._modes:  # the window ran in these modes (an eval() before step() does not count)
                if m.training != recorded:
                    restore.append((m, m.training))
                    m.training = recorded
            with replay_scope(), torch.enable_grad():  # optimizer.step() may run its hooks without gradients
                while run < limit and self._pending(active, synced, group):
                    self._pass(active, synced, group, params, grads)
                    run += 1
        finally:
            self._replaying = False
            for m, mode in restore:
                m.training = mode
        self.passes_run = run
        self._apply(params, grads)
        return run

    def _pass(
        self,
        layers: list[AccumBatchNorm],
        synced: bool,
        group: Any,
        params: list[nn.Parameter],
        grads: list[torch.Tensor | None],
    ) -> None:
        """One replay of the window: every call again, back-propagated from what the layers inject."""
        outputs: list[torch.Tensor] = []
        totals = [layer.begin_pass() for layer in layers]
        if synced:  # the window's totals over all ranks that share it, in one collective
            flat = distributed.all_reduce_sum(torch.cat([t.reshape(-1) for t in totals]), group)  # type: ignore[union-attr]
            totals = [t.view(2, -1) for t in flat.split([t.numel() for t in totals])]  # type: ignore[union-attr]
        names = {id(m): n for n, m in self._root.named_modules()}
        for layer, total in zip(layers, totals):
            layer.open_pass(total, outputs, names.get(id(layer), type(layer).__name__))  # type: ignore[arg-type]
        try:
            for call in self.calls:
                outputs.clear()
                call.replay()
                seeds = [out for out in outputs if out.requires_grad]
                if not seeds or not params:
                    continue
                found = torch.autograd.grad(seeds, params, [torch.zeros_like(s) for s in seeds], allow_unused=True)
                for i, g in enumerate(found):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i].add_(g)  # type: ignore[union-attr]
        finally:
            mismatches = [layer.close_pass() for layer in layers]  # every layer leaves the replay, then errors
        error = next((e for e in mismatches if e is not None), None)
        if error is not None:
            raise error

    def _pending(self, layers: list[AccumBatchNorm], synced: bool, group: Any) -> bool:
        """Whether any layer (on any rank sharing the window) has a correction left to inject (one host read)."""
        size = torch.stack([layer.pending_correction().double() for layer in layers]).sum()
        if synced:
            size = distributed.all_reduce_sum(size.reshape(1), group)
        return bool(size.reshape(()) > 0)

    def _apply(self, params: list[nn.Parameter], grads: list[torch.Tensor | None]) -> None:
        """Add the passes' gradients to ``.grad``, averaged over the ranks as DDP averages its gradients."""
        world = distributed.world_size() if distributed.active() else 1
        if world > 1:
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for p, g in zip(params, grads)])
            flat = distributed.all_reduce_sum(flat, None).div_(world)
            grads = list(flat.split([p.numel() for p in params]))
            grads = [g.view_as(p) for g, p in zip(grads, params)]  # type: ignore[union-attr]
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.to(p.dtype).clone()
                else:
                    p.grad.add_(g.to(p.grad.dtype))


def require_exact_passes(layers: list[AccumBatchNorm]) -> int | None:
    """The passes the exact-mode layers of one model ask for (they must agree)."""
    asked = {layer.passes for layer in layers}
    if len(asked) > 1:
        raise BNDoctorError(
            "the exact-mode AccumBatchNorm layers ask for different numbers of correction passes "
            f"({sorted(asked, key=str)})",
            hint="convert the model once: bndoctor.to_accum_bn(model, mode='exact', passes=...)",
        )
    return asked.pop()

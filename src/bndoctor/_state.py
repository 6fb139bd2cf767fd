"""Snapshot and restore what bndoctor touches while it runs a model.

``preserved(model, modules)`` records every module's training flag and, for
the given modules, ``momentum``, ``track_running_stats`` and all their
buffers; instance attributes set with :meth:`Snapshot.patch` (such as a
wrapped ``forward``) are removed again. Whatever happens inside the block — including an exception from the
user's forward or a KeyboardInterrupt — on exit the flags, momentum and
buffers are put back and every hook registered through the snapshot is
removed. Callers write their intended results *after* the block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

__all__ = ["Patches", "Snapshot", "preserved"]

_ATTRS = ("momentum", "track_running_stats")


class Patches:
    """Instance attributes set temporarily (e.g. a wrapped ``forward``); :meth:`undo` puts back what was there.

    The one way bndoctor patches a module while it runs it (recalibration, the shape trace of ``check``).
    """

    def __init__(self) -> None:
        self._saved: list[tuple[dict[str, Any], str, bool, Any]] = []

    def set(self, module: nn.Module, attr: str, value: Any) -> None:
        """Set an instance attribute of ``module``."""
        self.set_item(module.__dict__, attr, value)

    def set_item(self, mapping: dict[str, Any], key: str, value: Any) -> None:
        """Set ``mapping[key]`` (an instance dict, a module's ``_buffers``)."""
        had = key in mapping
        self._saved.append((mapping, key, had, mapping.get(key)))
        mapping[key] = value

    def undo(self) -> None:
        for mapping, key, had, value in reversed(self._saved):
            if had:
                mapping[key] = value
            else:
                mapping.pop(key, None)
        self._saved.clear()


class Snapshot:
    def __init__(self, model: nn.Module, modules: Iterable[nn.Module]) -> None:
        self.modes = [(m, m.training) for m in model.modules()]
        self.modules = list({id(m): m for m in modules}.values())
        self.attrs: list[tuple[nn.Module, str, Any]] = [
            (m, a, getattr(m, a)) for m in self.modules for a in _ATTRS if hasattr(m, a)
        ]
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (b, b.detach().clone()) for m in self.modules for b in m.buffers(recurse=False)
        ]
        self.handles: list[RemovableHandle] = []
        self.patches = Patches()

    def hook(self, handle: RemovableHandle) -> None:
        """Remove this hook when the block ends."""
        self.handles.append(handle)

    def set_mode(self, module: nn.Module, training: bool) -> None:
        """Set one module's training flag until the block ends (frozen layers too, whose ``train()`` pins it)."""
        module.__dict__["training"] = training

    def patch(self, module: nn.Module, attr: str, value: Any) -> None:
        """Set an instance attribute (e.g. ``forward``) until the block ends."""
        self.patches.set(module, attr, value)

    def hide_buffer(self, module: nn.Module, name: str) -> None:
        """Make a registered buffer ``None`` until the block ends (its tensor comes back, contents restored)."""
        self.patches.set_item(module._buffers, name, None)

    def restore(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.patches.undo()
        with torch.no_grad():
            for live, saved in self.buffers:
                live.copy_(saved)
        for module, attr, value in self.attrs:
            setattr(module, attr, value)
        for module, training in self.modes:
            module.__dict__["training"] = training  # not train(): frozen layers pin it to False


@contextmanager
def preserved(model: nn.Module, modules: Iterable[nn.Module]) -> Iterator[Snapshot]:
    snapshot = Snapshot(model, modules)
    try:
        yield snapshot
    finally:
        snapshot.restore()

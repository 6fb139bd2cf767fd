"""Frozen BatchNorm: a BN layer that normalises with its running statistics in every mode.

A frozen layer is the original layer with its class swapped for a subclass
that pins ``training`` to ``False``:

* ``model.train()`` still reaches it, but it stays in eval mode, so the forward
  computes ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``
  and never updates the running statistics. (Lightning's ``freeze`` instead
  sets ``track_running_stats=False``, which makes train mode normalise with
  *batch* statistics — the opposite of frozen.)
* Nothing else changes: parameters, buffers, ``momentum``, ``eps``,
  ``num_batches_tracked`` and the state_dict keys are the original ones, so a
  checkpoint loads into the frozen model and back, and third-party subclasses
  keep their own forward (timm's ``BatchNormAct2d`` keeps its activation).
* The class and the requires_grad flags it replaced are remembered, so
  :func:`bndoctor.unfreeze_bn` restores the layer exactly.

``FrozenBatchNorm1d/2d/3d`` cover torch's classes; for any other ``_BatchNorm``
subclass a frozen subclass is made on demand, named after it and picklable
(this module resolves the name when a pickle is loaded).
"""

from __future__ import annotations

import base64
import importlib
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "FreezeState",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormMixin",
    "frozen_class_for",
    "is_bndoctor_frozen",
]

_DYNAMIC_PREFIX = "_Frozen_"


@dataclass
class FreezeState:
    """What :func:`bndoctor.unfreeze_bn` needs to restore a frozen layer."""

    original_class: type
    requires_grad: dict[str, bool] = field(default_factory=dict)
    affine_frozen: bool = False
    requested_training: bool = True


class FrozenBatchNormMixin:
    """Pins ``training`` to ``False``; remembers the mode the model asked for."""

    training: bool
    _bndoctor_freeze: FreezeState

    def train(self, mode: bool = True) -> Any:
        result = super().train(mode)  # type: ignore[misc]  # sets children's mode too
        self._bndoctor_freeze.requested_training = bool(mode)
        self.training = False
        return result

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        state = self._bndoctor_freeze
        what = "statistics+affine" if state.affine_frozen else "statistics"
        return f"{base}, frozen={what}"


class FrozenBatchNorm1d(FrozenBatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that always uses its running statistics. Made by :func:`bndoctor.freeze_bn`."""


class FrozenBatchNorm2d(FrozenBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that always uses its running statistics. Made by :func:`bndoctor.freeze_bn`."""


class FrozenBatchNorm3d(FrozenBatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that always uses its running statistics. Made by :func:`bndoctor.freeze_bn`."""


_STATIC: dict[type, type] = {
    nn.BatchNorm1d: FrozenBatchNorm1d,
    nn.BatchNorm2d: FrozenBatchNorm2d,
    nn.BatchNorm3d: FrozenBatchNorm3d,
}


def is_bndoctor_frozen(module: nn.Module) -> bool:
    """Whether ``module`` is one of bndoctor's frozen layers (made by :func:`bndoctor.freeze_bn`)."""
    return isinstance(module, FrozenBatchNormMixin)


def _encode(cls: type) -> str:
    ref = f"{cls.__module__}:{cls.__qualname__}".encode()
    return _DYNAMIC_PREFIX + base64.b32encode(ref).decode().rstrip("=")


def _decode(name: str) -> type:
    data = name[len(_DYNAMIC_PREFIX) :]
    data += "=" * (-len(data) % 8)
    module_name, qualname = base64.b32decode(data).decode().split(":", 1)
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def frozen_class_for(cls: type) -> type:
    """The frozen counterpart of a ``_BatchNorm`` subclass (created once, cached)."""
    if issubclass(cls, FrozenBatchNormMixin):
        return cls
    if cls in _STATIC:
        return _STATIC[cls]
    if not (isinstance(cls, type) and issubclass(cls, _BatchNorm)):
        raise TypeError(f"expected a torch BatchNorm class (got {cls!r})")
    encoded = _encode(cls)
    existing = globals().get(encoded)
    if existing is not None:
        return existing
    frozen = type(
        f"Frozen{cls.__name__}",
        (FrozenBatchNormMixin, cls),
        {
            "__module__": __name__,
            "__doc__": f"{cls.__name__} that always uses its running statistics (made by bndoctor.freeze_bn).",
        },
    )
    frozen.__qualname__ = encoded  # what pickle looks up in this module
    globals()[encoded] = frozen
    return frozen


def __getattr__(name: str) -> type:
    """Recreate a frozen subclass when a pickle refers to it (PEP 562)."""
    if name.startswith(_DYNAMIC_PREFIX):
        return frozen_class_for(_decode(name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

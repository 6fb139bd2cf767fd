"""Class swaps: replace BN layers by another BatchNorm class and back, moving their state.

The shared machinery of every remedy that installs a layer of its own
(SyncBN, accumulation-aware BN, Batch Renorm, and any registered by users):
:func:`swap_layers` replaces the swappable layers (see
:mod:`bndoctor.families`) and remembers each one's class; :func:`revert_layers`
turns them back. Parameters and buffers move as objects, so requires_grad,
sharing and optimizer state carry over.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._walk import (
    BNInfo,
    ModuleSelection,
    plan,
    replace_modules,
    require_initialized,
    warn_left_alone,
    warn_unsupported,
)
from ..errors import BNDoctorError
from ..families import has_post_ops
from ..layers import BatchNormAct, window_open

__all__ = ["bn_class", "revert_layers", "swap_layers", "transfer_bn_state"]

_AFFINE = ("weight", "bias")
_DIMS_TO_CLASS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def transfer_bn_state(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give BN ``target`` the parameters, buffers, children, hyper-parameters and mode of BN ``source``.

    The Parameter objects themselves move, so requires_grad, sharing and any
    optimizer state keyed by them carry over. Children move too: a
    norm+activation layer's ``drop`` and ``act`` (bndoctor's layers apply them
    after normalising).
    """
    for name in _AFFINE:
        param = getattr(source, name, None)
        if param is None:
            target.register_parameter(name, None)
        else:
            setattr(target, name, param)
    for name, buffer in source._buffers.items():
        target._buffers[name] = buffer
    for name, child in source._modules.items():
        target._modules[name] = child
    for attr in ("momentum", "eps", "affine", "track_running_stats", "training"):
        setattr(target, attr, getattr(source, attr))
    if "qconfig" in source.__dict__:  # torch.ao.quantization's per-module setting travels with the layer
        target.qconfig = source.qconfig
    return target


def bn_class(dims: int) -> type[_BatchNorm]:
    """``nn.BatchNorm1d/2d/3d`` for ``dims`` 1, 2 or 3; anything else is a clear error."""
    if dims not in _DIMS_TO_CLASS:
        raise BNDoctorError(f"expected dims=1, 2 or 3 (got {dims!r})", hint="2 for images (N, C, H, W)")
    return _DIMS_TO_CLASS[dims]


def _own_attributes(module: nn.Module) -> dict[str, object]:
    """The instance attributes a class adds to nn.Module's (e.g. num_features, eps), to rebuild it without __init__."""
    return {k: v for k, v in module.__dict__.items() if k not in _MODULE_INTERNALS and not k.startswith("_bndoctor")}


def _rebuild(cls: type, attributes: dict[str, object]) -> nn.Module:
    """An instance of ``cls`` with nn.Module's machinery and ``attributes``, its ``__init__`` not called.

    Third-party BN classes need arguments bndoctor cannot know (timm's BatchNormAct2d: its activation);
    their own attributes were remembered at conversion time and their parameters, buffers and children
    are moved in afterwards.
    """
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.__dict__.update(attributes)
    return module


def swap_layers(
    model: nn.Module,
    make: Callable[[BNInfo], _BatchNorm],
    *,
    modules: ModuleSelection,
    inplace: bool,
    operation: str,
    require: Callable[[BNInfo], None] | None = None,
) -> nn.Module:
    """Replace the swappable BN layers by ``make(record)``, moving their state and remembering their class.

    Frozen layers are left alone (they do not use batch statistics), and so are
    layers of families that are not swappable, such as BN subclasses with
    their own forward or another remedy's layer (a warning names them and says
    why). ``operation`` names the caller in messages; ``require(record)``
    validates each layer to convert before anything changes (raise to refuse).
    """

    def validate(record: BNInfo) -> None:
        if record.swappable or record.lazy:
            require_initialized(record)
        if record.swappable and require is not None:
            require(record)

    model, records = plan(model, modules, inplace, validate)
    warn_unsupported(records, operation)
    warn_left_alone([r for r in records if r.supported and not r.frozen and not r.swappable], operation, stacklevel=4)
    replacements = {}
    for record in records:
        if not record.swappable:
            continue
        new = make(record)
        if type(new) is type(record.module):
            continue
        new._bndoctor_source_class = type(record.module)  # type: ignore[assignment]
        new._bndoctor_source_attributes = _own_attributes(record.module)  # type: ignore[assignment]
        transfer_bn_state(record.module, new)
        replacements[id(record.module)] = (record.module, new)
    return replace_modules(model, replacements)


def revert_layers(
    model: nn.Module,
    classes: tuple[type, ...],
    *,
    dims: int | None,
    inplace: bool,
    modules: ModuleSelection = None,
) -> nn.Module:
    """Replace layers of ``classes`` by the BatchNorm class they were converted from (or ``dims``).

    ``modules`` limits the reversal to those layers (default: every layer of ``classes``).

    A layer whose window is still open (see :func:`bndoctor.layers.window_open`) is an
    error: its last statistics have not been committed yet.
    """
    if dims is not None:
        bn_class(dims)  # a bad dims is an error before anything changes
    model, records = plan(model, modules, inplace, validate=_require_closed_window)
    replacements = {}
    for record in records:
        module = record.module
        if not isinstance(module, classes):
            continue
        cls = getattr(module, "_bndoctor_source_class", None)
        attributes = getattr(module, "_bndoctor_source_attributes", None)
        if (cls is None or cls is nn.SyncBatchNorm) and has_post_ops(module):
            new = BatchNormAct(int(record.num_features or 0))  # a norm+activation SyncBN: keep its drop/act
        elif cls is None or cls is nn.SyncBatchNorm:  # torch's SyncBatchNorm cannot run in one process: plain BN
            if dims is None:
                raise BNDoctorError(
                    f"'{record.name}' is a {type(module).__name__} with no remembered BatchNorm class",
                    hint="pass dims=1, 2 or 3 (e.g. dims=2 for BatchNorm2d)",
                )
            new = bn_class(dims)(int(record.num_features or 0))
        elif attributes is None:  # converted by an older bndoctor: torch's classes rebuild from num_features
            new = cls(int(record.num_features or 0))
        else:
            new = _rebuild(cls, attributes)
        transfer_bn_state(module, new)
        replacements[id(module)] = (module, new)
    return replace_modules(model, replacements)


def _require_closed_window(record: BNInfo) -> None:
    if window_open(record.module):
        raise BNDoctorError(
            f"'{record.name}' has an accumulation window open (statistics of micro-batches not yet committed)",
            hint="call optimizer.step() (with accumulate_bn attached) or leave the accumulation_window block first",
        )

"""One walk over a module tree: find BatchNorm layers, select them, replace them.

Every conversion in bndoctor goes through this module, so that the same rules
apply everywhere:

* A BatchNorm layer is any ``torch.nn.modules.batchnorm._BatchNorm`` subclass
  (BatchNorm1d/2d/3d, SyncBatchNorm, initialised LazyBatchNorm*, third-party
  subclasses such as timm's ``BatchNormAct2d``).
* A module that is *not* a ``_BatchNorm`` is recognised by behaviour:
  ``weight``, ``bias``, ``running_mean`` and ``running_var`` all buffers and no
  parameters of its own is a frozen BN (torchvision, detectron2 and timm ship
  such ``FrozenBatchNorm2d`` classes); running-statistics buffers next to
  trainable parameters is a BN-like layer whose forward bndoctor cannot
  reason about (OpenMMLab's ``MMSyncBN``), reported as unsupported.
* A module reachable at several paths (shared submodule) is one layer: it is
  reported once with its aliases and replaced by one new object at every path.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .errors import (
    BNDoctorError,
    BNDoctorWarning,
    MissingRunningStatsError,
    ModuleSelectionError,
    UninitializedLayerError,
    require_module,
)

__all__ = [
    "BNInfo",
    "BNKind",
    "ModuleSelection",
    "find_bn",
    "replace_module",
    "replace_modules",
]

BNKind = Literal["batchnorm", "sync", "frozen", "lazy", "bn-like"]

#: What ``modules=`` accepts everywhere: ``None`` (all layers), a qualified
#: name, prefix or glob pattern, several of them, or a predicate on
#: ``(qualified_name, module)``.
ModuleSelection = None | str | Iterable[str] | Callable[[str, nn.Module], bool]

_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_LAZY_DIMS = {nn.LazyBatchNorm1d: 1, nn.LazyBatchNorm2d: 2, nn.LazyBatchNorm3d: 3}


@dataclass(frozen=True)
class BNInfo:
    """One BatchNorm (or BN-like) layer found in a model.

    ``frozen`` means the layer normalises with its running statistics even in
    training mode (bndoctor's frozen layers and third-party FrozenBatchNorm).
    ``supported`` is ``False`` for layers bndoctor finds but cannot convert;
    ``reason`` says why.
    """

    name: str
    module: nn.Module = field(repr=False, compare=False)
    kind: BNKind
    cls: str
    dims: int | None
    num_features: int | None
    affine: bool
    track_running_stats: bool
    momentum: float | None
    eps: float
    training: bool
    frozen: bool
    supported: bool = True
    reason: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def uses_batch_stats(self) -> bool:
        """Whether a forward in the module's current mode normalises with batch statistics."""
        if self.frozen:
            return False
        return self.training or not self.track_running_stats

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view (everything but the module object)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "class": self.cls,
            "dims": self.dims,
            "num_features": self.num_features,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "momentum": self.momentum,
            "eps": self.eps,
            "training": self.training,
            "frozen": self.frozen,
            "supported": self.supported,
            "reason": self.reason,
            "aliases": list(self.aliases),
        }


def _class_path(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_uninitialized(module: nn.Module) -> bool:
    has_uninit = getattr(module, "has_uninitialized_params", None)
    return bool(has_uninit()) if callable(has_uninit) else False


def _bn_dims(module: nn.Module) -> int | None:
    for base, dims in {**_DIMS, **_LAZY_DIMS}.items():
        if isinstance(module, base):
            return dims
    return getattr(module, "_bndoctor_dims", None)


def _has_running_buffers(module: nn.Module) -> bool:
    buffers = module._buffers
    return buffers.get("running_mean") is not None and buffers.get("running_var") is not None


def _is_frozen_by_behaviour(module: nn.Module) -> bool:
    buffers = module._buffers
    own_params = any(p is not None for p in module._parameters.values())
    return buffers.get("weight") is not None and buffers.get("bias") is not None and not own_params


def _behaviour_record(name: str, module: nn.Module, kind: BNKind, **fields: Any) -> BNInfo:
    """A record for a layer recognised by its buffers rather than its class."""
    return BNInfo(
        name=name,
        module=module,
        kind=kind,
        cls=_class_path(module),
        dims=None,
        num_features=int(module.get_buffer("running_mean").numel()),
        track_running_stats=True,
        eps=float(getattr(module, "eps", 1e-5)),
        training=module.training,
        **fields,
    )


def _classify(name: str, module: nn.Module) -> BNInfo | None:
    """Return a record for a BN or BN-like module, ``None`` for anything else."""
    from .layers.frozen import is_bndoctor_frozen
    from .layers.sync import SyncBatchNorm

    if isinstance(module, _InstanceNorm):
        return None
    if isinstance(module, _BatchNorm):
        momentum = module.momentum
        common = dict(
            name=name,
            module=module,
            cls=_class_path(module),
            dims=_bn_dims(module),
            affine=bool(module.affine),
            track_running_stats=bool(module.track_running_stats),
            momentum=None if momentum is None else float(momentum),
            eps=float(module.eps),
            training=module.training,
        )
        if _is_uninitialized(module):
            return BNInfo(
                kind="lazy",
                num_features=None,
                frozen=False,
                supported=False,
                reason="lazy layer not initialised yet; run one forward pass first",
                **common,
            )
        kind: BNKind = "sync" if isinstance(module, (nn.SyncBatchNorm, SyncBatchNorm)) else "batchnorm"
        frozen = is_bndoctor_frozen(module)
        if frozen:
            kind = "frozen"
        return BNInfo(kind=kind, num_features=int(module.num_features), frozen=frozen, **common)
    if not _has_running_buffers(module):
        return None
    if _is_frozen_by_behaviour(module):
        return _behaviour_record(name, module, "frozen", affine=True, momentum=None, frozen=True)
    # running statistics next to trainable parameters: BN-like, not convertible
    momentum = getattr(module, "momentum", None)
    return _behaviour_record(
        name,
        module,
        "bn-like",
        affine=getattr(module, "weight", None) is not None,
        momentum=float(momentum) if isinstance(momentum, (int, float)) else None,
        frozen=False,
        supported=False,
        reason=(
            "has running statistics but does not subclass torch.nn.BatchNorm "
            "(_BatchNorm), so bndoctor cannot tell how its forward uses them; "
            "convert it to a torch BatchNorm class first"
        ),
    )


def with_running_stats(model: nn.Module, modules: ModuleSelection = None) -> list[BNInfo]:
    """Selected BN layers that hold running statistics (lazy and BN-like layers excluded)."""
    require_module(model)
    return [
        r
        for r in select(find_bn(model), modules)
        if r.kind not in ("bn-like", "lazy")
        and getattr(r.module, "running_mean", None) is not None
        and getattr(r.module, "running_var", None) is not None
    ]


def has_plain_forward(module: nn.Module) -> bool:
    """Whether a BN layer's forward is torch's own (a subclass such as BatchNormAct2d adds more)."""
    return type(module).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def find_bn(model: nn.Module) -> list[BNInfo]:
    """List every BatchNorm and BN-like layer of ``model``, in module order.

    A layer shared between several paths is listed once, under its first path,
    with the other paths in ``aliases``.

    >>> import torch.nn as nn
    >>> [r.name for r in find_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))]
    ['1']
    """
    require_module(model)
    paths: dict[int, list[str]] = {}
    order: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules(remove_duplicate=False):
        seen = paths.setdefault(id(module), [])
        if not seen:
            order.append((name, module))
        seen.append(name)
    records = []
    for name, module in order:
        record = _classify(name, module)
        if record is None:
            continue
        aliases = tuple(paths[id(module)][1:])
        if aliases:
            record = _with(record, aliases=aliases)
        records.append(record)
    return records


def _with(record: BNInfo, **changes: object) -> BNInfo:
    import dataclasses

    return dataclasses.replace(record, **changes)


# --------------------------------------------------------------------------- selection


def _matches(pattern: str, name: str) -> bool:
    if pattern in ("", "*"):
        return True
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def select(records: list[BNInfo], modules: ModuleSelection, *, argument: str = "modules") -> list[BNInfo]:
    """Keep the records that ``modules`` selects (see :data:`ModuleSelection`).

    A name or pattern that selects no BN layer is an error, so that a typo does
    not silently convert nothing.
    """
    if modules is None:
        return list(records)
    if callable(modules):
        predicate = modules
        return [r for r in records if predicate(r.name, r.module)]
    patterns = [modules] if isinstance(modules, str) else list(modules)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ModuleSelectionError(
                f"expected `{argument}` to hold qualified module names (got {type(pattern).__name__})",
                hint="pass names such as 'layer1' or 'layer3.*.bn2', or a callable (name, module) -> bool",
            )
    chosen = []
    for record in records:
        names = (record.name, *record.aliases)
        if any(_matches(p, n) for p in patterns for n in names):
            chosen.append(record)
    unmatched = [p for p in patterns if not any(_matches(p, n) for r in records for n in (r.name, *r.aliases))]
    if unmatched:
        available = ", ".join(repr(r.name) for r in records[:8]) or "none"
        more = " ..." if len(records) > 8 else ""
        raise ModuleSelectionError(
            f"`{argument}` entry {unmatched[0]!r} matches no BatchNorm layer (BN layers: {available}{more})",
            hint="use a qualified name from bndoctor.find_bn(model) or a "
            "prefix/glob such as 'layer3' or 'layer3.*.bn2'",
        )
    return chosen


# --------------------------------------------------------------------------- checks


def require_initialized(record: BNInfo) -> None:
    if record.kind == "lazy":
        raise UninitializedLayerError(
            f"'{record.name}' ({record.cls.rsplit('.', 1)[-1]}) is an uninitialised "
            "lazy layer: its number of features is unknown",
            hint="run one forward pass with a real input before converting, e.g. model(torch.zeros(1, 3, 32, 32))",
        )


def require_running_stats(record: BNInfo, operation: str) -> None:
    require_initialized(record)
    module = record.module
    has_buffers = getattr(module, "running_mean", None) is not None and getattr(module, "running_var", None) is not None
    if not record.track_running_stats or not has_buffers:
        raise MissingRunningStatsError(
            f"{operation} needs running statistics, but '{record.name}' has "
            "track_running_stats=False (it always normalises with batch statistics)",
            hint="leave this layer out with modules=..., or rebuild it with "
            "track_running_stats=True and recalibrate its statistics",
        )


def warn_unsupported(records: Iterable[BNInfo], operation: str) -> None:
    skipped = [r for r in records if r.kind == "bn-like"]
    if skipped:
        names = ", ".join(f"'{r.name}' ({r.cls})" for r in skipped)
        warnings.warn(
            f"{operation} skipped {len(skipped)} BN-like layer(s) that bndoctor cannot "
            f"convert: {names}. {skipped[0].reason}.",
            BNDoctorWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- replacement


def prepare(model: nn.Module, inplace: bool) -> nn.Module:
    """The model to work on: the caller's when ``inplace``, else a deep copy."""
    require_module(model)
    if not isinstance(inplace, bool):
        raise TypeError(f"expected `inplace` to be a bool (got {type(inplace).__name__})")
    if inplace:
        return model
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        lazy = [r.name for r in find_bn(model) if r.kind == "lazy"]
        why = f"it holds uninitialised lazy layers ({', '.join(lazy)})" if lazy else str(exc)
        raise BNDoctorError(
            f"cannot copy the model to convert it: {why}",
            hint="run one forward pass first to initialise lazy layers, or pass inplace=True",
        ) from exc


def plan(
    model: nn.Module,
    modules: ModuleSelection,
    inplace: bool,
    validate: Callable[[BNInfo], None] | None = None,
) -> tuple[nn.Module, list[BNInfo]]:
    """Select and validate BN layers on ``model``, then return the model to change and its records.

    Validation runs before anything is copied or changed, so a bad layer
    leaves the caller's model as it was even with ``inplace=True``. The
    records returned point into the copy when ``inplace`` is false.
    """
    require_module(model)
    records = select(find_bn(model), modules)
    if validate is not None:
        for record in records:
            validate(record)
    work = prepare(model, inplace)
    if work is not model:
        chosen = {r.name for r in records}
        records = [r for r in find_bn(work) if r.name in chosen]
    return work, records


def _containers(root: nn.Module) -> Iterator[nn.Module]:
    yield from root.modules()  # unique modules; containers hold their children in _modules


def replace_modules(root: nn.Module, replacements: dict[int, tuple[nn.Module, nn.Module]]) -> nn.Module:
    """Swap modules by identity everywhere they occur under ``root``.

    ``replacements`` maps ``id(old)`` to ``(old, new)``. Every path that
    reaches ``old`` — in Sequential, ModuleList, ModuleDict or plain
    attributes — gets the same ``new`` object, so sharing is preserved.
    Returns the root, which is ``new`` when the root itself was replaced.
    """
    if not replacements:
        return root
    for parent in list(_containers(root)):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                old, new = replacements[id(child)]
                if old is child:
                    parent._modules[key] = new
    entry = replacements.get(id(root))
    if entry is not None and entry[0] is root:
        return entry[1]
    return root


def replace_module(root: nn.Module, qualname: str, new: nn.Module) -> nn.Module:
    """Replace the module at ``qualname`` (and every other path to the same object).

    Returns the root, which is ``new`` when ``qualname`` is ``""``.

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    >>> net = replace_module(net, "1", nn.Identity())
    >>> type(net[1]).__name__
    'Identity'
    """
    require_module(root, "root")
    require_module(new, "new")
    try:
        old = root.get_submodule(qualname)
    except AttributeError as exc:
        raise ModuleSelectionError(
            f"no submodule at {qualname!r} in {type(root).__name__}",
            hint="list the paths with [n for n, _ in model.named_modules()]",
        ) from exc
    return replace_modules(root, {id(old): (old, new)})

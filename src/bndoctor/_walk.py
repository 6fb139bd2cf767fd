"""One walk over a module tree: find BatchNorm layers, select them, replace them.

Every conversion in bndoctor goes through this module, so that the same rules
apply everywhere:

* What counts as a BatchNorm layer, and what bndoctor may do with it, comes
  from the layer-family registry (:mod:`bndoctor.families`): torch's
  ``_BatchNorm`` subclasses, SyncBN, frozen layers recognised by behaviour
  (torchvision, detectron2 and timm ``FrozenBatchNorm2d``), lazy layers, and
  BN-like layers bndoctor cannot reason about (OpenMMLab's ``MMSyncBN``),
  reported as unsupported.
* A module reachable at several paths (shared submodule) is one layer: it is
  reported once with its aliases and replaced by one new object at every path.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch.nn as nn

from .errors import (
    BNDoctorError,
    BNDoctorWarning,
    MissingRunningStatsError,
    ModuleSelectionError,
    UninitializedLayerError,
    require_module,
)
from .families import BNKind, Family, family_of

__all__ = [
    "BNInfo",
    "BNKind",
    "ModuleSelection",
    "find_bn",
    "replace_module",
    "replace_modules",
]

#: What ``modules=`` accepts everywhere: ``None`` (all layers), a qualified
#: name, prefix or glob pattern, several of them, or a predicate on
#: ``(qualified_name, module)``.
ModuleSelection = None | str | Iterable[str] | Callable[[str, nn.Module], bool]

_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, nn.LazyBatchNorm1d: 1}
_DIMS.update({nn.LazyBatchNorm2d: 2, nn.LazyBatchNorm3d: 3})


@dataclass(frozen=True)
class BNInfo:
    """One BatchNorm (or BN-like) layer found in a model.

    ``name`` is its path in the model (``layer3.1.bn2``) and ``aliases`` its
    other paths when the module is shared; ``module`` the layer itself;
    ``kind`` its class name; ``dims`` the input rank it expects (1, 2, 3 for
    BatchNorm1d/2d/3d; ``None`` when any); ``num_features``, ``affine``,
    ``track_running_stats``, ``momentum`` and ``eps`` as the layer holds them.
    ``frozen`` means the layer normalises with its running statistics even in
    training mode (bndoctor's frozen layers and third-party FrozenBatchNorm).
    ``supported`` is ``False`` for layers bndoctor finds but cannot convert;
    ``reason`` says why. ``family`` is the registry entry the layer matched
    (:mod:`bndoctor.families`).
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
    family: Family | None = field(default=None, repr=False, compare=False)

    @property
    def uses_batch_stats(self) -> bool:
        """Whether a forward in the module's current mode normalises with batch statistics."""
        if self.frozen:
            return False
        return self.training or not self.track_running_stats

    @property
    def swappable(self) -> bool:
        """Whether a class-swapping remedy (SyncBN, accumulation-aware BN, Batch Renorm) may convert it."""
        return self.family is not None and self.family.swappable

    @property
    def lazy(self) -> bool:
        """An uninitialised lazy layer: its shape is unknown until the first forward."""
        return self.family is not None and self.family.lazy

    @property
    def opaque(self) -> bool:
        """A BN-like layer whose forward bndoctor cannot reason about (found, never converted)."""
        return not self.supported and not self.lazy

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


def _bn_dims(module: nn.Module) -> int | None:
    for base, dims in _DIMS.items():
        if isinstance(module, base):
            return dims
    return None


def _classify(name: str, module: nn.Module) -> BNInfo | None:
    """Return a record for a BN or BN-like module, ``None`` for anything else."""
    family = family_of(module)
    if family is None:
        return None
    common = dict(
        name=name,
        module=module,
        kind=family.kind,
        cls=_class_path(module),
        training=module.training,
        frozen=family.frozen,
        supported=family.supported,
        reason=family.reason if not family.supported else "",
        family=family,
    )
    if family.torch_bn:
        momentum = module.momentum
        return BNInfo(
            dims=_bn_dims(module),
            num_features=None if family.lazy else int(module.num_features),
            affine=bool(module.affine),
            track_running_stats=bool(module.track_running_stats),
            momentum=None if momentum is None else float(momentum),
            eps=float(module.eps),
            **common,
        )
    # recognised by its buffers: a frozen BN keeps its affine as buffers
    momentum = getattr(module, "momentum", None)
    return BNInfo(
        dims=None,
        num_features=int(module.get_buffer("running_mean").numel()),
        affine=True if family.frozen else getattr(module, "weight", None) is not None,
        track_running_stats=True,
        momentum=float(momentum) if isinstance(momentum, (int, float)) and not family.frozen else None,
        eps=float(getattr(module, "eps", 1e-5)),
        **common,
    )


def with_running_stats(model: nn.Module, modules: ModuleSelection = None) -> list[BNInfo]:
    """Selected BN layers that hold running statistics (lazy and BN-like layers excluded)."""
    require_module(model)
    return [
        r
        for r in select(find_bn(model), modules)
        if r.supported
        and getattr(r.module, "running_mean", None) is not None
        and getattr(r.module, "running_var", None) is not None
    ]


def find_bn(model: nn.Module) -> list[BNInfo]:
    """List every BatchNorm and BN-like layer of ``model``, in module order.

    Args:
        model: any module tree.

    Returns:
        One :class:`BNInfo` per layer: its path, kind, channels and what bndoctor can do with it. A layer
        shared between several paths is listed once, under its first path, with the other paths in
        ``aliases``.

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
    if not isinstance(modules, (str, Iterable)):
        raise ModuleSelectionError(
            f"expected `{argument}` to be a name, a list of names or a callable (got {type(modules).__name__})",
            hint="pass names such as 'layer1' or 'layer3.*.bn2', or a callable (name, module) -> bool",
        )
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
    if record.lazy:
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


def warn_left_alone(records: Iterable[BNInfo], operation: str, *, stacklevel: int = 3) -> None:
    """Name the supported layers an operation leaves as they are, each with its family's reason."""
    kept = list(records)
    if kept:
        reasons = "; ".join(f"'{r.name}' ({r.family.reason if r.family else 'unknown forward'})" for r in kept)
        warnings.warn(
            f"{operation} left {len(kept)} BN subclass(es) unchanged: {reasons}", BNDoctorWarning, stacklevel=stacklevel
        )


def warn_unsupported(records: Iterable[BNInfo], operation: str) -> None:
    skipped = [r for r in records if r.opaque]
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
        lazy = [r.name for r in find_bn(model) if r.lazy]
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

    Args:
        root: the model.
        qualname: the path of the module to replace (``""``: the root itself).
        new: the module to put there.

    Returns:
        The root, which is ``new`` when ``qualname`` is ``""``.

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

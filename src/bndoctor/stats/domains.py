"""Named sets of BN running statistics, one per data domain, with the affine shared.

Recalibrate once per domain (``recalibrate(model, loader, domain="target")``
or :func:`store_stats` after any recalibration), then switch::

    with bndoctor.use_stats(model, "target"):
        evaluate(model, target_loader)

The sets live on each BN layer as non-persistent buffers: they follow
``model.to(device)`` and ``copy.deepcopy`` but are not in ``state_dict()``;
use :func:`export_stats` / :func:`import_stats` to save and load them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from .._walk import ModuleSelection, with_running_stats
from ..errors import BNDoctorError, require_module

__all__ = ["export_stats", "import_stats", "load_stats", "stats_sets", "store_stats", "use_stats"]

_PREFIX = "_bndoctor_stats__"
_KEYS = ("running_mean", "running_var")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise BNDoctorError(
            f"expected a statistics set name: a non-empty string without '.' (got {name!r})",
            hint="e.g. 'source' or 'target'",
        )


def _buffer(name: str, key: str) -> str:
    return f"{_PREFIX}{name}__{key}"


def store_stats(model: nn.Module, name: str, *, modules: ModuleSelection = None) -> None:
    """Save each BN layer's current running statistics as the set ``name`` (overwrites a set of that name).

    Args:
        model: the model.
        name: the set's name, e.g. ``"target"``.
        modules: the layers to store; default: all with running statistics.
    """
    _check_name(name)
    for record in with_running_stats(model, modules):
        for key in _KEYS:
            value = record.module.get_buffer(key).detach().clone()
            attr = _buffer(name, key)
            if attr in record.module._buffers:
                record.module._buffers[attr] = value
            else:
                record.module.register_buffer(attr, value, persistent=False)


def stats_sets(model: nn.Module) -> list[str]:
    """Names of the statistics sets stored on any BN layer of ``model``.

    Args:
        model: the model.

    Returns:
        The set names, in the order first found.
    """
    names: list[str] = []
    for record in with_running_stats(model):
        for attr in record.module._buffers:
            if attr.startswith(_PREFIX) and attr.endswith("__running_mean"):
                name = attr[len(_PREFIX) : -len("__running_mean")]
                if name not in names:
                    names.append(name)
    return names


def load_stats(model: nn.Module, name: str) -> list[str]:
    """Copy the set ``name`` into the running statistics.

    Args:
        model: the model.
        name: a set stored with :func:`store_stats` or ``recalibrate(..., domain=name)``.

    Returns:
        The paths of the layers it was stored for.

    Raises:
        BNDoctorError: no layer holds a set of that name.
    """
    _check_name(name)
    loaded = []
    with torch.no_grad():
        for record in with_running_stats(model):
            stored = [record.module._buffers.get(_buffer(name, key)) for key in _KEYS]
            if any(t is None for t in stored):
                continue
            for key, tensor in zip(_KEYS, stored):
                record.module.get_buffer(key).copy_(tensor)
            loaded.append(record.name)
    if not loaded:
        known = stats_sets(model)
        raise BNDoctorError(
            f"no BN layer has a statistics set named {name!r} (sets: {', '.join(known) or 'none'})",
            hint="store one first: recalibrate(model, loader, domain=name) or store_stats(model, name)",
        )
    return loaded


@contextmanager
def use_stats(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Use the set ``name`` inside the block; the previous statistics come back afterwards, also on error.

    Args:
        model: the model.
        name: a stored set (see :func:`load_stats`).

    Returns:
        A context manager that yields ``model``.
    """
    records = with_running_stats(model)
    saved = [(r.module.get_buffer(k), r.module.get_buffer(k).detach().clone()) for r in records for k in _KEYS]
    load_stats(model, name)
    try:
        yield model
    finally:
        with torch.no_grad():
            for live, value in saved:
                live.copy_(value)


def export_stats(model: nn.Module) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Every stored set as plain tensors on the CPU, for ``torch.save`` or JSON.

    Args:
        model: the model.

    Returns:
        ``{set: {layer: {"running_mean": ..., "running_var": ...}}}``.
    """
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name in stats_sets(model):
        for record in with_running_stats(model):
            stored = {k: record.module._buffers.get(_buffer(name, k)) for k in _KEYS}
            if all(v is not None for v in stored.values()):
                out.setdefault(name, {})[record.name] = {k: v.detach().cpu().clone() for k, v in stored.items()}
    return out


def import_stats(model: nn.Module, exported: Any) -> None:
    """Store sets produced by :func:`export_stats` (e.g. read back from a file); all or nothing.

    Every set, layer and tensor is checked first — the structure, the layer
    names, the shapes, finite means and non-negative finite variances — and
    only then registered, so a bad entry leaves the model as it was.

    Args:
        model: the model (the architecture the sets were exported from).
        exported: what :func:`export_stats` returned.

    Raises:
        BNDoctorError: an entry that does not fit the model, or statistics that are not finite.
    """
    require_module(model)
    layers = {r.name: r for r in with_running_stats(model)}
    hint = "import a dict made by bndoctor.export_stats from the same architecture"
    if not isinstance(exported, Mapping):
        raise BNDoctorError(f"expected a dict of statistics sets (got {type(exported).__name__})", hint=hint)
    staged: list[tuple[nn.Module, str, torch.Tensor]] = []
    for name, per_layer in exported.items():
        _check_name(name)
        if not isinstance(per_layer, Mapping):
            raise BNDoctorError(f"statistics set {name!r} is not a dict of layers", hint=hint)
        for layer, tensors in per_layer.items():
            record = layers.get(layer)
            if record is None:
                raise BNDoctorError(
                    f"statistics set {name!r} names layer {layer!r}, which is not a BN layer of this model",
                    hint="import sets exported from the same architecture",
                )
            if not isinstance(tensors, Mapping) or any(not isinstance(tensors.get(k), torch.Tensor) for k in _KEYS):
                raise BNDoctorError(
                    f"statistics set {name!r}: layer {layer!r} needs tensors {', '.join(_KEYS)}", hint=hint
                )
            for key in _KEYS:
                current = record.module.get_buffer(key)
                value = tensors[key]
                if value.shape != current.shape:
                    raise BNDoctorError(
                        f"statistics set {name!r}: {layer}.{key} has shape {tuple(value.shape)}, "
                        f"expected {tuple(current.shape)}",
                        hint="import sets exported from the same architecture",
                    )
                if not bool(torch.isfinite(value).all()) or (key == "running_var" and bool((value < 0).any())):
                    raise BNDoctorError(
                        f"statistics set {name!r}: {layer}.{key} holds "
                        + ("negative variances" if key == "running_var" and bool((value < 0).any()) else "NaN or Inf"),
                        hint="recompute the set (bndoctor.recalibrate(model, data, domain=...)) and export it again",
                    )
                staged.append((record.module, _buffer(name, key), value.to(current.device, current.dtype).clone()))
    for module, buffer_name, value in staged:  # nothing failed: register everything
        module.register_buffer(buffer_name, value, persistent=False)

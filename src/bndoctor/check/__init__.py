"""``bndoctor.check``: diagnose a model and its training setup; ``bndoctor.fix``: apply the prescriptions.

    report = bndoctor.check(model, bndoctor.TrainingSetup(micro_batch=2, accum_steps=32),
                            input_shape=(3, 224, 224))
    print(report)                        # findings grouped by severity, with fixes
    model, changes = bndoctor.fix(model, report)

Checks are registered functions (:func:`register_check`): per module type,
looked up along each module's class hierarchy, or for the whole model. Each
returns :class:`Finding` objects with a stable code (``BN101``...), a
severity, the module's qualified name, the numbers, one sentence of
explanation and the fix.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .._walk import find_bn
from ..errors import BNDoctorError, require_module
from . import builtin as _builtin  # noqa: F401  (registers the built-in checks)
from ._core import (
    CHECKS,
    Action,
    Check,
    CheckFailedError,
    Context,
    Finding,
    Report,
    Severity,
    TrainingSetup,
    checks_for,
    register_check,
)

__all__ = [
    "CHECKS",
    "Action",
    "Check",
    "CheckFailedError",
    "Context",
    "Finding",
    "FixResult",
    "Report",
    "Severity",
    "TrainingSetup",
    "check",
    "fix",
    "register_check",
]

_ORDER = {"error": 0, "warning": 1, "info": 2}


def _input_shape(input_shape: Sequence[int] | None) -> tuple[int, ...] | None:
    if input_shape is None:
        return None
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(d < 1 for d in shape) or any(isinstance(d, bool) for d in input_shape):
        raise BNDoctorError(
            f"expected input_shape to be positive sizes without the batch dimension (got {input_shape!r})",
            hint="e.g. input_shape=(3, 224, 224) for images",
        )
    return shape


def _pairs_without_trace(model: nn.Module, records: list[Any], names: dict[int, str]) -> list[tuple[str, str]]:
    from ..fold import _pairs_from_sequentials, _pairs_from_trace

    bn_by_id = {id(r.module): r for r in records if r.kind in ("batchnorm", "sync", "frozen")}
    try:
        pairs = _pairs_from_trace(model, bn_by_id)
    except Exception:  # models torch.fx cannot trace: adjacent layers of nn.Sequential only
        pairs = _pairs_from_sequentials(model, bn_by_id)
    return [(names[id(producer)], record.name) for producer, record in pairs if id(producer) in names]


def _as_findings(out: Finding | Iterable[Finding] | None, check: Check) -> list[Finding]:
    if out is None:
        return []
    items = [out] if isinstance(out, Finding) else list(out)
    for item in items:
        if not isinstance(item, Finding):
            raise BNDoctorError(
                f"check {check.code} returned {type(item).__name__}, expected Finding objects or None",
                hint="return bndoctor.Finding(code, severity, module, message, ...) from a check",
            )
    return items


def check(
    model: nn.Module,
    setup: TrainingSetup | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    strict: bool = False,
    name: str | None = None,
) -> Report:
    """Run every registered check on ``model`` for ``setup``; returns a :class:`Report`.

    Without ``setup`` only the layer-configuration checks run (the batch-size
    ones need the numbers). ``input_shape`` (one sample, no batch dimension)
    adds a forward on meta tensors — no arithmetic, no memory — that finds
    each layer's values per channel, layers never reached, and which conv
    feeds which BN; the model is left exactly as it was. ``strict=True``
    raises one :class:`CheckFailedError` listing every error-level finding.
    """
    require_module(model)
    if setup is not None and not isinstance(setup, TrainingSetup):
        raise BNDoctorError(
            f"expected setup to be a bndoctor.TrainingSetup (got {type(setup).__name__})",
            hint="e.g. bndoctor.TrainingSetup(micro_batch=2, accum_steps=32)",
        )
    shape = _input_shape(input_shape)
    records = find_bn(model)
    names = {id(m): n for n, m in model.named_modules()}
    ctx = Context(model, setup, records, names)
    trace_error = ""
    if shape is not None:
        from ._trace import trace

        watched = {id(r.module): r.name for r in records}
        batch = setup.micro_batch if setup is not None else 2
        try:
            traced = trace(model, (batch, *shape), watched, names)
            ctx.input_shapes, ctx.pairs = traced.input_shapes, traced.pairs
        except Exception as exc:  # data-dependent models, custom ops without meta kernels
            trace_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    if ctx.pairs is None:
        ctx.pairs = _pairs_without_trace(model, records, names)
    findings: list[Finding] = []
    for registered in list(CHECKS.values()):
        if registered.applies_to is None:
            findings.extend(_as_findings(registered.fn(ctx), registered))
    for module_name, module in model.named_modules():
        for registered in checks_for(module):
            findings.extend(_as_findings(registered.fn(ctx, module_name, module), registered))
    findings.sort(key=lambda f: (_ORDER[f.severity], f.code, f.module or ""))
    report = Report(
        findings,
        setup,
        name or type(model).__name__,
        len(records),
        shape,
        traced=ctx.input_shapes is not None,
        trace_error=trace_error,
        layer_shapes=dict(ctx.input_shapes or {}),
    )
    if strict:
        report.raise_for_errors()
    return report


# --------------------------------------------------------------------------- fix


@dataclass
class FixResult:
    """The repaired model and one line per change; unpacks as ``model, changes = bndoctor.fix(...)``."""

    model: nn.Module
    changes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter((self.model, self.changes))


_APPLY_ORDER = (
    "drop_bias",
    "float_bn",
    "set_momentum",
    "from_sync_bn",
    "freeze_bn",
    "to_sync_bn",
    "to_accum_bn",
    "convert_bn",
)


def _merge(actions: list[Action]) -> dict[str, list[Action]]:
    merged: dict[str, list[Action]] = {}
    for action in actions:
        if action.name not in _APPLY_ORDER:
            continue
        merged.setdefault(action.name, [])
        if action not in merged[action.name]:
            merged[action.name].append(action)
    return merged


def _layers(actions: list[Action]) -> list[str]:
    return sorted({m for a in actions for m in a.modules})


def _drop_bias(model: nn.Module, producer_name: str, bn_name: str) -> str:
    producer, bn = model.get_submodule(producer_name), model.get_submodule(bn_name)
    bias = producer.bias
    with torch.no_grad():
        running = getattr(bn, "running_mean", None)
        if isinstance(running, torch.Tensor):
            running.sub_(bias.detach().to(running.dtype))
    producer.bias = None
    return f"drop_bias: {producer_name}.bias moved into {bn_name}.running_mean"


def _shown(
    target: nn.Module, before: dict[str, type], layers: list[str], result: FixResult, *, swapped: bool = False
) -> str:
    """``"N layer(s)"`` — for class-swapping repairs, the layers whose class changed; the rest go to ``skipped``."""
    if not layers:
        return "all layers"
    if not swapped:
        return f"{len(layers)} layer(s)"
    after = {n: type(m) for n, m in target.named_modules() if n in before}
    kept = [n for n in layers if after.get(n) is before.get(n)]
    for n in kept:
        result.skipped.append(f"{n} (left as it is: a BN subclass with its own forward, or nothing to change)")
    changed = len(layers) - len(kept)
    return f"{changed} layer(s)" if not kept else f"{changed} of {len(layers)} layer(s)"


def fix(model: nn.Module, report: Report, *, inplace: bool = False) -> FixResult:
    """Apply the repairs that ``report``'s findings prescribe; returns the model and the changes.

    Works on a copy unless ``inplace=True``. Applied in a fixed order: drop
    redundant biases (exact: the bias moves into the BN's running mean),
    float32 statistics, momentum, SyncBN without processes back to BN,
    freezing, SyncBN, accumulation-aware BN, GroupNorm. Findings without a
    mechanical fix (e.g. eps, layers never reached) are listed in ``skipped``.
    """
    require_module(model)
    if not isinstance(report, Report):
        raise BNDoctorError(
            f"expected a bndoctor.Report (got {type(report).__name__})",
            hint="report = bndoctor.check(model, setup); bndoctor.fix(model, report)",
        )
    from ..accumulate import to_accum_bn
    from ..convert import convert_bn, freeze_bn
    from ..sync import from_sync_bn, to_sync_bn

    target = model if inplace else copy.deepcopy(model)
    result = FixResult(target)
    result.skipped = [f"{f.code} {f.where}" for f in report.findings if f.action is None and f.severity != "info"]
    merged = _merge([f.action for f in report.findings if f.action is not None])
    known = {n for n, _ in target.named_modules()}
    for name in _APPLY_ORDER:
        actions = merged.get(name)
        if not actions:
            continue
        layers = [m for m in _layers(actions) if m in known]
        if name == "drop_bias":
            for action in actions:
                producer_name, bn_name = action.modules
                if getattr(target.get_submodule(producer_name), "bias", None) is not None:
                    result.changes.append(_drop_bias(target, producer_name, bn_name))
            continue
        if not layers and any(a.modules for a in actions):
            continue
        selection = layers or None
        before = {n: type(m) for n, m in target.named_modules() if n in layers} if layers else {}
        if name == "float_bn":
            for layer in layers:
                target.get_submodule(layer).float()
        elif name == "set_momentum":
            for layer in layers:
                target.get_submodule(layer).momentum = dict(actions[0].options)["momentum"]
        elif name == "from_sync_bn":
            dims = [len(report.layer_shapes[m]) - 2 for m in layers if m in report.layer_shapes]
            target = from_sync_bn(target, dims=max(set(dims), key=dims.count) if dims else 2, inplace=True)
        elif name == "freeze_bn":
            target = freeze_bn(target, modules=selection, inplace=True)
        elif name == "to_sync_bn":
            target = to_sync_bn(target, modules=selection, inplace=True)
        elif name == "to_accum_bn":
            sync = any(dict(a.options).get("sync") for a in actions)
            if sync and "to_sync_bn" not in merged:
                target = to_sync_bn(target, modules=selection, inplace=True)
                result.changes.append(f"to_sync_bn: {_shown(target, before, layers, result)}")
            target = to_accum_bn(target, modules=selection, inplace=True)
            shown = _shown(target, before, layers, result, swapped=True)
            result.changes.append(f"{name}: {shown}" + (" (pooled across ranks)" if sync else ""))
            result.changes.append("  then call bndoctor.accumulate_bn(model, optimizer) once the optimizer exists")
            continue
        elif name == "convert_bn":
            target = convert_bn(target, "group", modules=selection, inplace=True)
        swaps = name in ("freeze_bn", "to_sync_bn", "convert_bn", "from_sync_bn")
        result.changes.append(f"{name}: {_shown(target, before, layers, result, swapped=swaps)}")
    result.model = target
    return result

"""``bndoctor.check``: run every registered check on a model and its training setup."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch.nn as nn

from .._pairs import find_pairs
from .._walk import BNInfo, find_bn
from ..errors import BNDoctorError, require_module
from ..findings import Finding
from ..training import TrainingSetup
from . import builtin as _builtin  # noqa: F401  (registers the built-in checks)
from ._core import CHECKS, Check, Context, Report, checks_for

__all__ = ["check"]

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


def _pairs_without_trace(model: nn.Module, records: list[BNInfo], names: dict[int, str]) -> list[tuple[str, str]]:
    bn_by_id = {id(r.module): r for r in records if r.supported}
    pairs, _ = find_pairs(model, bn_by_id)  # models torch.fx cannot trace: adjacent layers of nn.Sequential only
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
    """Run every registered check on ``model`` for a training setup.

    Args:
        model: the model to audit; it is left exactly as it was.
        setup: micro-batch, accumulation steps, world size, fine-tuning, precision. Without it only the
            layer-configuration checks run (the batch-size ones need the numbers).
        input_shape: one sample's shape without the batch dimension, e.g. ``(3, 224, 224)``; adds a forward
            on meta tensors (no arithmetic, no memory) that finds each layer's values per channel, layers
            never reached, and which conv feeds which BN.
        strict: raise one :class:`CheckFailedError` listing every error-level finding.
        name: labels the model in the report (default: its class name).

    Returns:
        A :class:`Report` of findings, each with a code, the layer's path, the evidence and the fix.

    Raises:
        BNDoctorError: a setup that is not a :class:`~bndoctor.TrainingSetup`, or an input shape that does
            not fit the model.
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
        from ._trace import TraceError, trace

        watched = {id(r.module): r.name for r in records}
        batch = setup.micro_batch if setup is not None else 2
        try:
            traced = trace(model, (batch, *shape), watched, names)
            ctx.input_shapes, ctx.pairs = traced.input_shapes, traced.pairs
        except TraceError as exc:
            where = f"'{exc.module}'" if exc.module else "the model's own forward"
            if exc.shape_mismatch:  # e.g. channels or sizes that do not match: the user's input is wrong
                raise BNDoctorError(
                    f"input_shape {shape} does not fit {type(model).__name__}: {where} raised {exc}",
                    hint="pass the shape of one sample without the batch dimension, e.g. input_shape=(3, 224, 224) "
                    "(channels first)",
                ) from exc.cause
            trace_error = f"{exc} (in {where})"  # e.g. data-dependent models cannot run on meta tensors
    if ctx.pairs is None:
        ctx.pairs = _pairs_without_trace(model, records, names)
    findings: list[Finding] = []
    unchecked = [c.code for c in CHECKS.values() if c.needs_setup and setup is None]
    for registered in list(CHECKS.values()):
        if registered.applies_to is None and registered.code not in unchecked:
            findings.extend(_as_findings(registered.fn(ctx), registered))
    for module_name, module in model.named_modules():
        for registered in checks_for(module):
            if registered.code not in unchecked:
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
        unchecked=unchecked,
    )
    if strict:
        report.raise_for_errors()
    return report

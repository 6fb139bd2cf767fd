"""Findings, reports, the training setup and the registry of checks."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch.nn as nn

from .._walk import BNInfo
from ..errors import BNDoctorError

__all__ = [
    "CHECKS",
    "Action",
    "Check",
    "CheckFailedError",
    "Context",
    "Finding",
    "Report",
    "Severity",
    "TrainingSetup",
    "register_check",
]

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")
PRECISIONS = ("fp32", "fp16", "bf16")


class CheckFailedError(BNDoctorError):
    """``check(..., strict=True)`` found error-level problems; the message lists them all."""


@dataclass(frozen=True)
class TrainingSetup:
    """How the model will be trained: the numbers that decide what BatchNorm sees.

    ``micro_batch`` is the physical batch per device and forward pass,
    ``accum_steps`` the micro-batches per optimizer step, ``world_size`` the
    number of data-parallel processes, ``sync_bn`` whether BN statistics are
    synchronised across them (e.g. by the framework), ``finetune`` whether the
    model starts from pretrained weights, ``precision`` the training precision.
    """

    micro_batch: int
    accum_steps: int = 1
    world_size: int = 1
    sync_bn: bool = False
    finetune: bool = False
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("micro_batch", "accum_steps", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BNDoctorError(
                    f"expected TrainingSetup.{name} to be a positive integer (got {value!r})",
                    hint="e.g. TrainingSetup(micro_batch=2, accum_steps=32, world_size=4)",
                )
        if self.precision not in PRECISIONS:
            raise BNDoctorError(
                f"expected precision one of {', '.join(PRECISIONS)} (got {self.precision!r})",
                hint="fp16 and bf16 mean mixed precision (autocast) or a model cast to that type",
            )

    @property
    def logical_batch(self) -> int:
        """Samples per optimizer step: micro-batch x accumulation steps x world size."""
        return self.micro_batch * self.accum_steps * self.world_size

    def as_dict(self) -> dict[str, Any]:
        return {
            "micro_batch": self.micro_batch,
            "accum_steps": self.accum_steps,
            "world_size": self.world_size,
            "sync_bn": self.sync_bn,
            "finetune": self.finetune,
            "precision": self.precision,
            "logical_batch": self.logical_batch,
        }


@dataclass(frozen=True)
class Action:
    """A repair :func:`bndoctor.fix` knows how to apply: a name, the layers, options."""

    name: str
    modules: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "modules": list(self.modules), "options": dict(self.options)}


@dataclass(frozen=True)
class Finding:
    """One problem: stable code, severity, where, the numbers, why it matters and the fix."""

    code: str
    severity: Severity
    module: str | None
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    fix: str = ""
    action: Action | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise BNDoctorError(
                f"expected severity 'error', 'warning' or 'info' (got {self.severity!r}) in finding {self.code}",
                hint="pick the severity by consequence: error breaks training, warning degrades it",
            )

    @property
    def where(self) -> str:
        return self.module if self.module else "(model)"

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "module": self.module,
            "message": self.message,
            "evidence": self.evidence,
            "fix": self.fix,
            "action": None if self.action is None else self.action.as_dict(),
        }

    def __str__(self) -> str:
        return f"{self.code} {self.severity} {self.where}: {self.message}"


@dataclass
class Report:
    """What :func:`bndoctor.check` found; ``ok`` means no error-level finding."""

    findings: list[Finding]
    setup: TrainingSetup | None
    model: str
    bn_layers: int
    input_shape: tuple[int, ...] | None = None
    traced: bool = False
    trace_error: str = ""
    layer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # traced input of each layer

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def infos(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "info"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def codes(self) -> list[str]:
        return sorted({f.code for f in self.findings})

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def raise_for_errors(self) -> None:
        """Raise one :class:`CheckFailedError` that lists every error-level finding."""
        if self.ok:
            return
        lines = "; ".join(f"{f.code} {f.where}: {f.message}" for f in self.errors)
        raise CheckFailedError(
            f"bndoctor.check found {len(self.errors)} error(s) in {self.model}: {lines}",
            hint="see report.errors for the fixes, or apply them with bndoctor.fix(model, report)",
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "setup": None if self.setup is None else self.setup.as_dict(),
            "bn_layers": self.bn_layers,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "traced": self.traced,
            "trace_error": self.trace_error,
            "layer_shapes": {k: list(v) for k, v in self.layer_shapes.items()},
            "summary": {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES},
            "findings": [f.as_dict() for f in self.findings],
        }

    to_json = as_dict

    def to_text(self) -> str:
        from ..cli import _table

        head = f"{self.model}: {self.bn_layers} BatchNorm layer(s)"
        if self.setup is not None:
            s = self.setup
            head += (
                f"; micro-batch {s.micro_batch} x {s.accum_steps} accumulation x {s.world_size} process(es) = "
                f"logical batch {s.logical_batch}"
                + (", SyncBN" if s.sync_bn else "")
                + (", fine-tuning" if s.finetune else "")
                + (f", {s.precision}" if s.precision != "fp32" else "")
            )
        if self.trace_error:
            head += f"\n(shapes not traced: {self.trace_error})"
        if not self.findings:
            return head + "\nno findings: BatchNorm looks healthy for this setup"
        parts = [head]
        for severity in SEVERITIES:
            group = [f for f in self.findings if f.severity == severity]
            if not group:
                continue
            parts.append(f"\n{severity.upper()}S ({len(group)})")
            rows = []
            for f in group:
                lines = textwrap.wrap(f.message, 100) or [""]
                rows.append([f.code, f.where, lines[0]])
                rows.extend(["", "", line] for line in lines[1:])
            parts.append(_table.render(["code", "module", "finding"], rows))
        fixes: dict[str, str] = {}
        for f in self.findings:
            if f.fix and f.fix not in fixes.values():
                fixes.setdefault(f.code, f.fix)
        if fixes:
            parts.append("\nFIXES")
            for code, text in fixes.items():
                parts.append(textwrap.fill(text, 110, initial_indent=f"{code}: ", subsequent_indent=" " * 7))
        counts = ", ".join(f"{len([f for f in self.findings if f.severity == s])} {s}(s)" for s in SEVERITIES)
        parts.append(f"\n{counts}" + ("" if self.ok else "; bndoctor.fix(model, report) applies the fixes"))
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.to_text()


@dataclass
class Context:
    """What a check may look at: the model, the setup, its BN layers and (with an input shape) the trace."""

    model: nn.Module
    setup: TrainingSetup | None
    records: list[BNInfo]
    names: dict[int, str]
    input_shapes: dict[str, tuple[int, ...]] | None = None
    pairs: list[tuple[str, str]] | None = None

    def name_of(self, module: nn.Module) -> str:
        return self.names.get(id(module), type(module).__name__)

    @property
    def traced(self) -> bool:
        return self.input_shapes is not None


ModuleCheck = Callable[[Context, str, nn.Module], Iterable[Finding] | Finding | None]
ModelCheck = Callable[[Context], Iterable[Finding] | Finding | None]


@dataclass(frozen=True)
class Check:
    """A registered check: ``applies_to`` types (looked up along each module's MRO) or the whole model."""

    code: str
    title: str
    fn: Callable[..., Any]
    applies_to: tuple[type, ...] | None = None


#: Every registered check by code (built-in ones and yours).
CHECKS: dict[str, Check] = {}


def register_check(
    code: str, title: str, *, applies_to: type | tuple[type, ...] | None = None, replace: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a check; use as a decorator.

    With ``applies_to`` the function is called as ``fn(ctx, name, module)`` for
    every module whose class (or a base class) is listed; without it, once as
    ``fn(ctx)``. It returns a :class:`Finding`, several, or ``None``::

        @bndoctor.register_check("MY001", "BN after the head", applies_to=nn.BatchNorm1d)
        def head_bn(ctx, name, module):
            if name.startswith("head"):
                return bndoctor.Finding("MY001", "warning", name, "BN in the head", fix="remove it")
    """
    if not isinstance(code, str) or not code:
        raise BNDoctorError(f"expected a non-empty string code (got {code!r})", hint='e.g. "MY001"')
    types = (applies_to,) if isinstance(applies_to, type) else applies_to
    if types is not None and not all(isinstance(t, type) for t in types):
        raise BNDoctorError(
            f"expected applies_to to be a class or a tuple of classes (got {applies_to!r})",
            hint="e.g. applies_to=torch.nn.BatchNorm2d",
        )

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if code in CHECKS and not replace:
            raise BNDoctorError(
                f"a check with code {code!r} is already registered",
                hint="choose another code or pass replace=True",
            )
        CHECKS[code] = Check(code, title, fn, types)
        return fn

    return decorate


def checks_for(module: nn.Module) -> list[Check]:
    """The checks that apply to ``module``: registered for its class or any base class, each once."""
    mro = type(module).__mro__
    return [c for c in CHECKS.values() if c.applies_to is not None and any(t in mro for t in c.applies_to)]

"""Reports, the context a check sees, and the registry of checks."""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .. import _table
from .._registry import register_entry
from .._walk import BNInfo
from ..errors import BNDoctorError
from ..findings import SEVERITIES, Finding
from ..training import TrainingSetup

__all__ = [
    "CHECKS",
    "Check",
    "CheckFailedError",
    "Context",
    "Report",
    "checks_for",
    "register_check",
    "require_known_code",
]


#: version of :meth:`Report.as_dict`'s layout; raised when a field changes meaning or disappears
SCHEMA_VERSION = 1


class CheckFailedError(BNDoctorError):
    """``check(..., strict=True)`` found error-level problems; the message lists them all."""


@dataclass
class Report:
    """What :func:`bndoctor.check` found; ``ok`` means no error-level finding.

    ``findings``: the :class:`~bndoctor.Finding` list; ``setup``: the
    training setup checked (``None``: configuration checks only); ``model``:
    its name; ``bn_layers``: how many; ``input_shape``, ``traced`` and
    ``trace_error``: the meta trace asked for and how it went;
    ``layer_shapes``: each layer's traced input shape; ``left_out``: findings
    removed by :meth:`filtered` (``--select`` / ``--ignore``); ``unchecked``:
    the codes of the checks that need a training setup and had none.
    """

    findings: list[Finding]
    setup: TrainingSetup | None
    model: str
    bn_layers: int
    input_shape: tuple[int, ...] | None = None
    traced: bool = False
    trace_error: str = ""
    layer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # traced input of each layer
    left_out: int = 0  # findings removed by filtered() (--select / --ignore)
    unchecked: list[str] = field(default_factory=list)  # checks that need a setup, run without one

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

    def filtered(self, select: Iterable[str] | None = None, ignore: Iterable[str] | None = None) -> Report:
        """A copy keeping findings whose code starts with one of ``select`` (all when None) and none of ``ignore``.

        Codes or prefixes, as linters take them: ``select=["BN1"]`` keeps BN101-BN106. A code or prefix that
        no registered check has is an error (a typo must not turn a CI gate green).
        """
        chosen = tuple(select) if select is not None else None
        dropped = tuple(ignore or ())
        for option, codes in (("select", chosen or ()), ("ignore", dropped)):
            for code in codes:
                require_known_code(code, option)
        kept = [
            f
            for f in self.findings
            if (chosen is None or f.code.startswith(chosen)) and not (dropped and f.code.startswith(dropped))
        ]
        return dataclasses.replace(self, findings=kept, left_out=self.left_out + len(self.findings) - len(kept))

    def to_github(self) -> str:
        """GitHub Actions workflow commands: one annotation per finding (``::error title=BN101::...``)."""
        level = {"error": "error", "warning": "warning", "info": "notice"}
        lines = []
        for f in self.findings:
            text = f"{f.where}: {f.message}" + (f" Fix: {f.fix}" if f.fix else "")
            text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
            lines.append(f"::{level[f.severity]} title=bndoctor {f.code}::{text}")
        return "\n".join(lines)

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
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "setup": None if self.setup is None else self.setup.as_dict(),
            "bn_layers": self.bn_layers,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "traced": self.traced,
            "trace_error": self.trace_error,
            "layer_shapes": {k: list(v) for k, v in self.layer_shapes.items()},
            "summary": {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES},
            "left_out": self.left_out,
            "unchecked": list(self.unchecked),
            "findings": [f.as_dict() for f in self.findings],
        }

    to_json = as_dict

    def to_text(self) -> str:
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
        unchecked = ""
        if self.unchecked:
            unchecked = (
                f"\nnot checked without a training setup: {', '.join(self.unchecked)} (pass --micro-batch, and "
                "--accum / --world-size / --finetune as they apply, or set them in [tool.bndoctor])"
            )
        if not self.findings and self.left_out:
            return head + f"\nno findings left after --select/--ignore ({self.left_out} left out)" + unchecked
        if not self.findings and self.unchecked:
            return head + "\nno findings among the checks that ran" + unchecked
        if not self.findings:
            return head + "\nno findings: BatchNorm looks healthy for this setup"
        parts = [head + unchecked]
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
    """What a check may look at: the model, the setup, its BN layers and (with an input shape) the trace.

    ``records``: the :class:`~bndoctor.BNInfo` of every BN layer; ``names``:
    ``id(module) -> path`` for every module; ``input_shapes``: each layer's
    traced input shape (``None`` without a trace); ``pairs``: the
    ``(producer, bn)`` paths where a conv/linear output feeds a BN directly.
    """

    model: nn.Module
    setup: TrainingSetup | None
    records: list[BNInfo]
    names: dict[int, str]
    input_shapes: dict[str, tuple[int, ...]] | None = None
    pairs: list[tuple[str, str]] | None = None

    @property
    def traced(self) -> bool:
        return self.input_shapes is not None


ModuleCheck = Callable[[Context, str, nn.Module], Iterable[Finding] | Finding | None]
ModelCheck = Callable[[Context], Iterable[Finding] | Finding | None]


@dataclass(frozen=True)
class Check:
    """A registered check: ``code``, ``title``, the function ``fn``, and the ``applies_to`` types.

    With ``applies_to`` (looked up along each module's MRO) ``fn(ctx, name,
    module)`` runs per matching module; without it ``fn(ctx)`` runs once.
    ``needs_setup``: it runs only when ``check`` has a training setup.
    """

    code: str
    title: str
    fn: Callable[..., Any]
    applies_to: tuple[type, ...] | None = None
    needs_setup: bool = False  # skipped, and listed in Report.unchecked, when check() has no setup


#: Every registered check by code (built-in ones and yours).
CHECKS: dict[str, Check] = {}


def register_check(
    code: str,
    title: str,
    *,
    applies_to: type | tuple[type, ...] | None = None,
    needs_setup: bool = False,
    replace: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a check; a decorator.

    With ``applies_to`` the function is called as ``fn(ctx, name, module)`` for
    every module whose class (or a base class) is listed; without it, once as
    ``fn(ctx)``. It returns a :class:`Finding`, several, or ``None``::

        @bndoctor.register_check("MY001", "BN after the head", applies_to=nn.BatchNorm1d)
        def head_bn(ctx, name, module):
            if name.startswith("head"):
                return bndoctor.Finding("MY001", "warning", name, "BN in the head", fix="remove it")

    Args:
        code: the stable code its findings carry, e.g. ``"MY001"``.
        title: one line on what it checks (``bndoctor explain`` shows it with the function's docstring).
        applies_to: a class or tuple of classes (looked up along each module's class hierarchy); None: the
            check runs once per model.
        needs_setup: the check needs a :class:`~bndoctor.TrainingSetup`; without one it is not run and the
            report lists its code in ``unchecked`` (instead of calling the model healthy).
        replace: redefine a check registered under ``code``; otherwise that is an error.

    Returns:
        The decorator, which registers the function and returns it unchanged.
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
        check = Check(code, title, fn, types, needs_setup)
        register_entry(CHECKS, code, check, replace=replace, what="a check with code", noun="code")
        return fn

    return decorate


def require_known_code(code: object, option: str = "select") -> None:
    """Refuse a selector (a code or prefix) that no registered check's code starts with, suggesting the nearest."""
    import difflib

    if not isinstance(code, str) or not code:
        raise BNDoctorError(f"expected finding codes or prefixes such as 'BN1' (got {code!r})", hint="e.g. BN101")
    if any(known.startswith(code) for known in CHECKS):
        return
    near = difflib.get_close_matches(code, list(CHECKS), n=3, cutoff=0.5)
    raise BNDoctorError(
        f"unknown finding code {code!r} in {option}: no check has a code that starts with it",
        hint=(f"did you mean {' or '.join(near)}? " if near else "")
        + f"the codes: {', '.join(sorted(CHECKS))}; a prefix such as BN1 selects BN101-BN106",
    )


def checks_for(module: nn.Module) -> list[Check]:
    """The checks that apply to ``module``: registered for its class or any base class, each once."""
    mro = type(module).__mro__
    return [c for c in CHECKS.values() if c.applies_to is not None and any(t in mro for t in c.applies_to)]

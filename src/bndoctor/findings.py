"""Findings: what ``check``, the monitor and the noise advice report, and the thresholds they share.

A :class:`Finding` is one problem with a stable code (``BN101`` ...), a
severity, the module's qualified name, the evidence, one sentence of
explanation and the fix; its :class:`Action` names the repair that
:func:`bndoctor.fix` dispatches to through the remedy registry. These sit at
the bottom of the package so that every layer above may report findings.

Thresholds (the Group Normalization paper's ImageNet curve: BN's error grows
quickly below 8 images per GPU, Wu and He 2018): a normalisation batch below
:data:`ERROR_BELOW` samples is an error, below :data:`WARN_BELOW` a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import BNDoctorError

__all__ = [
    "ERROR_BELOW",
    "FINETUNE_RANGE",
    "SEVERITIES",
    "WARN_BELOW",
    "Action",
    "Alert",
    "Finding",
    "Severity",
]

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")

#: A normalisation batch below this many samples is an error (check BN101, monitor BN101).
ERROR_BELOW = 8
#: Below this many samples it is a warning.
WARN_BELOW = 16
#: The logical batch usually chosen for fine-tuning (check BN106, noise advice).
FINETUNE_RANGE = (32, 128)


@dataclass(frozen=True)
class Action:
    """A repair :func:`bndoctor.fix` knows how to apply: a remedy's name, the layers, options.

    ``name`` is looked up in the remedy registry (:func:`bndoctor.remedies.register_fix`).
    """

    name: str
    modules: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "modules": list(self.modules), "options": dict(self.options)}


@dataclass(frozen=True)
class Finding:
    """One problem: stable code, severity, where, the numbers, why it matters and the fix.

    ``code`` is stable across releases (``BN101``; ``bndoctor explain CODE``);
    ``severity`` ``"error"``, ``"warning"`` or ``"info"``; ``module`` the
    layer's path (``None``: the whole model); ``message`` what is wrong and
    why it matters; ``evidence`` the numbers behind it; ``fix`` what to do,
    in words; ``action`` the mechanical fix :func:`bndoctor.fix` can apply
    (``None`` when there is none).
    """

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        """The finding an :meth:`as_dict` record describes (a run file's alert); its ``action`` is not rebuilt."""
        return cls(
            data["code"],
            data["severity"],
            data.get("module"),
            data["message"],
            data.get("evidence") or {},
            data.get("fix") or "",
        )

    def __str__(self) -> str:
        return f"{self.code} {self.severity} {self.where}: {self.message}"


@dataclass(frozen=True)
class Alert:
    """A finding code raised while a model trains (the monitor, the noise advice), with its explanation.

    The module that raises it keeps its rule beside it; ``bndoctor explain CODE`` reads ``title`` and
    :attr:`explanation`.

    Args:
        code: the stable code of its findings, e.g. ``"BN501"``.
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        title: one line on what it means.
        why: why it matters.
        fix: the advice every finding of the code carries unless the rule gives a more specific one.
    """

    code: str
    severity: Severity
    title: str
    why: str
    fix: str

    @property
    def explanation(self) -> str:
        return f"Why: {self.why} Fix: {self.fix}"

    def finding(self, module: str | None, message: str, evidence: dict[str, Any], fix: str | None = None) -> Finding:
        return Finding(self.code, self.severity, module, message, evidence, fix or self.fix)

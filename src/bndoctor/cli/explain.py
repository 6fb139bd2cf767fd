"""``bndoctor explain CODE``: what a finding code means, why it matters, how to fix it.

Codes of ``bndoctor check`` are explained from their registered check (its title and docstring, so a
check you register yourself is explained too); the codes only a running model shows (the monitor's
BN5xx, the noise advice's BS1xx) from the tables their rules sit beside
(:data:`bndoctor.monitor.alerts.ALERTS`, :data:`bndoctor.noise.advice.ADVICE`).
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass

from ..errors import BNDoctorError
from ..findings import Alert
from ..monitor.alerts import ALERTS
from ..noise.advice import ADVICE
from ._command import Command

#: the codes only a running model shows: the monitor's alerts and the noise advice, each from the table kept
#: beside its rules
RUNTIME_CODES: dict[str, Alert] = {**ALERTS, **ADVICE}


@dataclass
class Explanation:
    code: str
    title: str
    text: str
    source: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "title": self.title, "text": self.text, "source": self.source}

    def to_text(self) -> str:
        return f"{self.code}: {self.title}\n\n{self.text}\n\n({self.source})"


@dataclass
class CodeList:
    """Every code with its title: what ``bndoctor explain`` without a code prints."""

    rows: list[tuple[str, str, str]]  # code, title, where it is found

    def to_json(self) -> list[dict[str, str]]:
        return [{"code": code, "title": title, "source": source} for code, title, source in self.rows]

    def to_text(self) -> str:
        width = max(len(code) for code, _, _ in self.rows)
        lines = [f"{code.ljust(width)}  {title}" for code, title, _ in self.rows]
        return "\n".join([*lines, "", "bndoctor explain CODE says what a code means, why it matters and how to fix it"])


def run(args: argparse.Namespace) -> Explanation | CodeList:
    from ..diagnose import CHECKS

    if args.code is None:
        rows = [(c.code, c.title, "bndoctor check") for c in CHECKS.values()]
        runtime = [a for a in RUNTIME_CODES.values() if a.code not in CHECKS]
        rows += [(a.code, a.title, "found while a model trains") for a in runtime]
        return CodeList(sorted(rows))
    code = args.code.strip().upper()
    if code in CHECKS:
        check = CHECKS[code]
        text = inspect.getdoc(check.fn) or "(this check has no docstring)"
        if code in RUNTIME_CODES:  # the monitor measures the same failure while the model trains: both claims
            alert = RUNTIME_CODES[code]
            text += f"\n\nWhile a model trains: {alert.title}. {alert.explanation}"
            return Explanation(code, check.title, text, "bndoctor check; found while a model trains")
        return Explanation(code, check.title, text, "bndoctor check")
    if code in RUNTIME_CODES:
        alert = RUNTIME_CODES[code]
        return Explanation(code, alert.title, alert.explanation, "found while a model trains")
    known = ", ".join(sorted({*CHECKS, *RUNTIME_CODES}))
    raise BNDoctorError(f"unknown finding code {args.code!r}", hint=f"codes: {known}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("code", metavar="CODE", nargs="?", help="a finding code, e.g. BN101 (none: list them all)")


COMMAND = Command("explain", "what a finding code means, why it matters and how to fix it", add_arguments, run)

"""``bndoctor.fix``: apply what a report's findings prescribe, through the remedy registry."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch.nn as nn

from .. import remedies as _remedies  # noqa: F401  (registers the built-in remedies)
from ..errors import BNDoctorError, require_module
from ..findings import Action, Finding
from ..remedies import REMEDIES, apply_actions
from ._core import Report

__all__ = ["FixResult", "fix"]


@dataclass
class FixResult:
    """The repaired model and one line per change; unpacks as ``model, changes = bndoctor.fix(...)``.

    ``skipped`` lists what was left alone and why (an action without a fixer,
    a layer a conversion cannot handle).
    """

    model: nn.Module
    changes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter((self.model, self.changes))


def _fixable(findings: list[Finding]) -> tuple[list[Action], list[str]]:
    """The findings' actions that a fixer is registered for, and the findings whose action has none."""
    actions: list[Action] = []
    unknown = []
    for finding in findings:
        action = finding.action
        if action is None:
            continue
        remedy = REMEDIES.get(action.name)
        if remedy is None or remedy.fix is None:
            unknown.append(
                f"{finding.code} {finding.where} (no fixer is registered for action {action.name!r}: "
                "bndoctor.remedies.register_fix)"
            )
            continue
        actions.append(action)  # apply_actions merges the actions of one remedy, each distinct one once
    return actions, unknown


def fix(model: nn.Module, report: Report, *, inplace: bool = False) -> FixResult:
    """Apply the repairs that ``report``'s findings prescribe.

    Each finding's action is applied by the fixer registered under its name
    (:mod:`bndoctor.remedies`), in the remedies' fixed order
    (:func:`bndoctor.remedies.apply_actions`): drop redundant biases (exact: the
    bias moves into the BN's running mean), float32 statistics, momentum, SyncBN
    without processes back to BN, freezing, accumulation-aware BN (with SyncBN
    first when it pools across ranks), SyncBN, Batch Renorm, GroupNorm, then
    remedies you registered.

    Args:
        model: the model the report was made for.
        report: what :func:`bndoctor.check` returned.
        inplace: repair ``model`` itself; by default a copy is repaired and ``model`` is untouched.

    Returns:
        A :class:`FixResult`: the repaired model, one line per change, and ``skipped``: findings without a
        mechanical fix (e.g. eps, layers never reached), actions without a registered fixer, layers a
        conversion left alone. It unpacks as ``model, changes = bndoctor.fix(model, report)``.
    """
    require_module(model)
    if not isinstance(report, Report):
        raise BNDoctorError(
            f"expected a bndoctor.diagnose.Report (got {type(report).__name__})",
            hint="report = bndoctor.check(model, setup); bndoctor.fix(model, report)",
        )
    target = model if inplace else copy.deepcopy(model)
    result = FixResult(target)
    result.skipped = [f"{f.code} {f.where}" for f in report.findings if f.action is None and f.severity != "info"]
    actions, unknown = _fixable(report.findings)
    result.skipped += unknown
    done = apply_actions(target, actions, layer_shapes=report.layer_shapes)
    result.model = done.model
    result.changes += done.changes
    result.skipped += done.skipped
    return result

"""Diagnosis: ``check`` runs registered checks on a model and its training setup; ``fix`` applies them.

    report = bndoctor.check(model, bndoctor.TrainingSetup(micro_batch=2, accum_steps=32),
                            input_shape=(3, 224, 224))
    print(report)                        # findings grouped by severity, with fixes
    model, changes = bndoctor.fix(model, report)

Checks are registered functions (:func:`register_check`): per module type,
looked up along each module's class hierarchy, or for the whole model. Each
returns :class:`~bndoctor.findings.Finding` objects with a stable code
(``BN101``...), a severity, the module's qualified name, the numbers, one
sentence of explanation and the fix. ``fix`` dispatches each finding's action
to the fixer registered in :mod:`bndoctor.remedies`.

Modules: ``_core`` (Report, Context, the check registry), ``builtin`` (the
built-in checks), ``_trace`` (shapes from a forward on meta tensors), ``_run``
(``check``), ``_fix`` (``fix``).
"""

from ..findings import Action, Finding, Severity
from ..training import TrainingSetup
from ._core import CHECKS, Check, CheckFailedError, Context, Report, register_check
from ._fix import FixResult, fix
from ._run import check

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

"""Exceptions and warnings raised by bndoctor.

Every error says three things: what was expected, what was found, and how to
fix it. The CLI prints ``str(error)`` on one line and ``error.hint`` on the
next, so the message must stand alone and the hint must be an action.
"""

from __future__ import annotations

__all__ = [
    "BNDoctorError",
    "BNDoctorWarning",
    "GroupCountError",
    "MissingRunningStatsError",
    "ModuleSelectionError",
    "NonFiniteStatisticsError",
    "NotAModuleError",
    "UninitializedLayerError",
]


class BNDoctorError(ValueError):
    """Base class of every error bndoctor raises for bad input.

    ``hint`` is a short, actionable suggestion (may be empty).
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint

    def __reduce__(self):  # keep the hint when the error crosses processes
        return (type(self), (self.args[0], self.hint))


class NotAModuleError(BNDoctorError, TypeError):
    """A function that walks a module tree received something else."""


class MissingRunningStatsError(BNDoctorError):
    """An operation needs running statistics that a BN layer does not keep."""


class UninitializedLayerError(BNDoctorError):
    """A lazy layer has not seen its first input yet, so its shape is unknown."""


class GroupCountError(BNDoctorError):
    """A requested number of groups does not divide a layer's channels."""


class ModuleSelectionError(BNDoctorError):
    """A ``modules=`` selection names nothing in the model."""


class NonFiniteStatisticsError(BNDoctorError):
    """Statistics computed from the data hold NaN or Inf (the data, or weights that diverged)."""


class BNDoctorWarning(UserWarning):
    """Something was skipped or approximated; the message says what and why."""


def require_module(obj: object, argument: str = "model") -> None:
    """Raise :class:`NotAModuleError` unless ``obj`` is an ``nn.Module``."""
    import torch.nn as nn

    if not isinstance(obj, nn.Module):
        found = type(obj).__name__
        raise NotAModuleError(
            f"expected `{argument}` to be a torch.nn.Module (got {found})",
            hint="pass the model object itself, e.g. bndoctor.find_bn(model), not its state_dict or a list of modules",
        )


def caller_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called from here that names the user's line, not torch's or ours.

    A warning raised inside a layer's forward otherwise points into
    ``torch/nn/modules/module.py``; this walks out of torch and bndoctor to
    the first frame of the caller (the training loop, or the framework that
    runs it).
    """
    import os
    import sys

    import torch

    inside = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame = frame.f_back
        level += 1
    return level

"""The small public protocol through which ``check``, the monitor and the remedies ask a layer about itself.

Nothing outside ``layers/`` reads a layer's private state: a layer says which
batch its training statistics span, whether statistics are still pending, and
which statistics it will normalise the current input with. bndoctor's layers
subclass :class:`BNDoctorLayer`; any other class (torch's own, a user's) may
answer the same attributes, and the functions below fall back to plain
BatchNorm's answers when it does not.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import BNDoctorError

__all__ = [
    "BNDoctorLayer",
    "is_small_batch_remedy",
    "normalisation_statistics",
    "pools_ranks",
    "pools_window",
    "window_open",
]


class BNDoctorLayer:
    """Mixin for normalisation layers: the protocol answers, with plain BatchNorm's defaults.

    * ``pools_window`` (class attribute): training statistics span the
      gradient-accumulation window, so the normalisation batch is micro-batch x
      accumulation steps.
    * ``pools_ranks`` (property): training statistics span the ranks of the
      layer's process group.
    * ``small_batch_remedy`` (class attribute): the layer is itself a remedy
      for small normalisation batches (``check`` does not prescribe another).
    * ``window_open`` (property): statistics of forward passes are waiting to
      be committed to the running statistics.
    * :meth:`normalisation_statistics`: the ``(count, mean, biased var)`` the
      layer will normalise an input with, given that input's own batch
      moments; ``None`` means "the input's own statistics" (plain BN).

    It also accepts inputs of any rank >= 2 (``(N, C)``, ``(N, C, L)``,
    ``(N, C, H, W)``, ``(N, C, D, H, W)``), which torch's dimension-specific
    classes do not.
    """

    pools_window: ClassVar[bool] = False
    small_batch_remedy: ClassVar[bool] = False

    @property
    def pools_ranks(self) -> bool:
        return False

    @property
    def window_open(self) -> bool:
        return False

    def normalisation_statistics(
        self, mean: torch.Tensor, var: torch.Tensor, n: int
    ) -> tuple[float, torch.Tensor, torch.Tensor] | None:
        return None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise BNDoctorError(
                f"expected at least 2D input (got {input.dim()}D input)",
                hint=f"{type(self).__name__} normalises dimension 1 of (N, C, ...) inputs",
            )


def pools_ranks(module: nn.Module) -> bool:
    """Whether the layer's training statistics span several ranks (torch's SyncBatchNorm included)."""
    return isinstance(module, nn.SyncBatchNorm) or bool(getattr(module, "pools_ranks", False))


def pools_window(module: nn.Module) -> bool:
    """Whether the layer's training statistics span the accumulation window."""
    return bool(getattr(module, "pools_window", False))


def is_small_batch_remedy(module: nn.Module) -> bool:
    """Whether the layer is itself a remedy for small normalisation batches (AccumBatchNorm, BatchRenorm)."""
    return bool(getattr(module, "small_batch_remedy", False))


def window_open(module: nn.Module) -> bool:
    """Whether the layer holds statistics not yet committed to its running statistics."""
    return bool(getattr(module, "window_open", False))


def normalisation_statistics(
    module: nn.Module, mean: torch.Tensor, var: torch.Tensor, n: int
) -> tuple[float, torch.Tensor, torch.Tensor] | None:
    """The ``(count, mean, biased var)`` ``module`` normalises with, or ``None`` for the input's own."""
    answer: Any = getattr(module, "normalisation_statistics", None)
    return answer(mean, var, n) if callable(answer) else None

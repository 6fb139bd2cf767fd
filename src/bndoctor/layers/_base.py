"""The small public protocol through which ``check``, the monitor and the remedies ask a layer about itself.

Nothing outside ``layers/`` reads a layer's private state: a layer says which
batch its training statistics span, whether statistics are still pending, and
which statistics it will normalise the current input with. bndoctor's layers
subclass :class:`BNDoctorLayer`; any other class (torch's own, a user's) may
answer the same attributes, and the functions below fall back to plain
BatchNorm's answers when it does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import BNDoctorError

__all__ = [
    "POST_OPS",
    "BNDoctorLayer",
    "PostOps",
    "apply_post_ops",
    "is_small_batch_remedy",
    "normalisation_statistics",
    "pools_ranks",
    "pools_window",
    "post_ops",
    "window_open",
]


#: Children that a norm+activation layer applies after normalising, in this order (timm's convention).
POST_OPS = ("drop", "act")


def post_ops(module: nn.Module) -> dict[str, nn.Module]:
    """The ``drop`` and ``act`` children ``module`` has, by name (empty for plain BatchNorm)."""
    children = module._modules
    return {name: children[name] for name in POST_OPS if children.get(name) is not None}


def apply_post_ops(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """``act(drop(out))`` with whichever of the two children ``module`` has (none: ``out`` itself)."""
    children = module._modules
    if children:
        for name in POST_OPS:
            child = children.get(name)
            if child is not None:
                out = child(out)
    return out


class PostOps(nn.Module):
    """What is left of a norm+activation layer once its normalisation is folded away: ``act(drop(x))``.

    Holds the original ``drop`` and ``act`` objects under the same names, so
    their parameters (a PReLU's) keep their state_dict keys.
    """

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name in POST_OPS:
            if name in children:
                self.add_module(name, children[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_post_ops(self, x)


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

    A subclass implements ``_normalise(input)`` (default: torch's BatchNorm);
    ``forward`` applies it and then the layer's ``drop`` and ``act`` children
    when it has them, so a
    norm+activation layer (timm's ``BatchNormAct2d``) converted to a bndoctor
    layer keeps its dropout and activation (see :data:`POST_OPS`).
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
    ) -> tuple[float | torch.Tensor, torch.Tensor, torch.Tensor] | None:
        return None

    def _normalise(self, input: torch.Tensor) -> torch.Tensor:
        """The normalisation itself; by default torch's BatchNorm (a subclass overrides it)."""
        return _BatchNorm.forward(self, input)  # type: ignore[arg-type]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return apply_post_ops(self, self._normalise(input))

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise BNDoctorError(
                f"expected at least 2D input (got {input.dim()}D input)",
                hint=f"{type(self).__name__} normalises dimension 1 of (N, C, ...) inputs",
            )


_REPLAYING = [0]  # open replays of an accumulation window (exact mode)


def replaying() -> bool:
    """Whether the exact accumulation mode is replaying a window now (the monitor does not count those calls)."""
    return _REPLAYING[0] > 0


@contextmanager
def replay_scope() -> Iterator[None]:
    """Mark the calls inside as a replay of a window, not as training forwards."""
    _REPLAYING[0] += 1
    try:
        yield
    finally:
        _REPLAYING[0] -= 1


_IS_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", None)


def compiling() -> bool:
    """Whether torch.compile is tracing this call (``torch.compiler.is_compiling`` where it exists).

    Looked up once: the layers ask several times per forward.
    """
    return _IS_COMPILING is not None and bool(_IS_COMPILING())


def snapshot(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that torch.compile's backward partitioner saves rather than recomputes.

    Batch Renorm derives what its backward needs (r and d) from buffers that
    the same forward then updates in place (the step count, the running
    statistics). AOTAutograd's min-cut partitioner may recompute such cheap
    values in the backward instead of saving them, and a recomputation reads
    the buffers after the update, which makes the compiled gradients wrong
    (pytorch/pytorch PR #197039). A flip is not on the partitioner's list of
    ops it recomputes freely, so its output — here a copy, flipping a
    dimension of size 1 — is saved from the forward: the layers pass the values
    their backward needs through it when traced (eager autograd saves what it
    needs).

    It is not a guarantee: a value whose only use is in the backward can be
    computed there, flip included, from the graph's inputs, such as the
    progressive gradient's n / count from a window written in place. So
    accumulation-aware BN replaces its window instead of writing it where its
    backward needs such a value (``AccumBatchNorm._writes_window_in_place``).
    tests/layers/test_compile.py checks the outcome for every layer and mode,
    so a torch whose partitioner changes fails there, not silently.
    """
    return t.unsqueeze(0).flip(0).squeeze(0)


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
) -> tuple[float | torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The ``(count, mean, biased var)`` ``module`` normalises with, or ``None`` for the input's own.

    The count is a number or a 0-d tensor (read it with ``float``; layers keep it on the device).

    ``mean``, ``var`` (biased) and ``n`` (values per channel) describe the
    current input; accumulation-aware BN answers with its window so far.
    """
    answer: Any = getattr(module, "normalisation_statistics", None)
    return answer(mean, var, n) if callable(answer) else None

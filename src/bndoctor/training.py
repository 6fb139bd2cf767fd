"""How the model will be trained: the numbers that decide what BatchNorm sees.

At the bottom of the package because checks, remedies (their prescriptions)
and the CLI all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._validate import positive_int
from .errors import BNDoctorError

__all__ = ["PRECISIONS", "TRAINERS", "TrainingSetup", "torch_optimizer"]

PRECISIONS = ("fp32", "fp16", "bf16")
#: the trainers whose bndoctor callback does the training-loop steps itself (fix texts say so)
TRAINERS = ("lightning", "huggingface")


@dataclass(frozen=True)
class TrainingSetup:
    """How the model will be trained: the numbers that decide what BatchNorm sees.

    ``micro_batch`` is the physical batch per device and forward pass,
    ``accum_steps`` the micro-batches per optimizer step, ``world_size`` the
    number of data-parallel processes, ``sync_bn`` whether BN statistics are
    synchronised across them (e.g. by the framework), ``finetune`` whether the
    model starts from pretrained weights, ``precision`` the training precision,
    ``trainer`` the framework that trains it with bndoctor's callback
    (``"lightning"`` or ``"huggingface"``; ``None`` for a loop of your own):
    the fixes then name the step that fits it (the callback attaches what a
    loop of your own would call by hand).
    """

    micro_batch: int
    accum_steps: int = 1
    world_size: int = 1
    sync_bn: bool = False
    finetune: bool = False
    precision: str = "fp32"
    trainer: str | None = None

    def __post_init__(self) -> None:
        for name in ("micro_batch", "accum_steps", "world_size"):
            positive_int(
                getattr(self, name),
                f"TrainingSetup.{name}",
                hint="e.g. TrainingSetup(micro_batch=2, accum_steps=32, world_size=4)",
            )
        if self.precision not in PRECISIONS:
            raise BNDoctorError(
                f"expected precision one of {', '.join(PRECISIONS)} (got {self.precision!r})",
                hint="fp16 and bf16 mean mixed precision (autocast) or a model cast to that type",
            )
        if self.trainer is not None and self.trainer not in TRAINERS:
            raise BNDoctorError(
                f"expected trainer one of {', '.join(TRAINERS)} or None (got {self.trainer!r})",
                hint="None means a training loop of your own",
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
            "trainer": self.trainer,
            "logical_batch": self.logical_batch,
        }


def torch_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` inside a framework's wrapper (Accelerate's, Lightning's), else ``optimizer``.

    Hooks belong on the inner optimizer: its ``step()`` runs once per real
    update (Accelerate skips it on accumulation micro-steps), and wrappers
    that do not call ``Optimizer.__init__`` have no hook tables of their own.
    Raises :class:`~bndoctor.errors.BNDoctorError` for anything else.
    """
    import torch

    seen = optimizer
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__module__.startswith(
        ("accelerate", "lightning", "pytorch_lightning")
    ):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise BNDoctorError(
            f"expected a torch.optim.Optimizer (got {type(seen).__name__})",
            hint="pass the optimizer whose step() ends each accumulation window",
        )
    return optimizer

"""PyTorch Lightning callback: run :class:`bndoctor.BNMonitor` during ``fit``.

    from bndoctor.integrations.lightning import BNMonitorCallback
    trainer = lightning.Trainer(callbacks=[BNMonitorCallback(every=100, recalibrate=True)])

Records go to ``<default_root_dir>/bn_monitor.jsonl`` by default (rank 0);
render them with ``bndoctor report``. At the end of each training epoch the
callback can recalibrate BN statistics on the training data (PreciseBN,
``recalibrate=True``) and merge running statistics across ranks
(``merge_ranks=True``). Its state (counters, alerts already raised) is saved
in Lightning checkpoints, so a resumed run does not repeat alerts.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the standalone package
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError as exc:
        raise ModuleNotFoundError(
            "bndoctor.integrations.lightning needs PyTorch Lightning: pip install 'bndoctor[lightning]'"
        ) from exc

from ..errors import BNDoctorError
from ._epoch import MonitorCallbackCore

__all__ = ["BNMonitorCallback"]


def _own_methods(module: Any) -> set[str]:
    """Methods defined by the user's classes, not by LightningModule or nn.Module."""
    from torch import nn

    names: set[str] = set()
    for cls in type(module).__mro__:
        if cls.__module__.startswith(("lightning", "pytorch_lightning")) or cls is nn.Module:
            break
        names.update(vars(cls))
    return names


class BNMonitorCallback(MonitorCallbackCore, Callback):
    """Monitor BN health while Lightning trains; optionally recalibrate and merge ranks each epoch.

    ``sink="auto"`` writes ``bn_monitor.jsonl`` in the trainer's
    ``default_root_dir``; pass a path, a sink object, a list, or ``None``.
    Other keyword arguments go to :class:`bndoctor.BNMonitor` (``every``,
    ``modules``, ``warmup``, ...). ``recalibrate_samples`` caps the samples
    used for recalibration (default: the whole training loader).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)  # arguments: see MonitorCallbackCore
        self._pending_state: dict[str, Any] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self.monitor is not None:
            return
        if self.recalibrate and self.recalibrate_forward is None and "forward" not in _own_methods(pl_module):
            raise BNDoctorError(
                f"recalibrate=True feeds batches to {type(pl_module).__name__}(x), which defines no forward",
                hint="define forward() on the LightningModule or pass recalibrate_forward=lambda module, batch: "
                "module.net(batch[0])",
            )
        self._start(pl_module, trainer.default_root_dir, self._pending_state)
        self._pending_state = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.noise_scale:
            self._start_noise(
                pl_module,
                trainer.optimizers[0],
                getattr(trainer.train_dataloader, "batch_size", None),
                trainer.accumulate_grad_batches,
                trainer.world_size,
            )

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is not None:
            self.monitor.set_step(trainer.global_step)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_end(pl_module, trainer.train_dataloader, trainer.current_epoch)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._stop()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.monitor is None else {"monitor": self.monitor.state_dict(), "epochs": self.epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = list(state_dict.get("epochs", []))
        state = state_dict.get("monitor")
        if state is None:
            return
        if self.monitor is None:
            self._pending_state = state
        else:
            self.monitor.load_state_dict(state)

"""PyTorch Lightning callback: run :class:`bndoctor.BNMonitor` during ``fit``.

    from bndoctor.integrations.lightning import BNMonitorCallback
    trainer = lightning.Trainer(callbacks=[BNMonitorCallback(every=100, recalibrate=True)])

Records go to ``bn_monitor.jsonl`` beside the logger's files (``lightning_logs/version_N``; the
trainer's ``default_root_dir`` without a logger) by default (rank 0);
render them with ``bndoctor report``. Summary scalars (``bn/effective_batch_min``,
``bn/rank_divergence``, ``noise/b_simple``, ...) go to the trainer's loggers
through ``LightningModule.log_dict``. Models with accumulation-aware BN get
their window control attached to the trainer's optimizer. Under DDP use
:class:`bndoctor.integrations.lightning.BNDoctorSync` (``plugins=[...]``)
instead of ``sync_batchnorm=True``. At the end of each training epoch the
callback can recalibrate BN statistics on the training data (PreciseBN,
``recalibrate=True``) and merge running statistics across ranks
(``merge_ranks=True``). Its state (counters, alerts already raised) is saved
in Lightning checkpoints, so a resumed run does not repeat alerts.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins import LayerSync
except ImportError:  # pragma: no cover - the standalone package
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
        from pytorch_lightning.plugins import LayerSync  # type: ignore[no-redef]
    except ImportError as exc:
        raise ModuleNotFoundError(
            "bndoctor.integrations.lightning needs PyTorch Lightning: pip install 'bndoctor[lightning]'"
        ) from exc

import torch.nn as nn

from ..errors import BNDoctorError
from ._epoch import MonitorCallbackCore

__all__ = ["BNDoctorSync", "BNMonitorCallback"]


def _own_methods(module: Any) -> set[str]:
    """Methods defined by the user's classes, not by LightningModule or nn.Module."""
    from torch import nn

    names: set[str] = set()
    for cls in type(module).__mro__:
        if cls.__module__.startswith(("lightning", "pytorch_lightning")) or cls is nn.Module:
            break
        names.update(vars(cls))
    return names


def _run_dir(trainer: Any) -> str:
    """The logger's folder (``lightning_logs/version_N``) when the trainer has a logger, else its root folder."""
    if trainer.loggers:
        log_dir = trainer.log_dir
        if log_dir:
            return str(log_dir)
    return str(trainer.default_root_dir)


class BNMonitorCallback(MonitorCallbackCore, Callback):
    """Monitor BN health while Lightning trains; optionally recalibrate and merge ranks each epoch.

    ``sink="auto"`` writes ``bn_monitor.jsonl`` in the logger's folder
    (``trainer.log_dir``), or the trainer's ``default_root_dir`` when it has
    no logger; pass a path, a sink object, a list, or ``None``. When training
    starts, :func:`bndoctor.check` runs with the trainer's setup
    (``check=False`` turns it off).
    Other keyword arguments go to :class:`bndoctor.BNMonitor` (``every``,
    ``modules``, ``warmup``, ...). ``recalibrate_samples`` caps the samples
    used for recalibration (default: the whole training loader).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)  # arguments: see MonitorCallbackCore
        self._pending_state: dict[str, Any] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self.recalibrate and self.recalibrate_forward is None and "forward" not in _own_methods(pl_module):
            raise BNDoctorError(
                f"recalibrate=True feeds batches to {type(pl_module).__name__}(x), which defines no forward",
                hint="define forward() on the LightningModule or pass recalibrate_forward=lambda module, batch: "
                "module.net(batch[0])",
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # here, not in setup(): the strategy's layer sync (BNDoctorSync) has replaced the BN layers by now
        self._start(pl_module, _run_dir(trainer), self._pending_state)
        self._pending_state = None
        self._check(
            pl_module,
            "lightning",
            getattr(trainer.train_dataloader, "batch_size", None),
            accum_steps=int(trainer.accumulate_grad_batches),
            world_size=int(trainer.world_size),
            sync_bn=getattr(trainer.strategy, "_layer_sync", None) is not None,
        )
        if trainer.optimizers:
            self._attach(pl_module, trainer.optimizers[0])
        if self.noise_scale:
            self._start_noise(
                pl_module,
                trainer.optimizers[0],
                getattr(trainer.train_dataloader, "batch_size", None),
                trainer.accumulate_grad_batches,
                trainer.world_size,
            )

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # exact accumulation: the window's last micro-batch has run (inside the optimizer's closure), and
        # gradient clipping comes next, so the window is replayed and its gradient corrected here
        from ..remedies._replay import exact_layers

        if any(layer.controlled for layer in exact_layers(pl_module)):
            from ..remedies import correct_window

            correct_window(pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is not None:
            self.monitor.set_step(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = self._metrics()
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

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
        if self.monitor is None or self.monitor.closed:  # restored before on_train_start builds the monitor
            self._pending_state = state
        else:
            self.monitor.load_state_dict(state)


class BNDoctorSync(LayerSync):
    """Lightning's layer-sync plugin with bndoctor's synchronisation: ``Trainer(plugins=[BNDoctorSync()])``.

    Use it instead of ``Trainer(sync_batchnorm=True)``, which converts every
    BN (bndoctor's layers too) to ``torch.nn.SyncBatchNorm``: that layer does
    not train on CPU, and it turns accumulation-aware BN back into plain BN.
    Here BatchNorm layers become :class:`bndoctor.SyncBatchNorm` (every
    backend, gloo included) and accumulation-aware layers keep their windows
    and pool them across ranks (``sync=True``). Lightning applies it when
    ``fit`` sets up a distributed strategy and reverts it at teardown: the
    layers are converted in place (Lightning keeps the module object) and
    reverted to the classes they had, with the statistics learnt.

    ``modules`` selects layers as everywhere in bndoctor (default: all);
    ``group`` is a process group of ``torch.distributed`` (default: the world).
    """

    def __init__(self, modules: Any = None, group: Any = None) -> None:
        self.modules = modules
        self.group = group
        self._synced: list[str] = []  # accumulation-aware layers apply() made pool across ranks
        self._converted: list[str] = []  # BN layers apply() made SyncBatchNorm

    def apply(self, model: Any) -> Any:
        from .. import to_sync_bn
        from .._walk import find_bn, select
        from ..layers import AccumBatchNorm, SyncBatchNorm

        records = select(find_bn(model), self.modules)
        accum = [r for r in records if isinstance(r.module, AccumBatchNorm) and not r.module.sync]
        plain = [r for r in records if not r.frozen and not isinstance(r.module, (AccumBatchNorm, SyncBatchNorm))]
        for record in accum:
            record.module.sync = True
            record.module.process_group = self.group
        self._synced = [r.name for r in accum]
        if plain:
            to_sync_bn(model, self.group, modules=[r.name for r in plain], inplace=True)
        # torch's SyncBatchNorm stays bndoctor's at revert: it has no single-process BatchNorm class to return to
        self._converted = [r.name for r in plain if not isinstance(r.module, nn.SyncBatchNorm)]
        return model

    def revert(self, model: Any) -> Any:
        from .. import from_sync_bn

        modules = dict(model.named_modules())
        for name in self._synced:
            layer = modules.get(name)
            if layer is not None:
                layer.sync = False
                layer.process_group = None
        if self._converted:
            from_sync_bn(model, modules=self._converted, inplace=True)
        self._synced, self._converted = [], []
        return model

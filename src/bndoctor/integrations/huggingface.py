"""Hugging Face ``TrainerCallback``: run :class:`bndoctor.BNMonitor` inside ``transformers.Trainer``.

    from bndoctor.integrations.huggingface import BNMonitorTrainerCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[BNMonitorTrainerCallback(every=100)])

Records go to ``<output_dir>/bn_monitor.jsonl`` by default (main process);
render them with ``bndoctor report``. At each epoch end the callback can
recalibrate BN statistics on the training dataloader (batches are dicts,
passed to the model as keyword arguments) and merge running statistics
across ranks.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "bndoctor.integrations.huggingface needs transformers: pip install 'bndoctor[hf]'"
    ) from exc

from ._epoch import MonitorCallbackCore

__all__ = ["BNMonitorTrainerCallback"]


class BNMonitorTrainerCallback(MonitorCallbackCore, TrainerCallback, ExportableState):
    """Monitor BN health while the HF Trainer trains; optionally recalibrate and merge ranks each epoch.

    Arguments as :class:`bndoctor.integrations.lightning.BNMonitorCallback`.
    ``state()``/``from_state`` follow transformers' exportable-callback
    protocol, so the monitor's counters and raised alerts survive a resume.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)  # arguments: see MonitorCallbackCore
        self.monitor_state: dict[str, Any] | None = None  # set by the Trainer when it resumes a checkpoint

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.monitor is None and model is not None:
            self._start(model, args.output_dir, self.monitor_state)
            self.monitor_state = None
            if self.noise_scale and kwargs.get("optimizer") is not None:
                self._start_noise(
                    model,
                    kwargs["optimizer"],
                    args.per_device_train_batch_size,
                    args.gradient_accumulation_steps,
                    args.world_size,
                )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.set_step(state.global_step)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            self._epoch_end(model, kwargs.get("train_dataloader"), state.epoch)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._stop()

    def state(self) -> dict[str, Any]:
        """What the Trainer stores in checkpoints (JSON): the arguments and the monitor's counters."""
        return {
            "args": {
                "sink": self.sink if isinstance(self.sink, str) or self.sink is None else "auto",
                "recalibrate": self.recalibrate,
                "recalibrate_samples": self.recalibrate_samples,
                "merge_ranks": self.merge_ranks,
                "noise_scale": self.noise_scale,
                "noise_micro_batch": self.noise_micro_batch,
                **{k: v for k, v in self.monitor_options.items() if isinstance(v, (int, float, str, bool))},
            },
            "attributes": {"monitor_state": None if self.monitor is None else self.monitor.state_dict()},
        }

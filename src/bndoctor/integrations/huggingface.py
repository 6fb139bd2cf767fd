"""Hugging Face ``TrainerCallback``: run :class:`bndoctor.BNMonitor` inside ``transformers.Trainer``.

    from bndoctor.integrations.huggingface import BNMonitorTrainerCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[BNMonitorTrainerCallback(every=100)])

Records go to ``<output_dir>/bn_monitor.jsonl`` by default (main process);
render them with ``bndoctor report``. Summary scalars (``bn/effective_batch_min``,
``bn/rank_divergence``, ``noise/b_simple``, ...) are added to the Trainer's
logs, so they reach whatever ``report_to`` names (TensorBoard, W&B, MLflow)
and ``state.log_history``' printouts. Models with accumulation-aware BN get
their window control attached to the Trainer's optimizer
(``gradient_accumulation_steps`` needs nothing else). At each epoch end the callback can
recalibrate BN statistics on the training dataloader (batches are dicts,
passed to the model as keyword arguments) and merge running statistics
across ranks.
"""

from __future__ import annotations

import sys
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
        self._log_first(sys._getframe(1))
        if model is not None:
            self._start(model, args.output_dir, self.monitor_state)
            self.monitor_state = None
            self._check(
                model,
                "huggingface",
                args.per_device_train_batch_size,
                accum_steps=int(args.gradient_accumulation_steps),
                world_size=int(args.world_size),
            )
            self._attach(model, kwargs.get("optimizer"))
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

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if isinstance(logs, dict):
            logs.update(self._metrics())

    def _log_first(self, caller: Any) -> None:
        """Run before the reporting callbacks in ``on_log``, so that they send the metrics added to ``logs``.

        The Trainer puts the ``report_to`` callbacks ahead of the user's;
        ``on_log`` hands every callback the same ``logs`` dict. This moves
        this callback to the front of the handler that calls it (found as
        the caller of ``on_train_begin``). Moving it during that call is
        safe: the callbacks after it keep their positions. Without a handler
        (a future Trainer) the metrics stay in the run file only.
        """
        handler = caller.f_locals.get("self") if caller is not None else None
        callbacks = getattr(handler, "callbacks", None)
        if not self.log_metrics or not isinstance(callbacks, list) or self not in callbacks or callbacks[0] is self:
            return
        callbacks.remove(self)
        callbacks.insert(0, self)

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
                "attach": self.attach,
                "log_metrics": self.log_metrics,
                **{k: v for k, v in self.monitor_options.items() if isinstance(v, (int, float, str, bool))},
            },
            "attributes": {"monitor_state": None if self.monitor is None else self.monitor.state_dict()},
        }

"""What both callbacks do at the end of an epoch: recalibrate, merge ranks, and build the monitor."""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch.nn as nn

from .. import distributed
from .._validate import positive_int
from ..errors import BNDoctorError
from ..monitor import BNMonitor

log = logging.getLogger("bndoctor.integrations")


def make_monitor(model: nn.Module, sink: Any, default_dir: str, options: dict[str, Any]) -> BNMonitor:
    if sink == "auto":
        sink = os.path.join(default_dir, "bn_monitor.jsonl")
    return BNMonitor(model, sink=sink, **options)


def end_of_epoch(
    model: nn.Module,
    data: Any,
    *,
    recalibrate: bool,
    recalibrate_samples: int | None,
    merge_ranks: bool,
    forward: Any = None,
) -> dict[str, Any]:
    """Recalibrate BN statistics on ``data`` and/or merge them across ranks; returns what was done."""
    done: dict[str, Any] = {}
    if recalibrate and data is not None:
        from ..stats import recalibrate as run_recalibration

        report = run_recalibration(model, data, num_samples=recalibrate_samples, forward=forward, progress=False)
        done["recalibrated_samples"] = report.samples
    if merge_ranks and distributed.active():
        from ..ranks import merge_running_stats

        merge_running_stats(model)
        done["merged_ranks"] = distributed.world_size()
    return done


class MonitorCallbackCore:
    """What the Lightning and Hugging Face callbacks share: options, the monitor, the epoch-end work.

    Keyword arguments (validated here, when the callback is built):

    * ``sink``: ``"auto"`` writes ``bn_monitor.jsonl`` in the trainer's output
      folder; or a path, a sink object, a list of them, or ``None``.
    * ``recalibrate``: recalibrate BN statistics on the training data at the
      end of each epoch (PreciseBN); ``recalibrate_samples`` caps the samples
      (default: the whole loader); ``recalibrate_forward(model, batch)`` says
      how a batch is fed.
    * ``merge_ranks``: merge running statistics across ranks at each epoch end.
    * ``noise_scale``: track the gradient noise scale on the trainer's
      optimizer; ``noise_micro_batch`` when the loader does not say its batch size.
    * ``attach``: attach what the model's bndoctor layers need from the
      training loop to the trainer's optimizer (default ``True``): the window
      control of accumulation-aware BN (:func:`bndoctor.accumulate_bn`), so
      ``to_accum_bn`` models need no extra call. Skipped where the user
      attached it already.
    * ``check``: run :func:`bndoctor.check` when training starts, with the
      setup the trainer knows (micro-batch, accumulation steps, world size,
      synchronised BN, the trainer itself, so the fixes name its steps); the
      findings are logged as one line (``bndoctor.integrations`` logger), kept
      in ``callback.check_report`` and written to the run file (default ``True``).
    * ``log_metrics``: send summary scalars (``bn/effective_batch_min``, ...,
      see :meth:`bndoctor.BNMonitor.pop_metrics`) to the trainer's loggers
      (default ``True``).
    * anything else goes to :class:`bndoctor.BNMonitor` (``every``, ``modules``, ``warmup``, ...).

    Cooperative: it calls ``super().__init__()``, so the framework's callback
    base class is initialised too.
    """

    def __init__(
        self,
        *,
        sink: Any = "auto",
        recalibrate: bool = False,
        recalibrate_samples: int | None = None,
        recalibrate_forward: Any = None,
        merge_ranks: bool = False,
        noise_scale: bool = False,
        noise_micro_batch: int | None = None,
        attach: bool = True,
        check: bool = True,
        log_metrics: bool = True,
        **monitor_options: Any,
    ) -> None:
        super().__init__()
        positive_int(recalibrate_samples, "recalibrate_samples", none_ok=True, hint="e.g. recalibrate_samples=2048")
        positive_int(noise_micro_batch, "noise_micro_batch", none_ok=True, hint="samples per device per forward")
        if recalibrate_forward is not None and not callable(recalibrate_forward):
            raise BNDoctorError(
                f"expected recalibrate_forward to be callable (got {type(recalibrate_forward).__name__})",
                hint="recalibrate_forward=lambda model, batch: model(batch[0])",
            )
        accepted = [n for n in inspect.signature(BNMonitor).parameters if n not in ("model", "sink")]
        unknown = sorted(set(monitor_options) - set(accepted))
        if unknown:
            raise BNDoctorError(
                f"unknown option(s) {', '.join(unknown)} for the BN monitor callback",
                hint=f"monitor options are {', '.join(accepted)}; see MonitorCallbackCore for the others",
            )
        self.sink = sink
        self.recalibrate = bool(recalibrate)
        self.recalibrate_samples = recalibrate_samples
        self.recalibrate_forward = recalibrate_forward
        self.merge_ranks = bool(merge_ranks)
        self.noise_scale = bool(noise_scale)
        self.noise_micro_batch = noise_micro_batch
        self.attach = bool(attach)
        self.check = bool(check)
        self.check_report: Any = None  # the Report of check=True, once training starts
        self.log_metrics = bool(log_metrics)
        self.monitor_options = monitor_options
        self.attached: list[Any] = []  # handles of what attach=True attached
        self.noise: Any = None  # the GradientNoiseScale once training starts
        self.monitor: BNMonitor | None = None
        self.epochs: list[dict[str, Any]] = []

    def _start(self, model: nn.Module, default_dir: str, state: dict[str, Any] | None) -> None:
        if self.monitor is not None and not self.monitor.closed:
            return
        self.monitor = make_monitor(model, self.sink, default_dir, self.monitor_options)
        if state is not None:
            self.monitor.load_state_dict(state)

    def _check(self, model: nn.Module, trainer: str, micro_batch: Any, **setup: Any) -> None:
        """Run bndoctor.check with the trainer's setup; one log line and a ``check`` record for its findings.

        Skipped when the trainer does not say its micro-batch (a loader with a batch sampler).
        """
        if not self.check or self.check_report is not None or not isinstance(micro_batch, int) or micro_batch < 1:
            return
        from ..diagnose import check
        from ..monitor import group_alerts
        from ..training import TrainingSetup

        training = TrainingSetup(micro_batch=micro_batch, trainer=trainer, **setup)
        self.check_report = report = check(model, training)
        findings = report.errors + report.warnings
        if self.monitor is not None:
            self.monitor.write("check", setup=training.as_dict(), findings=[f.as_dict() for f in findings])
        if findings and (self.monitor is None or self.monitor.writes):
            numbers = f"micro-batch {training.micro_batch} x {training.accum_steps} accumulation steps"
            numbers += f" x {training.world_size} ranks" if training.world_size > 1 else ""
            lines = "; ".join(group_alerts(findings, shown=2))
            log.warning("bndoctor check (%s, %s): %s; bndoctor explain CODE for more", trainer, numbers, lines)

    def _epoch_end(self, model: nn.Module, data: Any, epoch: Any) -> None:
        if not (self.recalibrate or self.merge_ranks):
            return
        done = end_of_epoch(
            model,
            data if self.recalibrate else None,
            recalibrate=self.recalibrate,
            recalibrate_samples=self.recalibrate_samples,
            forward=self.recalibrate_forward,
            merge_ranks=self.merge_ranks,
        )
        self.epochs.append({"epoch": epoch, **done})

    def _start_noise(
        self, model: nn.Module, optimizer: Any, micro_batch: int | None, accum_steps: int, world_size: int
    ) -> None:
        """Attach a GradientNoiseScale to the framework's optimizer; its estimates go to the monitor's sinks."""
        from ..noise import GradientNoiseScale

        if not self.noise_scale or self.noise is not None:
            return
        micro = self.noise_micro_batch or micro_batch
        if micro is None:
            raise BNDoctorError(
                "noise_scale=True needs the micro-batch size, and the training loader does not say it",
                hint="pass noise_micro_batch=<samples per device per forward>",
            )
        self.noise = GradientNoiseScale(model, micro_batch=int(micro), accum_steps=accum_steps, world_size=world_size)
        self.noise.attach(optimizer)
        monitor, noise = self.monitor, self.noise
        written = [0]  # the last step recorded: a step without micro-batches adds no sample

        def record(opt: Any, args: Any, kwargs: Any) -> None:
            if monitor is not None and noise.samples and noise.samples[-1].step > written[0]:
                sample = noise.samples[-1]
                written[0] = sample.step
                monitor.write(
                    "noise",
                    b_simple=sample.b_simple,
                    alpha=sample.alpha,
                    g2_small=sample.g2_small,
                    g2_big=sample.g2_big,
                    logical_batch=noise.b_big,
                )

        assert noise.optimizer is not None
        self._noise_hook = noise.optimizer.register_step_post_hook(record)

    def _attach(self, model: nn.Module, optimizer: Any) -> None:
        """Attach the remedies' training-loop parts (accumulation windows) to the trainer's optimizer."""
        if not self.attach or optimizer is None:
            return
        from ..remedies import attach_all

        self.attached = attach_all(model, optimizer)  # skips layers that are attached already

    def _metrics(self) -> dict[str, float]:
        """New summary scalars for the trainer's logger ({} when off or nothing new)."""
        if not self.log_metrics or self.monitor is None:
            return {}
        return self.monitor.pop_metrics()

    def _stop(self) -> None:
        for handle in self.attached:
            handle.remove()  # kept in the list: what was attached (and, for windows, how many steps it closed)
        if self.noise is not None:
            self.noise.detach()
            self._noise_hook.remove()
        if self.monitor is not None:
            self.monitor.close()

    @property
    def alerts(self) -> list[Any]:
        return [] if self.monitor is None else list(self.monitor.alerts)

"""Where monitor records go: a JSONL file (default), TensorBoard, Python logging, or a list in memory."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Protocol

__all__ = ["JsonlSink", "ListSink", "LoggingSink", "Sink", "TensorBoardSink"]


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so that the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class JsonlSink:
    """One JSON object per line to the file at ``path``, appended and flushed per record (a crash loses nothing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(_clean(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class ListSink:
    """Keeps the records in memory (``.records``)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(_clean(record))

    def close(self) -> None:
        pass


class LoggingSink:
    """One line per sample (the smallest effective batch and the largest drift) and each alert.

    Written to ``logger`` (a ``logging.Logger`` or its name) at ``level``.
    """

    def __init__(self, logger: logging.Logger | str = "bndoctor.monitor", level: int = logging.INFO) -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.level = level

    def write(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind == "sample" and record.get("layers"):
            layers = record["layers"]
            name, worst = min(layers.items(), key=lambda kv: kv[1]["n_eff"])
            self.logger.log(
                self.level,
                "step %s: smallest effective BN batch %.1f (%s) over %d layers",
                record["step"],
                worst["n_eff"],
                name,
                len(layers),
            )
        elif kind == "divergence":
            self.logger.log(
                self.level,
                "step %s: running statistics differ across ranks by up to %.3f",
                record["step"],
                record["max"],
            )

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Scalars per layer under ``bn/<layer>/<metric>`` in ``log_dir`` (needs the ``tensorboard`` package)."""

    METRICS = ("n_eff", "var_ratio", "drift_mean", "drift_var", "collapsed")

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ModuleNotFoundError(
                "TensorBoardSink needs the tensorboard package: pip install 'bndoctor[tensorboard]'"
            ) from exc
        self.writer = SummaryWriter(str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step", 0)
        if record.get("kind") == "sample":
            for name, values in record["layers"].items():
                for metric in self.METRICS:
                    value = values.get(metric)
                    if isinstance(value, (int, float)):
                        self.writer.add_scalar(f"bn/{name}/{metric}", value, step)
        elif record.get("kind") == "divergence":
            self.writer.add_scalar("bn/rank_divergence", record["max"], step)
        elif record.get("kind") == "alert":
            finding = record["finding"]
            self.writer.add_text("bn/alerts", f"{finding['code']} {finding['module']}: {finding['message']}", step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

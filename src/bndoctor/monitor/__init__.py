"""BatchNorm health during training: :class:`BNMonitor`, its sinks, and the run report."""

from ._monitor import BNMonitor, group_alerts, metrics_of
from .sinks import JsonlSink, ListSink, LoggingSink, Sink, TensorBoardSink

__all__ = ["BNMonitor", "JsonlSink", "ListSink", "LoggingSink", "Sink", "TensorBoardSink", "group_alerts", "metrics_of"]

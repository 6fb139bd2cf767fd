"""Population statistics: pooled moments, recalibration (PreciseBN) and per-domain sets."""

from .domains import export_stats, import_stats, load_stats, stats_sets, store_stats, use_stats
from .moments import Moments, pool
from .recalibrate import LayerChange, RecalibrationReport, default_forward, recalibrate

__all__ = [
    "LayerChange",
    "Moments",
    "RecalibrationReport",
    "default_forward",
    "export_stats",
    "import_stats",
    "load_stats",
    "pool",
    "recalibrate",
    "stats_sets",
    "store_stats",
    "use_stats",
]

"""Population statistics: recalibration (PreciseBN) and per-domain sets of running statistics.

The pooled-moment math they share is :mod:`bndoctor.moments`; how batches are
fed is :mod:`bndoctor._batches` (``forward(model, batch)``).
"""

from .domains import export_stats, import_stats, load_stats, stats_sets, store_stats, use_stats
from .recalibrate import LayerChange, RecalibrationReport, recalibrate

__all__ = [
    "LayerChange",
    "RecalibrationReport",
    "export_stats",
    "import_stats",
    "load_stats",
    "recalibrate",
    "stats_sets",
    "store_stats",
    "use_stats",
]

"""bndoctor: diagnose and repair BatchNorm when the physical batch is tiny.

The root package imports torch and numpy only; optional integrations live in
``bndoctor.integrations`` and are never imported from here.
"""

from ._version import __version__
from ._walk import BNInfo, find_bn, replace_module
from .accumulate import (
    accumulate_bn,
    accumulation_window,
    close_windows,
    collect_window,
    from_accum_bn,
    from_batch_renorm,
    to_accum_bn,
    to_batch_renorm,
)
from .check import (
    CheckFailedError,
    Finding,
    FixResult,
    Report,
    TrainingSetup,
    check,
    fix,
    register_check,
)
from .convert import convert_bn, default_num_groups, freeze_bn, unfreeze_bn
from .errors import (
    BNDoctorError,
    BNDoctorWarning,
    GroupCountError,
    MissingRunningStatsError,
    ModelSpecError,
    ModuleSelectionError,
    NotAModuleError,
    UninitializedLayerError,
)
from .fold import fold_bn
from .layers import AccumBatchNorm, BatchRenorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, SyncBatchNorm
from .monitor import BNMonitor
from .noise import GradientNoiseScale, advise, tail_index
from .ranks import DivergenceReport, merge_running_stats, rank_divergence
from .stats import (
    RecalibrationReport,
    export_stats,
    import_stats,
    load_stats,
    recalibrate,
    stats_sets,
    store_stats,
    use_stats,
)
from .sync import from_sync_bn, to_sync_bn

__all__ = [
    "AccumBatchNorm",
    "BNDoctorError",
    "BNDoctorWarning",
    "BNInfo",
    "BNMonitor",
    "BatchRenorm",
    "CheckFailedError",
    "DivergenceReport",
    "Finding",
    "FixResult",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GradientNoiseScale",
    "GroupCountError",
    "MissingRunningStatsError",
    "ModelSpecError",
    "ModuleSelectionError",
    "NotAModuleError",
    "RecalibrationReport",
    "Report",
    "SyncBatchNorm",
    "TrainingSetup",
    "UninitializedLayerError",
    "__version__",
    "accumulate_bn",
    "accumulation_window",
    "advise",
    "check",
    "close_windows",
    "collect_window",
    "convert_bn",
    "default_num_groups",
    "export_stats",
    "find_bn",
    "fix",
    "fold_bn",
    "freeze_bn",
    "from_accum_bn",
    "from_batch_renorm",
    "from_sync_bn",
    "import_stats",
    "load_stats",
    "merge_running_stats",
    "rank_divergence",
    "recalibrate",
    "register_check",
    "replace_module",
    "stats_sets",
    "store_stats",
    "tail_index",
    "to_accum_bn",
    "to_batch_renorm",
    "to_sync_bn",
    "unfreeze_bn",
    "use_stats",
]

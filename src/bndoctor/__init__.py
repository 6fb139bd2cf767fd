"""bndoctor: diagnose and repair BatchNorm when the physical batch is tiny.

The top level holds the verbs users call (the README's); everything else is
grouped in namespaced submodules:

* :mod:`bndoctor.remedies` — one module per remedy, the remedy registry
  (``register_remedy``, ``register_fix``) and the class-swap helpers;
* :mod:`bndoctor.layers` — the layers and the protocol every layer answers;
* :mod:`bndoctor.families` — the registry of BN-like layer families;
* :mod:`bndoctor.diagnose` — ``check``/``fix`` with ``Report``, ``FixResult``
  and the check registry; :mod:`bndoctor.findings` — ``Finding``, ``Action``;
* :mod:`bndoctor.stats`, :mod:`bndoctor.ranks`, :mod:`bndoctor.monitor`,
  :mod:`bndoctor.noise` — statistics, cross-rank, monitoring, batch-size science;
* :mod:`bndoctor.errors` — every exception class;
* ``bndoctor.bench``, ``bndoctor.integrations``, ``bndoctor.cli`` — imported on request.

The root package imports torch and numpy only; optional integrations live in
``bndoctor.integrations`` and are never imported from here.

Parameters that mean the same everywhere (documented here once):

* ``model``: the module tree to read or change (any ``nn.Module``; DDP and
  DataParallel wrappers are looked through where it matters); ``module``:
  one layer.
* ``modules``: which BN layers to act on: ``None`` (all), a path prefix such
  as ``"backbone"`` or ``"layer3.1.bn2"``, a list of them, a predicate
  ``(name, module) -> bool``, or a module class; an unknown name is an error.
* ``inplace``: ``False`` (default) works on a deep copy and leaves the
  caller's model untouched; ``True`` changes it and returns it.
* ``num_features``, ``eps``, ``momentum``, ``affine``,
  ``track_running_stats``, ``device``, ``dtype`` (and ``bias`` of the
  norm+activation layers): as in ``torch.nn.BatchNorm2d``.
* ``process_group`` / ``group``: a ``torch.distributed`` process group
  (``None``: all ranks).
"""

from ._version import __version__
from ._walk import BNInfo, find_bn, replace_module
from .diagnose import TrainingSetup, check, fix, register_check
from .errors import BNDoctorError, BNDoctorWarning
from .findings import Finding
from .layers import AccumBatchNorm, BatchRenorm, SyncBatchNorm
from .monitor import BNMonitor
from .noise import GradientNoiseScale, advise, tail_index
from .ranks import merge_running_stats, rank_divergence
from .remedies import (
    accumulate_bn,
    accumulation_window,
    collect_window,
    convert_bn,
    correct_window,
    fold_bn,
    freeze_bn,
    from_accum_bn,
    from_batch_renorm,
    from_sync_bn,
    register_fix,
    to_accum_bn,
    to_batch_renorm,
    to_sync_bn,
    unfreeze_bn,
)
from .stats import export_stats, import_stats, load_stats, recalibrate, stats_sets, store_stats, use_stats

__all__ = [
    "AccumBatchNorm",
    "BNDoctorError",
    "BNDoctorWarning",
    "BNInfo",
    "BNMonitor",
    "BatchRenorm",
    "Finding",
    "GradientNoiseScale",
    "SyncBatchNorm",
    "TrainingSetup",
    "__version__",
    "accumulate_bn",
    "accumulation_window",
    "advise",
    "check",
    "collect_window",
    "convert_bn",
    "correct_window",
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
    "register_fix",
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

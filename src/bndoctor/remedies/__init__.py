"""Remedies: one module each, holding its converters and registering its fixer and prescription.

============================  ==============================================  ===========================
module                        converters                                      layer (``bndoctor.layers``)
============================  ==============================================  ===========================
:mod:`.freeze`                ``freeze_bn`` / ``unfreeze_bn``                 frozen subclasses
:mod:`.norms`                 ``convert_bn`` (GroupNorm / LayerNorm / IN)     ``nn.GroupNorm``
:mod:`.sync`                  ``to_sync_bn`` / ``from_sync_bn``               ``SyncBatchNorm``
:mod:`.accum`                 ``to_accum_bn`` / ``from_accum_bn``, windows    ``AccumBatchNorm``
:mod:`.renorm`                ``to_batch_renorm`` / ``from_batch_renorm``     ``BatchRenorm``
:mod:`.fold`                  ``fold_bn``                                     (removes BN)
:mod:`.tweaks`                fixers only: drop_bias, float_bn, set_momentum
============================  ==============================================  ===========================

Recalibration (:func:`bndoctor.recalibrate`) and the cross-rank merge
(:func:`bndoctor.merge_running_stats`) change statistics, not layers, and
live in :mod:`bndoctor.stats` and :mod:`bndoctor.ranks`.

The registry (:class:`Remedy`, :func:`register_remedy`, :func:`register_fix`)
and the class-swap helpers (:func:`swap_layers`, :func:`revert_layers`) are
public: a remedy of your own plugs into ``check``, ``fix`` and the training
integrations without an edit here (docs/architecture.md walks through one).
"""

from . import tweaks as _tweaks  # noqa: F401  (registers the configuration fixers)
from ._registry import (
    REMEDIES,
    FixStep,
    Prescription,
    Remedy,
    apply_actions,
    attach_all,
    prescriptions,
    register_fix,
    register_remedy,
)
from ._swap import revert_layers, swap_layers, transfer_bn_state
from .accum import (
    AccumulationHandle,
    accumulate_bn,
    accumulation_window,
    close_windows,
    collect_window,
    correct_window,
    from_accum_bn,
    to_accum_bn,
)
from .fold import fold_bn
from .freeze import freeze_bn, unfreeze_bn
from .norms import convert_bn, default_num_groups
from .renorm import from_batch_renorm, to_batch_renorm
from .sync import from_sync_bn, to_sync_bn

__all__ = [
    "REMEDIES",
    "AccumulationHandle",
    "FixStep",
    "Prescription",
    "Remedy",
    "accumulate_bn",
    "accumulation_window",
    "apply_actions",
    "attach_all",
    "close_windows",
    "collect_window",
    "convert_bn",
    "correct_window",
    "default_num_groups",
    "fold_bn",
    "freeze_bn",
    "from_accum_bn",
    "from_batch_renorm",
    "from_sync_bn",
    "prescriptions",
    "register_fix",
    "register_remedy",
    "revert_layers",
    "swap_layers",
    "to_accum_bn",
    "to_batch_renorm",
    "to_sync_bn",
    "transfer_bn_state",
    "unfreeze_bn",
]

"""Normalisation followed by a norm+activation layer's own dropout and activation.

* :class:`GroupNormAct`: what :func:`bndoctor.convert_bn` makes of a
  norm+activation layer (timm's ``BatchNormAct2d``); plain ``GroupNorm``
  would silently drop the activation.
* :class:`BatchNormAct`: plain BatchNorm plus ``drop``/``act``, what a
  third-party norm+activation SyncBN (timm's ``SyncBatchNormAct``) becomes
  when :func:`bndoctor.from_sync_bn` turns it back into local BN and no
  original class is remembered.

The ``drop`` and ``act`` objects move over unchanged (same state_dict keys).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._base import BNDoctorLayer, apply_post_ops

__all__ = ["BatchNormAct", "GroupNormAct"]


class GroupNormAct(nn.GroupNorm):
    """``act(drop(GroupNorm(x)))``; ``drop`` and ``act`` are child modules (either may be absent).

    Arguments as ``torch.nn.GroupNorm``: ``num_groups`` groups over
    ``num_channels`` channels.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return apply_post_ops(self, super().forward(input))


class BatchNormAct(BNDoctorLayer, _BatchNorm):
    """``act(drop(BatchNorm(x)))`` for inputs ``(N, C, ...)``; ``drop`` and ``act`` are child modules."""

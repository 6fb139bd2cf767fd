"""GroupNorm followed by a norm+activation layer's own dropout and activation.

What :func:`bndoctor.convert_bn` makes of a norm+activation layer (timm's
``BatchNormAct2d``): plain ``GroupNorm`` would silently drop the activation.
The ``drop`` and ``act`` objects move over unchanged (same state_dict keys).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._base import apply_post_ops

__all__ = ["GroupNormAct"]


class GroupNormAct(nn.GroupNorm):
    """``act(drop(GroupNorm(x)))``; ``drop`` and ``act`` are child modules (either may be absent)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return apply_post_ops(self, super().forward(input))

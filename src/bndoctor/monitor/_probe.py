"""The train/eval gap of a sampled forward: the model's output with batch statistics against its output in eval mode.

BatchNorm trains one network (normalised with batch statistics) and evaluates another (normalised with the
running statistics). At a sampled training forward through the root module, the monitor runs the same inputs
once more without gradients in eval mode and compares the two outputs:
``gap = |y_train - y_eval|^2 / |y_train|^2`` over the output's largest floating-point tensor (a model's logits;
for a dict or tuple output the largest entry). A gap near 0 says evaluation sees the network training shaped;
a large gap says the two differ. Nothing of the model changes: every module's mode is restored, and in eval mode
no BN layer updates its running statistics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["mode_gap", "output_tensor"]


def output_tensor(output: Any) -> torch.Tensor | None:
    """The largest floating-point tensor in a model's output (a tensor, or nested in tuples, lists and dicts)."""
    best: torch.Tensor | None = None
    stack = [output]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.is_floating_point() and (best is None or item.numel() > best.numel()):
                best = item
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    return best


@torch.no_grad()
def mode_gap(root: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> torch.Tensor:
    """The relative squared difference of ``output`` (a training forward of ``root``) and the eval-mode output.

    A 0-d float64 tensor on the output's device (NaN when the outputs cannot be compared: no floating
    tensor, or a different shape in eval mode).
    """
    trained = output_tensor(output)
    if trained is None:
        return torch.tensor(math.nan, dtype=torch.float64)
    modes = [(module, module.training) for module in root.modules()]
    try:
        root.eval()
        evaluated = output_tensor(root(*args, **kwargs))
    finally:
        for module, training in modes:
            module.training = training
    if evaluated is None or evaluated.shape != trained.shape:
        return torch.tensor(math.nan, dtype=torch.float64, device=trained.device)
    a = trained.detach().double()
    b = evaluated.to(a.device).double()
    return ((a - b) ** 2).sum() / (a**2).sum().clamp_min(1e-300)

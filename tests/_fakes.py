"""Stand-ins for third-party layers, written from their documented behaviour.

bndoctor must recognise these without importing torchvision, detectron2, timm
or OpenMMLab, so the tests build look-alikes with the same buffers,
parameters and forward semantics.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ThirdPartyFrozenBN2d(nn.Module):
    """Like torchvision.ops.FrozenBatchNorm2d: affine and statistics are all buffers."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class BatchNormAct2d(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BatchNorm2d subclass that applies its `drop` and `act` children after BN."""

    def __init__(self, num_features: int, act_layer: type[nn.Module] = nn.ReLU, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class ScaledOutputBN(nn.BatchNorm2d):
    """A BN subclass with a forward of its own that no convention describes: bndoctor must leave it alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


class MMStyleSyncBN(nn.Module):
    """Like OpenMMLab's MMSyncBN: BN behaviour without subclassing _BatchNorm."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = 1e-5
        self.momentum = 0.1
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
        )


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN-like layer non-trivial statistics and affine so that tests can see mistakes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(getattr(module, "running_mean", None), torch.Tensor):
                continue
            for name, offset in (("running_mean", 0.0), ("weight", 1.0), ("bias", 0.0)):
                t = getattr(module, name, None)
                if isinstance(t, torch.Tensor):
                    t.copy_((torch.randn(t.shape, generator=gen) * 0.5 + offset).to(t.dtype))
            var = module.running_var
            var.copy_((torch.rand(var.shape, generator=gen) * 2 + 0.2).to(var.dtype))
    return model

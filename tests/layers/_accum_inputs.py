"""Shared inputs and oracles of the accumulation-aware BN tests: float64 micro-batches with differing means."""

import torch

import bndoctor as bd
from tests._fakes import randomize_bn

C = 3
SHAPE = (1, C, 1, 1)


def _micro(k, n=2):
    gen = torch.Generator().manual_seed(k)
    return torch.randn(n, C, 4, 5, generator=gen, dtype=torch.float64) * (1 + k % 3) + k


def _layer(mode="renorm", **kwargs):
    torch.manual_seed(0)
    layer = randomize_bn(bd.AccumBatchNorm(C, mode=mode, momentum=0.2, **kwargs).double())
    layer.running_var.fill_(1.5)
    return layer


def _pooled(xs):
    values = torch.cat([x.transpose(0, 1).reshape(C, -1) for x in xs], dim=1)
    return values.mean(1), values.var(1, unbiased=False), values.var(1, unbiased=True)


def _normalised(layer, x, mean, var):
    return (x - mean.view(SHAPE)) / torch.sqrt(var.view(SHAPE) + layer.eps) * layer.weight.view(
        SHAPE
    ) + layer.bias.view(SHAPE)

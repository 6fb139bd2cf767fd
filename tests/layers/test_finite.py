"""bndoctor's layers are finite wherever torch's BatchNorm is: constant channels, zero variance, tiny batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import bndoctor as bd


def _accum(mode):
    def make():
        layer = bd.AccumBatchNorm(4, mode=mode)
        layer.acquire_control()  # as accumulate_bn does: windows pool across micro-batches
        return layer

    return make


LAYERS = {
    "accum-renorm": _accum("renorm"),
    "accum-progressive": _accum("progressive"),
    "accum-blend": _accum("blend"),
    "batch-renorm": lambda: bd.BatchRenorm(4, warmup_steps=0),
    "sync-one-process": lambda: bd.SyncBatchNorm(4),
}


def _inputs():
    x = torch.randn(2, 4, 2, 2)
    one_constant = x.clone()
    one_constant[:, 1] = 0.0
    offset_constant = x.clone()
    offset_constant[:, 2] = 3.5
    return {
        "one constant channel": one_constant,
        "constant channel with an offset": offset_constant,
        "all zero": torch.zeros(2, 4, 2, 2),
        "two identical samples": x[:1].expand(2, -1, -1, -1).contiguous(),
        "flat (N, C)": torch.zeros(2, 4),
        "huge mean": x + 1e4,
    }


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("case", list(_inputs()))
def test_finite_wherever_batchnorm_is(name, case):
    x = _inputs()[case]
    reference = nn.BatchNorm1d(4) if x.dim() == 2 else nn.BatchNorm2d(4)
    assert torch.isfinite(reference(x)).all()
    layer = LAYERS[name]()
    for _ in range(3):  # later micro-batches pool with earlier ones; running statistics are updated
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        assert torch.isfinite(y).all(), f"{name} output on {case}"
        (y * torch.randn_like(y)).sum().backward()
        assert torch.isfinite(xi.grad).all() and torch.isfinite(layer.weight.grad).all()
    if isinstance(layer, bd.AccumBatchNorm):
        layer.close_window()
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()
    assert torch.isfinite(layer.eval()(x)).all()


def _conv_accum():
    torch.manual_seed(0)
    return bd.to_accum_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))


def test_a_nan_window_is_refused_by_the_block_and_never_committed():
    model = _conv_accum()
    before = (model[1].running_mean.clone(), model[1].running_var.clone())
    bad = torch.randn(2, 3, 2, 2)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(bd.BNDoctorError, match="NaN or Inf at '1'"), bd.accumulation_window(model):
        model(torch.randn(2, 3, 2, 2))
        model(bad)
    assert torch.equal(model[1].running_mean, before[0]) and torch.equal(model[1].running_var, before[1])
    assert not model[1].window_open and int(model[1].num_batches_tracked) == 0
    with bd.accumulation_window(model):  # the next window works as usual
        model(torch.randn(2, 3, 2, 2))
    assert torch.isfinite(model[1].running_var).all() and int(model[1].num_batches_tracked) == 1


def test_the_optimizer_hook_skips_a_nan_window_on_the_device():
    model = _conv_accum()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    bd.accumulate_bn(model, optimizer)
    bad = torch.randn(2, 3, 2, 2)
    bad[1, 2, 1, 1] = float("inf")
    model(bad)
    optimizer.step()
    assert torch.isfinite(model[1].running_mean).all() and torch.isfinite(model[1].running_var).all()

"""Norm+activation layers (timm's BatchNormAct2d contract) keep their dropout and activation through every remedy."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from tests._fakes import BatchNormAct2d, ScaledOutputBN, randomize_bn

SILU_FLOOR = -0.2785  # min of x * sigmoid(x): an output below it means the activation was dropped


def _model(act=nn.SiLU):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), BatchNormAct2d(4, act_layer=act, momentum=0.3, eps=1e-3))
    return randomize_bn(model)


CONVERTERS = {
    "sync": (bd.to_sync_bn, lambda m: bd.from_sync_bn(m), bd.SyncBatchNorm),
    "accum": (bd.to_accum_bn, lambda m: bd.from_accum_bn(m), bd.AccumBatchNorm),
    "renorm": (lambda m: bd.to_batch_renorm(m, momentum=0.3), lambda m: bd.from_batch_renorm(m), bd.BatchRenorm),
}


@pytest.mark.parametrize("name", list(CONVERTERS))
def test_class_swaps_keep_the_activation_and_revert_exactly(name):
    to, back, cls = CONVERTERS[name]
    model = _model(nn.PReLU)
    x = torch.randn(4, 3, 6, 6)
    converted = to(model)
    layer = converted[1]
    assert type(layer) is cls and isinstance(layer.act, nn.PReLU) and isinstance(layer.drop, nn.Identity)
    assert set(converted.state_dict()) == set(model.state_dict())  # the PReLU keeps its key: 1.act.weight
    torch.testing.assert_close(converted.eval()(x), model.eval()(x))
    reverted = back(converted)
    assert type(reverted[1]) is BatchNormAct2d and type(reverted[1].act) is nn.PReLU
    for field in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(reverted[1], field) == getattr(model[1], field), field
    for key, value in model.state_dict().items():
        assert torch.equal(reverted.state_dict()[key], value), key
    torch.testing.assert_close(reverted.eval()(x), model.eval()(x))


def test_converted_layers_apply_the_activation_in_training_too():
    model = _model()
    x = torch.randn(4, 3, 6, 6) * 5
    converted = bd.to_sync_bn(model).train()
    assert converted(x).min() >= SILU_FLOOR
    accum = bd.to_accum_bn(model).train()
    with bd.accumulation_window(accum):
        assert accum(x).min() >= SILU_FLOOR


def test_groupnorm_conversion_keeps_the_activation():
    model = _model()
    converted = bd.convert_bn(model)
    assert isinstance(converted[1], bd.layers.GroupNormAct) and converted[1].act is not model[1].act
    out = converted(torch.randn(4, 3, 6, 6) * 5)
    assert out.min() >= SILU_FLOOR
    plain = nn.GroupNorm(converted[1].num_groups, 4, eps=1e-3)
    plain.load_state_dict({"weight": converted[1].weight, "bias": converted[1].bias})
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(converted[1](x), nn.functional.silu(plain(x)))


def test_an_unknown_forward_is_left_alone_by_every_conversion():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ScaledOutputBN(4))
    for convert in (bd.to_sync_bn, bd.to_accum_bn, bd.to_batch_renorm, bd.convert_bn):
        with pytest.warns(bd.BNDoctorWarning, match="own forward"):
            assert type(convert(model)[1]) is ScaledOutputBN


def test_norm_act_layers_are_recognised_by_their_children_and_frozen_with_them():
    model = _model()
    (record,) = bd.find_bn(model)
    assert record.family.name == "norm-act" and record.swappable
    frozen = bd.freeze_bn(model).train()
    x = torch.randn(4, 3, 6, 6) * 5
    assert frozen(x).min() >= SILU_FLOOR  # the frozen subclass keeps BatchNormAct2d's forward


class SyncBatchNormAct(nn.SyncBatchNorm):
    """Like timm's SyncBatchNormAct: torch's SyncBatchNorm with `drop` and `act` applied after it."""

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def _timm_style_sync():
    layer = SyncBatchNormAct(4)
    layer.drop, layer.act = nn.Identity(), nn.SiLU()
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), layer))


def test_a_norm_act_syncbn_goes_back_to_local_bn_with_its_activation():
    model = _timm_style_sync()
    (record,) = bd.find_bn(model)
    assert record.family.name == "norm-act-sync" and record.kind == "sync"
    local = bd.from_sync_bn(model)  # no dims needed: it becomes bndoctor's BatchNormAct
    assert type(local[1]) is bd.layers.BatchNormAct and isinstance(local[1].act, nn.SiLU)
    x = torch.randn(4, 3, 6, 6) * 5
    torch.testing.assert_close(local.eval()(x), model.eval()(x))
    assert local.train()(x).min() >= SILU_FLOOR
    accum = bd.to_accum_bn(local)  # and it is an ordinary BN layer to every remedy
    assert type(accum[1]) is bd.AccumBatchNorm and isinstance(accum[1].act, nn.SiLU)


def test_check_and_fix_of_a_norm_act_syncbn_in_one_process_keep_the_activation():
    model = _timm_style_sync()
    report = bd.check(model)
    assert report.by_code("BN302")[0].action.name == "from_sync_bn"
    fixed, changes = bd.fix(model, report)
    assert type(fixed[1]) is bd.layers.BatchNormAct and changes == ["from_sync_bn: 1 layer(s)"]
    assert fixed.train()(torch.randn(4, 3, 6, 6) * 5).min() >= SILU_FLOOR

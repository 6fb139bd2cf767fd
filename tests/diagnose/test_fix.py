"""bndoctor.fix: applies the prescriptions of a report, on a copy, and says what it changed."""

import copy

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from bndoctor.models import resnet18
from tests._fakes import randomize_bn

S = bd.TrainingSetup


def _conv_bn(bias=True):
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU()))


def test_dropping_a_redundant_bias_is_exact_in_both_modes():
    model = _conv_bn().double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    reference = copy.deepcopy(model)
    fixed, changes = bd.fix(model, bd.check(model))
    assert fixed[0].bias is None and model[0].bias is not None  # the user's model is untouched
    assert changes == ["drop_bias: 0.bias moved into 1.running_mean"]
    torch.testing.assert_close(fixed.eval()(x), reference.eval()(x))
    torch.testing.assert_close(fixed.train()(x), reference.train()(x))
    assert bd.check(fixed).codes() == []


def test_finetuning_prescription_freezes_and_the_fixed_model_checks_clean():
    model = resnet18()
    setup = S(micro_batch=2, accum_steps=32, finetune=True)
    result = bd.fix(model, bd.check(model, setup))
    assert result.changes == ["freeze_bn: 20 layer(s)"]
    assert all(r.frozen for r in bd.find_bn(result.model)) and not any(r.frozen for r in bd.find_bn(model))
    assert bd.check(result.model, setup).codes() == []


@pytest.mark.parametrize(
    ("setup", "expected", "sync"),
    [
        (S(micro_batch=2, accum_steps=32), bd.AccumBatchNorm, False),
        (S(micro_batch=2, accum_steps=8, world_size=4), bd.AccumBatchNorm, True),
        (S(micro_batch=4, world_size=8), bd.SyncBatchNorm, None),
        (S(micro_batch=2), nn.GroupNorm, None),
    ],
)
def test_from_scratch_prescriptions_follow_the_setup(setup, expected, sync):
    model = resnet18()
    fixed, changes = bd.fix(model, bd.check(model, setup))
    norms = [
        m for m in fixed.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, bd.SyncBatchNorm, bd.AccumBatchNorm))
    ]
    assert norms and all(isinstance(m, expected) for m in norms), changes
    if sync is not None:
        assert all(m.sync is sync for m in norms)
    assert bd.check(fixed, setup).ok


def test_precision_momentum_and_torch_syncbn_fixes():
    model = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8, momentum=0.9))
    model[1].half()
    fixed, changes = bd.fix(model, bd.check(model))
    assert fixed[1].running_var.dtype == torch.float32 and fixed[1].momentum == 0.1
    assert changes == ["float_bn: 1 layer(s)", "set_momentum: 1 layer(s)"]
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)))
    report = bd.check(synced, S(micro_batch=32), input_shape=(3, 4, 4))
    fixed, changes = bd.fix(synced, report)
    assert type(fixed[1]) is nn.BatchNorm2d and changes == ["from_sync_bn: 1 layer(s)"]


def test_inplace_and_skipped_findings():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8, eps=1e-12))
    result = bd.fix(model, bd.check(model), inplace=True)
    assert result.model is model and model[0].bias is None
    assert result.skipped == ["BN206 1"]  # eps has no mechanical fix


def test_fix_refuses_what_is_not_a_report():
    with pytest.raises(bd.BNDoctorError, match="Report"):
        bd.fix(_conv_bn(), [])


def test_layers_a_repair_leaves_alone_are_counted_and_listed():
    from tests._fakes import ScaledOutputBN

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), ScaledOutputBN(8), nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
    )
    report = bd.check(model, S(micro_batch=2, accum_steps=8))
    with pytest.warns(bd.BNDoctorWarning, match="own forward"):
        result = bd.fix(model, report)
    assert result.changes[0] == "to_accum_bn: 1 of 2 layer(s)"
    (skipped,) = result.skipped
    assert skipped.startswith("1 (left as it is: a BN subclass with its own forward") and "freeze_bn" in skipped
    assert type(result.model[1]) is ScaledOutputBN and isinstance(result.model[3], bd.AccumBatchNorm)


def test_accumulation_across_ranks_and_syncbn_findings_fix_to_synced_accumulation_aware_bn():
    """BN101 (accumulation-aware BN, pooled across ranks) and BN104 (SyncBN) together: every layer pools the
    window across ranks, in the order BN101 lists the remedies, with nothing skipped or converted twice."""
    from bndoctor.models import tiny_resnet

    model = tiny_resnet()
    report = bd.check(model, bd.TrainingSetup(micro_batch=2, accum_steps=4, world_size=2), input_shape=(1, 8, 8))
    assert [f.code for f in report.findings if f.action is not None][:3] == ["BN101", "BN103", "BN104"]
    fixed = bd.fix(model, report)
    layers = [m for m in fixed.model.modules() if isinstance(m, (nn.BatchNorm2d, bd.AccumBatchNorm))]
    assert len(layers) == 9 and all(isinstance(m, bd.AccumBatchNorm) and m.sync for m in layers)
    assert fixed.changes[:2] == ["to_sync_bn: 9 layer(s)", "to_accum_bn: 9 layer(s) (pooled across ranks)"]
    assert fixed.skipped == []

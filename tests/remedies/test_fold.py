import copy

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from bndoctor.models import resnet18, tiny_resnet
from tests._fakes import BatchNormAct2d, ScaledOutputBN, ThirdPartyFrozenBN2d, randomize_bn


def _eval_ready(model, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(model, seed).eval()


def _no_bn_left(model):
    return not bd.find_bn(model)


@pytest.mark.parametrize("factory", [tiny_resnet, lambda: resnet18(num_classes=10)])
def test_resnet_folds_completely_and_exactly(factory):
    model = _eval_ready(factory())
    shape = (3, 1, 8, 8) if model.stem[0].in_channels == 1 else (2, 3, 32, 32)
    x = torch.randn(shape)
    folded = bd.fold_bn(model)
    assert _no_bn_left(folded)
    assert isinstance(folded.stem[1], nn.Identity) and folded.stem[0].bias is not None
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert type(folded) is type(model)  # the user's classes, not an fx GraphModule


def test_frozen_model_in_train_mode_folds():
    model = _eval_ready(tiny_resnet())
    frozen = bd.freeze_bn(model).train()
    x = torch.randn(4, 1, 8, 8)
    folded = bd.fold_bn(frozen)
    assert _no_bn_left(folded) and folded.training
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_training_mode_bn_is_left_with_a_warning():
    model = tiny_resnet().train()
    with pytest.warns(bd.BNDoctorWarning, match=r"left 9 BN layer\(s\) unfolded: 'stem.1' \(in training mode"):
        out = bd.fold_bn(model)
    assert len(bd.find_bn(out)) == 9


@pytest.mark.parametrize(
    ("producer", "bn", "shape"),
    [
        (nn.Conv1d(3, 6, 3, bias=False), nn.BatchNorm1d(6), (2, 3, 9)),
        (nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2), nn.BatchNorm2d(6), (2, 4, 7, 7)),
        (nn.Conv3d(2, 4, 2, stride=2), nn.BatchNorm3d(4), (2, 2, 4, 4, 4)),
        (nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d(6), (2, 4, 5)),
        (nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6), (2, 4, 5, 5)),
        (nn.ConvTranspose3d(2, 3, 2), nn.BatchNorm3d(3), (1, 2, 3, 3, 3)),
        (nn.Linear(5, 7), nn.BatchNorm1d(7), (6, 5)),
        (nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False), (2, 3, 4, 4)),
        (nn.Conv2d(3, 4, 1), ThirdPartyFrozenBN2d(4), (2, 3, 4, 4)),
    ],
)
def test_every_producer_and_bn_kind(producer, bn, shape):
    model = _eval_ready(nn.Sequential(producer, bn, nn.Tanh()))
    x = torch.randn(shape)
    folded = bd.fold_bn(model)
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_double_precision_kept_and_exact():
    model = _eval_ready(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    folded = bd.fold_bn(model)
    assert folded[0].weight.dtype == torch.float64
    torch.testing.assert_close(folded(x), model(x), atol=1e-12, rtol=1e-12)


def test_producer_output_used_twice_is_not_folded():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = _eval_ready(Net())
    with pytest.warns(bd.BNDoctorWarning, match="left 1 BN.*feeds only this layer"):
        folded = bd.fold_bn(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    x = torch.randn(2, 2, 3, 3)
    torch.testing.assert_close(folded(x), model(x))


def test_shared_conv_called_twice_is_not_folded():
    conv = nn.Conv2d(2, 2, 1)
    model = _eval_ready(nn.Sequential(conv, nn.BatchNorm2d(2), conv, nn.BatchNorm2d(2)))
    with pytest.warns(bd.BNDoctorWarning, match="left 2 BN"):
        folded = bd.fold_bn(model)
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(folded(x), model(x))


def test_bn_subclass_with_its_own_forward_is_not_folded():
    model = _eval_ready(nn.Sequential(nn.Conv2d(2, 4, 1), ScaledOutputBN(4)))
    with pytest.warns(bd.BNDoctorWarning, match="own forward"):
        folded = bd.fold_bn(model)
    assert isinstance(folded[1], ScaledOutputBN)


@pytest.mark.parametrize("act", [nn.SiLU, nn.PReLU])
def test_norm_act_layer_folds_and_keeps_its_activation(act):
    torch.manual_seed(0)
    model = _eval_ready(nn.Sequential(nn.Conv2d(2, 4, 1), BatchNormAct2d(4, act_layer=act)))
    folded = bd.fold_bn(model)
    assert isinstance(folded[1], bd.layers.PostOps) and folded[1].act is not model[1].act
    assert set(folded.state_dict()) == {"0.weight", "0.bias"} | {k for k in model.state_dict() if ".act." in k}
    x = torch.randn(3, 2, 5, 5)
    torch.testing.assert_close(folded(x), model(x))
    assert folded(x).min() >= -0.3 if act is nn.SiLU else True  # SiLU's floor: the activation is still there


def test_untraceable_model_falls_back_to_sequential_pairs():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow defeats torch.fx
                return self.body(x)
            return self.body(-x)

    model = _eval_ready(Branchy())
    with pytest.warns(bd.BNDoctorWarning, match="could not trace"):
        folded = bd.fold_bn(model)
    assert _no_bn_left(folded)
    for x in (torch.randn(2, 2, 4, 4).abs(), -torch.randn(2, 2, 4, 4).abs()):
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


class _UntraceableBlocks(nn.Module):
    """Like transformers' vision models: fx cannot trace it; convs and BN are attributes, not a Sequential."""

    def __init__(self, data_dependent=True):
        super().__init__()
        self.data_dependent = data_dependent
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Linear(4, 3), nn.BatchNorm1d(3)

    def forward(self, x):
        if not self.data_dependent or x.sum() > -1e9:  # data-dependent control flow defeats torch.fx
            x = torch.relu(self.bn1(self.conv1(x)))
        y = self.conv2(x)
        x = self.bn2(y) + y  # conv2's output feeds the residual too: folding it would be wrong
        return self.bn3(self.conv3(x.mean((2, 3))))


def test_example_input_folds_models_fx_cannot_trace_as_completely_as_traceable_ones():
    model = _eval_ready(_UntraceableBlocks())
    with pytest.warns(bd.BNDoctorWarning) as caught:
        bd.fold_bn(model)  # without an input: nothing is in a Sequential, so nothing folds
    assert "could not trace" in str(caught[0].message) and "example_input" in str(caught[0].message)
    x = torch.randn(3, 2, 5, 5)
    with pytest.warns(bd.BNDoctorWarning, match=r"left 1 BN layer.*'bn2'.*feeds only this layer"):
        folded = bd.fold_bn(model, example_input=(x, "labels are ignored"))
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn3, nn.Identity)
    assert isinstance(folded.bn2, nn.BatchNorm2d)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert model.training is False and not any(m.training for m in model.modules())  # modes restored
    # check's trace on meta tensors uses the same rule: a conv that feeds a residual too keeps its bias
    report = bd.check(_UntraceableBlocks(data_dependent=False), input_shape=(2, 5, 5))
    assert report.traced
    assert {f.module for f in report.by_code("BN201")} == {"conv1", "conv3"}


def test_fold_with_example_input_restores_training_modes_and_statistics():
    model = _eval_ready(_UntraceableBlocks()).train()
    model.bn1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = bd.fold_bn(model, example_input=torch.randn(3, 2, 5, 5), modules="bn1")
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.BatchNorm2d)
    assert model.training and model.bn2.training and not model.bn1.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_input_untouched_and_inplace():
    model = _eval_ready(tiny_resnet())
    before = copy.deepcopy(model.state_dict())
    bd.fold_bn(model)
    assert isinstance(model.stem[1], nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    same = bd.fold_bn(model, inplace=True)
    assert same is model and isinstance(model.stem[1], nn.Identity)


def test_requires_grad_and_training_of_folded_layers():
    model = _eval_ready(nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3)))
    model[0].weight.requires_grad_(False)
    folded = bd.fold_bn(model)
    assert not folded[0].weight.requires_grad and not folded[0].bias.requires_grad


def test_modules_selection_limits_folding():
    model = _eval_ready(tiny_resnet())
    folded = bd.fold_bn(model, modules="layers.2")
    assert {r.name for r in bd.find_bn(folded)} == {
        r.name for r in bd.find_bn(model) if not r.name.startswith("layers.2")
    }

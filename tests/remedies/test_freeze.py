"""freeze_bn / unfreeze_bn (bndoctor.remedies.freeze)."""

import copy

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from bndoctor.models import tiny_resnet
from tests._fakes import BatchNormAct2d, MMStyleSyncBN, ThirdPartyFrozenBN2d, randomize_bn

BN_FIELDS = ("num_features", "eps", "momentum", "affine", "track_running_stats", "training")


def _bn_attributes(model):
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = (
                type(m),
                tuple(getattr(m, f) for f in BN_FIELDS),
                tuple((n, p.requires_grad) for n, p in m.named_parameters(recurse=False)),
            )
    return out


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _trained(model, shape=(8, 1, 8, 8)):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(shape))
    return model


class TestFreeze:
    def test_train_mode_uses_running_stats_and_never_updates_them(self):
        torch.manual_seed(0)
        model = _trained(tiny_resnet())
        reference = copy.deepcopy(model).eval()
        frozen = bd.freeze_bn(model).train()
        x = torch.randn(4, 1, 8, 8)
        first = frozen(x)
        frozen(torch.randn(4, 1, 8, 8))  # another batch in train mode
        assert torch.equal(first, frozen(x))
        torch.testing.assert_close(first, reference(x))
        assert _state_equal(frozen, reference)  # running stats and num_batches_tracked unchanged

    def test_affine_stays_trainable_by_default_and_freezes_on_request(self):
        model = tiny_resnet()
        soft = bd.freeze_bn(model)
        hard = bd.freeze_bn(model, affine=True)
        assert soft.stem[1].weight.requires_grad and soft.stem[1].bias.requires_grad
        assert not hard.stem[1].weight.requires_grad and not hard.stem[1].bias.requires_grad
        assert hard.stem[0].weight.requires_grad  # only BN affected
        loss = soft(torch.randn(2, 1, 8, 8)).sum()
        loss.backward()
        assert soft.stem[1].weight.grad is not None

    def test_input_model_untouched_unless_inplace(self):
        model = tiny_resnet()
        before = _bn_attributes(model)
        out = bd.freeze_bn(model, affine=True)
        assert out is not model and _bn_attributes(model) == before
        same = bd.freeze_bn(model, inplace=True)
        assert same is model and isinstance(model.stem[1], bd.layers.FrozenBatchNorm2d)

    @pytest.mark.parametrize("affine", [False, True])
    def test_round_trip_is_lossless(self, affine):
        model = randomize_bn(_trained(tiny_resnet()))
        model.layers[1][0].bn1.momentum = None
        model.layers[2][0].bn2.eps = 1e-3
        model.stem[0].weight.requires_grad_(False)
        model.layers[0][0].bn2.bias.requires_grad_(False)
        model.layers[0].eval()  # mixed modes
        back = bd.unfreeze_bn(bd.freeze_bn(model, affine=affine))
        assert _bn_attributes(back) == _bn_attributes(model)
        assert _state_equal(back, model)
        assert all(not hasattr(m, "_bndoctor_freeze") for m in back.modules())

    def test_unfreeze_follows_the_mode_asked_for_while_frozen(self):
        frozen = bd.freeze_bn(tiny_resnet().eval())
        frozen.train()
        assert not frozen.stem[1].training
        assert bd.unfreeze_bn(frozen).stem[1].training
        frozen.eval()
        assert not bd.unfreeze_bn(frozen).stem[1].training

    def test_freeze_is_idempotent_and_affine_can_be_added_later(self):
        model = tiny_resnet()
        twice = bd.freeze_bn(bd.freeze_bn(model), affine=True)
        assert not twice.stem[1].weight.requires_grad
        back = bd.unfreeze_bn(twice)
        assert _bn_attributes(back) == _bn_attributes(model)

    @pytest.mark.parametrize(
        ("layer", "shape"),
        [
            (nn.BatchNorm1d(3), (5, 3)),
            (nn.BatchNorm1d(3), (5, 3, 7)),
            (nn.BatchNorm2d(3), (5, 3, 4, 4)),
            (nn.BatchNorm3d(3), (5, 3, 2, 2, 2)),
            (nn.SyncBatchNorm(3), (5, 3, 4, 4)),
        ],
    )
    def test_all_dims_and_root_bn(self, layer, shape):
        randomize_bn(layer)
        reference = copy.deepcopy(layer).eval()
        frozen = bd.freeze_bn(layer).train()
        x = torch.randn(shape)
        torch.testing.assert_close(frozen(x), reference(x))
        assert type(bd.unfreeze_bn(frozen)) is type(layer)

    def test_subclass_with_its_own_forward_keeps_it(self):
        model = nn.Sequential(nn.Conv2d(2, 4, 3), BatchNormAct2d(4))
        randomize_bn(model)
        frozen = bd.freeze_bn(model).train()
        x = torch.randn(3, 2, 5, 5)
        assert isinstance(frozen[1], BatchNormAct2d) and type(frozen[1]).__name__ == "FrozenBatchNormAct2d"
        assert (frozen(x) >= 0).all()  # the activation is still there
        torch.testing.assert_close(frozen(x), model.eval()(x))
        assert type(bd.unfreeze_bn(frozen)[1]) is BatchNormAct2d

    def test_third_party_frozen_left_alone_and_bn_like_warned(self):
        model = nn.Sequential(ThirdPartyFrozenBN2d(2), MMStyleSyncBN(2), nn.BatchNorm2d(2))
        with pytest.warns(bd.BNDoctorWarning, match=r"skipped 1 BN-like layer.*'1'"):
            out = bd.freeze_bn(model)
        assert type(out[0]) is ThirdPartyFrozenBN2d and type(out[1]) is MMStyleSyncBN
        assert isinstance(out[2], bd.layers.FrozenBatchNorm2d)

    def test_modules_selection(self):
        frozen = bd.freeze_bn(tiny_resnet(), modules=["stem", "layers.0"])
        kinds = {r.name: r.frozen for r in bd.find_bn(frozen)}
        assert kinds["stem.1"] and kinds["layers.0.0.bn1"] and not kinds["layers.1.0.bn1"]

    def test_track_running_stats_false_is_a_clear_error(self):
        model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
        with pytest.raises(bd.errors.MissingRunningStatsError, match=r"freeze_bn needs running statistics.*'1'"):
            bd.freeze_bn(model)

    def test_uninitialised_lazy_is_a_clear_error(self):
        with pytest.raises(bd.errors.UninitializedLayerError, match=r"'0' .*LazyBatchNorm2d.*uninitialised"):
            bd.freeze_bn(nn.Sequential(nn.LazyBatchNorm2d()))

    def test_state_dict_keys_unchanged_so_checkpoints_load_both_ways(self):
        model = randomize_bn(tiny_resnet())
        frozen = bd.freeze_bn(tiny_resnet())
        frozen.load_state_dict(model.state_dict())
        assert _state_equal(frozen, model)

    def test_pickled_frozen_subclass_loads_in_a_fresh_process(self, tmp_path):
        import subprocess
        import sys

        model = bd.freeze_bn(nn.Sequential(BatchNormAct2d(3)))
        path = tmp_path / "m.pt"
        torch.save(model, path)
        code = (
            "import torch, sys; m = torch.load(sys.argv[1], weights_only=False); "
            "print(type(m[0]).__name__, m[0].training, type(m[0]).__mro__[2].__name__)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=str(_repo_root()),
        )
        assert out.stdout.split() == ["FrozenBatchNormAct2d", "False", "BatchNormAct2d"]


def _repo_root():
    import pathlib

    return pathlib.Path(__file__).resolve().parents[2]


def test_third_party_frozen_bn_becomes_trainable_on_request():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ThirdPartyFrozenBN2d(4))
    for name in ("weight", "bias", "running_mean", "running_var"):
        model[1].get_buffer(name).uniform_(0.5, 1.5)
    assert type(bd.unfreeze_bn(model)[1]) is ThirdPartyFrozenBN2d  # left alone by default
    trainable = bd.unfreeze_bn(model, third_party=True)
    layer = trainable[1]
    assert type(layer) is nn.BatchNorm2d and layer.weight.requires_grad and layer.eps == model[1].eps
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(trainable.eval()(x), model.eval()(x))
    trainable.train()(x)
    assert not torch.equal(layer.running_mean, model[1].running_mean)  # it learns statistics again
    with pytest.raises(bd.BNDoctorError, match="dims=1, 2 or 3"):
        bd.unfreeze_bn(model, third_party=True, dims=4)

import copy
import math

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


# --------------------------------------------------------------------------- freeze


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

    return pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- convert


class TestDefaultNumGroups:
    @pytest.mark.parametrize("channels", range(1, 600))
    def test_rule(self, channels):
        g = bd.remedies.default_num_groups(channels)
        assert channels % g == 0 and 1 <= g <= 32
        if channels >= 4:
            assert channels // g >= 4
        # the largest such divisor
        better = [d for d in range(g + 1, 33) if channels % d == 0 and channels // d >= 4]
        assert not better

    def test_small_channel_counts_never_get_one_channel_groups(self):
        assert bd.remedies.default_num_groups(4) == 1  # Opacus' gcd(32, 4) = 4 gave GroupNorm(4, 4)
        assert bd.remedies.default_num_groups(8) == 2


class TestConvertBN:
    def test_group_norm_with_affine_transferred(self):
        model = randomize_bn(tiny_resnet())
        model.layers[2][0].bn1.weight.requires_grad_(False)
        out = bd.convert_bn(model)
        assert not bd.find_bn(out)
        gn = out.layers[2][0].bn1
        src = model.layers[2][0].bn1
        assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 16 and gn.num_channels == 64
        assert torch.equal(gn.weight, src.weight) and torch.equal(gn.bias, src.bias)
        assert not gn.weight.requires_grad and gn.bias.requires_grad and gn.eps == src.eps

    def test_group_norm_math_matches_torch_functional(self):
        bn = randomize_bn(nn.BatchNorm2d(12))
        gn = bd.convert_bn(bn, num_groups=3)  # root replaced -> new root
        assert isinstance(gn, nn.GroupNorm)
        x = torch.randn(2, 12, 5, 5, dtype=torch.float64)
        expected = torch.nn.functional.group_norm(x, 3, bn.weight.double(), bn.bias.double(), bn.eps)
        torch.testing.assert_close(gn.double()(x), expected)

    @pytest.mark.parametrize(("to", "groups"), [("layer", 1), ("instance", 8)])
    def test_layer_and_instance(self, to, groups):
        out = bd.convert_bn(nn.Sequential(nn.BatchNorm2d(8)), to)
        assert out[0].num_groups == groups

    def test_instance_matches_instance_norm(self):
        bn = randomize_bn(nn.BatchNorm3d(4))
        inst = nn.InstanceNorm3d(4, affine=True)
        inst.load_state_dict({"weight": bn.weight, "bias": bn.bias})
        x = torch.randn(2, 4, 3, 3, 3)
        torch.testing.assert_close(bd.convert_bn(bn, "instance")(x), inst(x), atol=1e-5, rtol=1e-5)

    def test_bad_num_groups_names_layer_and_valid_values(self):
        model = nn.Sequential(nn.Conv2d(3, 48, 1), nn.Sequential(nn.BatchNorm2d(48)))
        match = r"num_groups=32 does not divide the 48 channels of '1\.0'"
        with pytest.raises(bd.errors.GroupCountError, match=match) as e:
            bd.convert_bn(model, num_groups=32)
        assert "16, 24, 48" in e.value.hint

    def test_callable_num_groups_and_validation_before_any_change(self):
        model = nn.Sequential(nn.BatchNorm2d(8), nn.BatchNorm2d(6))
        with pytest.raises(bd.errors.GroupCountError, match="'1'"):
            bd.convert_bn(model, num_groups=lambda c: 4, inplace=True)
        assert isinstance(model[0], nn.BatchNorm2d)  # nothing half-converted
        out = bd.convert_bn(model, num_groups=lambda c: c // 2)
        assert [m.num_groups for m in out] == [4, 3]

    def test_bad_target_and_misplaced_num_groups(self):
        with pytest.raises(bd.BNDoctorError, match="to='group', 'layer' or 'instance'"):
            bd.convert_bn(nn.BatchNorm2d(4), "batch")
        with pytest.raises(bd.errors.GroupCountError, match="to='group' only"):
            bd.convert_bn(nn.BatchNorm2d(4), "layer", num_groups=2)

    def test_keeps_device_dtype_mode_no_affine_and_no_bias(self):
        model = nn.Sequential(nn.BatchNorm1d(8, affine=False), nn.BatchNorm2d(8).double().eval())
        out = bd.convert_bn(model)
        assert out[0].weight is None and not out[0].affine
        assert out[1].weight.dtype == torch.float64 and not out[1].training and out[0].training
        try:
            nobias = nn.BatchNorm2d(8, bias=False)
        except TypeError:
            pytest.skip("this torch has no BatchNorm bias=False")
        gn = bd.convert_bn(nobias)
        assert gn.bias is None and gn(torch.randn(2, 8, 3, 3)).shape == (2, 8, 3, 3)

    def test_frozen_layers_convert_and_keep_requested_mode(self):
        model = nn.Sequential(ThirdPartyFrozenBN2d(4), nn.BatchNorm2d(4))
        frozen = bd.freeze_bn(model).train()
        out = bd.convert_bn(frozen)
        assert all(isinstance(m, nn.GroupNorm) and m.training for m in out)
        assert out[0].weight.requires_grad

    def test_shared_bn_converted_once(self):
        bn = nn.BatchNorm2d(8)
        out = bd.convert_bn(nn.Sequential(bn, nn.ReLU(), bn))
        assert out[0] is out[2] and isinstance(out[0], nn.GroupNorm)

    def test_uninitialised_lazy_is_a_clear_error(self):
        with pytest.raises(bd.errors.UninitializedLayerError, match="uninitialised lazy layer") as e:
            bd.convert_bn(nn.LazyBatchNorm2d())
        assert "run one forward pass" in e.value.hint

    def test_trains_afterwards(self):
        model = bd.convert_bn(tiny_resnet())
        out = model(torch.randn(2, 1, 8, 8))
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        assert math.isfinite(out.sum().item())

"""convert_bn and default_num_groups (bndoctor.remedies.norms)."""

import math

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from bndoctor.models import tiny_resnet
from tests._fakes import ThirdPartyFrozenBN2d, randomize_bn


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

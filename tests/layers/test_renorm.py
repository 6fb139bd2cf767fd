import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from tests._fakes import randomize_bn

C = 3


def _x(seed, n=4):
    return torch.randn(n, C, 3, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 + 1


def test_at_the_start_of_the_warm_up_it_is_batchnorm():
    layer = randomize_bn(bd.BatchRenorm(C).double())
    reference = nn.BatchNorm2d(C, momentum=0.01).double()
    reference.load_state_dict(layer.state_dict())
    x, x_ref = _x(0).requires_grad_(True), _x(0).requires_grad_(True)
    g = torch.randn_like(x)
    out, expected = layer(x), reference(x_ref)
    torch.testing.assert_close(out, expected)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.running_var, reference.running_var)
    layer.eval()
    reference.eval()
    torch.testing.assert_close(layer(_x(1)), reference(_x(1)))


def test_correction_and_gradient_match_the_paper_with_r_and_d_constant():
    layer = randomize_bn(bd.BatchRenorm(C, r_max=1.5, d_max=0.5, warmup_steps=0).double())
    running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()
    x = _x(2).requires_grad_(True)
    g = torch.randn_like(x)
    (layer(x) * g).sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    dims, shape = (0, 2, 3), (1, C, 1, 1)
    mean_b = ref_x.mean(dims)
    std_b = torch.sqrt(ref_x.var(dims, unbiased=False) + layer.eps)
    std = torch.sqrt(running_var + layer.eps)
    r = (std_b / std).clamp(1 / 1.5, 1.5).detach()
    d = ((mean_b - running_mean) / std).clamp(-0.5, 0.5).detach()
    assert (r != std_b.detach() / std).any() or (d != (mean_b.detach() - running_mean) / std).any()  # clipping active
    y = ((ref_x - mean_b.view(shape)) / std_b.view(shape) * r.view(shape) + d.view(shape)) * layer.weight.detach().view(
        shape
    ) + layer.bias.detach().view(shape)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_limits_ramp_and_bad_arguments():
    layer = bd.BatchRenorm(C, r_max=3, d_max=5, warmup_steps=10)
    assert layer.limits() == (1.0, 0.0)
    layer.num_batches_tracked.fill_(5)
    assert layer.limits() == (2.0, 2.5)
    layer.num_batches_tracked.fill_(50)
    assert layer.limits() == (3.0, 5.0)
    with pytest.raises(bd.BNDoctorError, match="r_max >= 1"):
        bd.BatchRenorm(C, r_max=0.5)
    with pytest.raises(bd.BNDoctorError, match="0 < momentum <= 1"):
        bd.BatchRenorm(C, momentum=None)


def test_convert_and_revert():
    model = nn.Sequential(nn.Conv2d(1, C, 1), nn.BatchNorm2d(C))
    renorm = bd.to_batch_renorm(model, warmup_steps=7)
    assert isinstance(renorm[1], bd.BatchRenorm) and renorm[1].momentum == 0.01 and renorm[1].warmup_steps == 7
    back = bd.from_batch_renorm(renorm)
    assert type(back[1]) is nn.BatchNorm2d


def test_a_layer_without_running_statistics_is_refused_up_front():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(bd.errors.MissingRunningStatsError, match=r"to_batch_renorm needs running statistics.*'1'"):
        bd.to_batch_renorm(model)
    assert type(model[1]) is nn.BatchNorm2d


def test_switching_running_statistics_off_leaves_the_buffers_alone():
    layer = bd.BatchRenorm(4, warmup_steps=0)
    before = (layer.running_mean.clone(), layer.running_var.clone())
    layer.track_running_stats = False
    x = torch.randn(8, 4)
    torch.testing.assert_close(layer(x), nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True))
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])


def test_momentum_is_set_on_the_converted_layers_only():
    model = nn.Sequential(bd.BatchRenorm(4, momentum=0.2), nn.BatchNorm2d(4))
    with pytest.warns(bd.BNDoctorWarning, match="already a bndoctor remedy layer"):
        converted = bd.to_batch_renorm(model, momentum=0.05)
    assert converted[0].momentum == 0.2 and converted[1].momentum == 0.05

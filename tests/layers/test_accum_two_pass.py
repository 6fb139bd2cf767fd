"""AccumBatchNorm's two-pass variant: collect_window gathers the whole window before the gradient pass."""

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from tests.layers._accum_inputs import SHAPE, C, _layer, _micro, _normalised, _pooled

# --------------------------------------------------------------------------- two passes


@pytest.mark.parametrize("mode", ["renorm", "progressive"])
def test_two_passes_normalise_every_micro_batch_with_the_whole_window(mode):
    layer = _layer(mode)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    bd.accumulate_bn(layer, opt)
    xs = [_micro(k) for k in range(4)]
    running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()
    assert bd.collect_window(layer, xs) == 8
    assert torch.equal(layer.running_mean, running_mean) and layer.holds_collected
    mean, var, unbiased = _pooled(xs)
    for x in xs:  # the first micro-batch too: the single pass would use its own statistics there
        torch.testing.assert_close(layer(x), _normalised(layer, x, mean, var), rtol=1e-10, atol=1e-10)
    opt.step()
    torch.testing.assert_close(layer.running_mean, 0.8 * running_mean + 0.2 * mean)
    torch.testing.assert_close(layer.running_var, 0.8 * running_var + 0.2 * unbiased)
    assert int(layer.num_batches_tracked) == 1 and not layer.holds_collected and not layer.window_open


def test_two_pass_renorm_gradient_uses_the_whole_window_as_reference():
    layer = _layer("renorm")
    xs = [_micro(k) for k in range(3)]
    with bd.accumulation_window(layer):
        bd.collect_window(layer, xs)
        x = xs[0].clone().requires_grad_(True)
        g = torch.randn_like(x)
        (layer(x) * g).sum().backward()
    mean, var, _ = _pooled(xs)
    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    ref_x = xs[0].clone().requires_grad_(True)
    dims = (0, 2, 3)
    batch_mean, batch_std = ref_x.mean(dims), torch.sqrt(ref_x.var(dims, unbiased=False) + layer.eps)
    std = torch.sqrt(var + layer.eps)
    r, d = (batch_std / std).detach(), ((batch_mean - mean) / std).detach()
    x_hat = (ref_x - batch_mean.view(SHAPE)) / batch_std.view(SHAPE)
    y = (x_hat * r.view(SHAPE) + d.view(SHAPE)) * weight.view(SHAPE) + bias.view(SHAPE)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(layer.weight.grad, weight.grad)
    torch.testing.assert_close(layer.bias.grad, bias.grad)


def test_collect_window_misuse_is_refused_with_a_hint():
    layer = _layer()
    with bd.accumulation_window(layer):
        bd.collect_window(layer, [_micro(0)])
        with pytest.raises(bd.BNDoctorError, match="fresh window"):
            bd.collect_window(layer, [_micro(1)])
    layer.eval()
    with pytest.raises(bd.BNDoctorError, match="training mode"):
        bd.collect_window(layer, [_micro(1)])
    with pytest.raises(bd.BNDoctorError, match="no AccumBatchNorm"):
        bd.collect_window(nn.BatchNorm2d(C), [_micro(1)])


def test_collect_window_forgets_a_failed_pass_and_feeds_tuples_and_custom_forwards():
    layer = _layer()

    def batches():
        yield _micro(0)
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        bd.collect_window(layer, batches())
    assert not layer.window_open and not layer.holds_collected and not layer.controlled
    assert bd.collect_window(layer, [(_micro(0), torch.zeros(2))]) == 2
    layer.reset_window()
    seen = []
    assert bd.collect_window(layer, [{"a": _micro(1)}], forward=lambda m, b: seen.append(m(b["a"]))) == 2
    assert len(seen) == 1 and layer.holds_collected


def test_two_passes_in_a_network_match_the_single_pass_window_at_the_first_layer():
    torch.manual_seed(0)
    model = bd.to_accum_bn(nn.Sequential(nn.Conv2d(C, 4, 1), nn.BatchNorm2d(4), nn.ReLU())).double()
    xs = [_micro(k) for k in range(3)]
    with bd.accumulation_window(model):
        bd.collect_window(model, xs)
        _, mean, var = model[1].window_statistics(collected=True)
    with torch.no_grad():
        conv = torch.cat([model[0](x) for x in xs])
    torch.testing.assert_close(mean, conv.mean((0, 2, 3)))
    torch.testing.assert_close(var, conv.var((0, 2, 3), unbiased=False))

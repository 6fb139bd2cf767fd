"""AccumBatchNorm: pooled window statistics, one EMA step per optimizer step, gradients, window control."""

import copy

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from bndoctor.models import tiny_resnet
from tests._fakes import randomize_bn

C = 3


def _micro(k, n=2, shape=(4, 5)):
    gen = torch.Generator().manual_seed(k)
    return torch.randn(n, C, *shape, generator=gen, dtype=torch.float64) * (1 + k % 3) + k


def _layer(mode="progressive"):
    layer = randomize_bn(bd.AccumBatchNorm(C, mode=mode, momentum=0.2).double())
    layer.running_var.fill_(1.5)
    return layer


def _pooled(xs):
    values = torch.cat([x.transpose(0, 1).reshape(C, -1) for x in xs], dim=1)
    return values.mean(1), values.var(1, unbiased=False), values.var(1, unbiased=True)


@pytest.mark.parametrize("mode", ["progressive", "renorm"])
def test_last_micro_batch_uses_window_statistics_and_one_ema_step_commits_them(mode):
    layer = _layer(mode)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    bd.accumulate_bn(layer, opt)
    xs = [_micro(k) for k in range(5)]
    running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()
    for x in xs[:-1]:
        layer(x)
    out = layer(xs[-1])
    mean, var, unbiased = _pooled(xs)
    shape = (1, C, 1, 1)
    expected = (xs[-1] - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps) * layer.weight.view(
        shape
    ) + layer.bias.view(shape)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(layer.running_mean, running_mean)  # nothing committed inside the window
    opt.step()
    torch.testing.assert_close(layer.running_mean, 0.8 * running_mean + 0.2 * mean)
    torch.testing.assert_close(layer.running_var, 0.8 * running_var + 0.2 * unbiased)
    assert int(layer.num_batches_tracked) == 1 and not layer.window_open


def test_statistics_pool_per_layer_in_a_deeper_network():
    torch.manual_seed(0)
    model = bd.to_accum_bn(
        nn.Sequential(nn.Conv2d(C, 4, 1), nn.BatchNorm2d(4), nn.Tanh(), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5))
    ).double()
    inputs = {1: [], 4: []}
    for i in (1, 4):
        model[i].register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].detach()))
    with bd.accumulation_window(model):
        for k in range(4):
            model(_micro(k))
        for i in (1, 4):
            values = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in inputs[i]], dim=1)
            _, mean, var = model[i].window_statistics()
            torch.testing.assert_close(mean, values.mean(1))
            torch.testing.assert_close(var, values.var(1, unbiased=False))


def _last_micro_batch_backward(layer):
    """Three micro-batches, then backward through a fourth; returns what a reference needs."""
    with bd.accumulation_window(layer):
        earlier = [_micro(k) for k in range(3)]
        for x in earlier:
            layer(x)
        x = _micro(7).requires_grad_(True)
        g = torch.randn_like(x)
        (layer(x) * g).sum().backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, layer.weight, layer.bias)]
    return earlier, x, g, leaves


def _assert_same_grads(layer, x, leaves):
    for ours, theirs in zip((x, layer.weight, layer.bias), leaves):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-8, atol=1e-10)


def test_gradient_matches_autograd_of_the_pooled_formulation():
    layer = _layer()
    earlier, x, g, (ref_x, weight, bias) = _last_micro_batch_backward(layer)
    # reference: the same formula written with autograd, earlier micro-batches constant
    values = torch.cat([e.transpose(0, 1).reshape(C, -1) for e in earlier] + [ref_x.transpose(0, 1).reshape(C, -1)], 1)
    mean = values.mean(1)
    var = (values * values).mean(1) - mean * mean
    shape = (1, C, 1, 1)
    y = (ref_x - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps) * weight.view(shape) + bias.view(shape)
    (y * g).sum().backward()
    _assert_same_grads(layer, x, (ref_x, weight, bias))


def test_renorm_gradient_is_batch_renormalization_with_the_window_as_reference():
    layer = _layer("renorm")
    assert bd.AccumBatchNorm(3).mode == "renorm"  # the default
    earlier, x, g, (ref_x, weight, bias) = _last_micro_batch_backward(layer)
    mean, var, _ = _pooled([*earlier, x.detach()])
    shape = (1, C, 1, 1)
    dims = (0, 2, 3)
    batch_mean = ref_x.mean(dims)
    batch_std = torch.sqrt(ref_x.var(dims, unbiased=False) + layer.eps)
    std = torch.sqrt(var + layer.eps)
    r = (batch_std / std).detach()
    d = ((batch_mean - mean) / std).detach()
    x_hat = (ref_x - batch_mean.view(shape)) / batch_std.view(shape)
    y = (x_hat * r.view(shape) + d.view(shape)) * weight.view(shape) + bias.view(shape)
    (y * g).sum().backward()
    _assert_same_grads(layer, x, (ref_x, weight, bias))


@pytest.mark.parametrize("mode", ["progressive", "renorm"])
def test_first_micro_batch_is_plain_bn_and_eval_is_plain_bn(mode):
    layer = _layer(mode)
    reference = nn.BatchNorm2d(C, momentum=0.2).double()
    reference.load_state_dict(layer.state_dict())
    x = _micro(1, n=4).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn_like(x)
    with bd.accumulation_window(layer):
        out = layer(x)
        expected = reference(x_ref)  # one train-mode call each: running statistics stay comparable
        torch.testing.assert_close(out, expected)
        (out * g).sum().backward()
        (expected * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    layer.eval()
    reference.eval()
    torch.testing.assert_close(layer(x), reference(x))
    assert set(layer.state_dict()) == set(reference.state_dict())


def test_blend_mode_fills_the_window_with_the_previous_one():
    layer = _layer("blend")
    with bd.accumulation_window(layer):
        first = [_micro(k) for k in range(4)]
        for x in first:
            layer(x)
    x = _micro(9)
    with bd.accumulation_window(layer):
        out = layer(x)
    # previous window (8 samples x 20 positions) weighted for the 7 samples this window has not seen
    mean_p, var_p, _ = _pooled(first)
    mean_x, var_x, _ = _pooled([x])
    n_x, n_p = 40.0, 120.0
    mean = (n_x * mean_x + n_p * mean_p) / (n_x + n_p)
    var = (n_x * (var_x + mean_x**2) + n_p * (var_p + mean_p**2)) / (n_x + n_p) - mean**2
    shape = (1, C, 1, 1)
    expected = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps) * layer.weight.view(
        shape
    ) + layer.bias.view(shape)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_without_window_control_it_warns_once_and_acts_as_plain_bn():
    layer = _layer()
    reference = nn.BatchNorm2d(C, momentum=0.2).double()
    reference.load_state_dict(layer.state_dict())
    x = _micro(2)
    with pytest.warns(bd.BNDoctorWarning, match="without window control"):
        out = layer(x)
    torch.testing.assert_close(out, reference(x))
    torch.testing.assert_close(layer.running_var, reference.running_var)
    layer(x)  # no second warning (pytest would turn it into an error)


def test_window_errors_and_discard_on_exception():
    layer = _layer()
    with (
        pytest.raises(bd.BNDoctorError, match="do not nest"),
        bd.accumulation_window(layer),
        bd.accumulation_window(layer),
    ):
        pass
    before = layer.running_mean.clone()
    with pytest.raises(RuntimeError, match="boom"), bd.accumulation_window(layer):
        layer(_micro(0))
        raise RuntimeError("boom")
    assert torch.equal(layer.running_mean, before) and not layer.window_open
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    handle = bd.accumulate_bn(layer, opt)
    layer(_micro(0))
    with pytest.raises(bd.BNDoctorError, match="already open"), bd.accumulation_window(layer):
        pass
    with pytest.raises(bd.BNDoctorError, match="accumulation window open"):
        bd.from_accum_bn(layer)
    opt.step()
    assert handle.steps == 1
    handle.remove()
    with pytest.raises(bd.BNDoctorError, match="no AccumBatchNorm"):
        bd.accumulate_bn(nn.Linear(2, 2), opt)
    with pytest.raises(bd.BNDoctorError, match=r"torch\.optim\.Optimizer"):
        bd.accumulate_bn(layer, "sgd")


def test_round_trip_and_plain_training_loop():
    model = randomize_bn(tiny_resnet())
    accum = bd.to_accum_bn(model)
    assert all(isinstance(m, bd.AccumBatchNorm) for m in accum.modules() if isinstance(m, nn.BatchNorm2d)) is True
    back = bd.from_accum_bn(accum)
    sa, sb = model.state_dict(), back.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and type(back.stem[1]) is nn.BatchNorm2d
    opt = torch.optim.SGD(accum.parameters(), lr=0.05)
    bd.accumulate_bn(accum, opt)
    for _ in range(2):
        for _ in range(4):
            loss = nn.functional.cross_entropy(accum(torch.randn(2, 1, 8, 8)), torch.randint(0, 10, (2,)))
            (loss / 4).backward()
        opt.step()
        opt.zero_grad()
    assert int(accum.stem[1].num_batches_tracked) == 2  # one update per optimizer step, not per micro-batch
    exported = bd.from_accum_bn(copy.deepcopy(accum))
    assert not any(isinstance(m, bd.AccumBatchNorm) for m in exported.modules())


def test_a_copy_or_a_cast_mid_window_keeps_its_own_window():
    """The layer reuses views of its window tensor: a deep copy, a pickle round trip or a dtype cast
    taken mid-window must each update their own window, never the original's."""
    import io

    torch.manual_seed(0)
    xs = [torch.randn(2, 3, 4, 4, dtype=torch.float64) + k for k in range(3)]
    reference = torch.cat(xs).transpose(0, 1).reshape(3, -1)
    layer = bd.AccumBatchNorm(3).double()
    layer.acquire_control()
    layer(xs[0])
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(layer), torch.load(buffer, weights_only=False), copy.deepcopy(layer).float().double()]
    before = layer.window_statistics()
    for twin in copies:
        for x in xs[1:]:
            twin(x)
        count, mean, var = twin.window_statistics()
        assert count == 96
        torch.testing.assert_close(mean, reference.mean(1))
        torch.testing.assert_close(var, reference.var(1, unbiased=False), rtol=1e-5, atol=1e-6)
        twin.reset_window()  # zeroes the window the layer now holds: the next one starts empty
        twin(xs[0])
        assert twin.window_statistics()[0] == 32
    count, mean, var = layer.window_statistics()  # the original saw one micro-batch only
    assert count == before[0] == 32 and torch.equal(mean, before[1]) and torch.equal(var, before[2])

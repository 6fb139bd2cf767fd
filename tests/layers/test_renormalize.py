"""The eager Batch Renorm kernel shared by BatchRenorm and accumulation-aware BN, against a float64 oracle.

``renormalize`` computes ``gamma (r x_hat_B + d) + beta`` either in one
autograd node from statistics computed once (eval-mode BN kernel forward,
training-mode BN backward kernel; large inputs) or as one training-mode BN call
with folded affine parameters (small inputs); every test runs both paths. The
oracle differentiates the formula written out with raw tensor operations, r and
d held constant.
"""

import pytest
import torch

import bndoctor as bd
from bndoctor.layers import _renormalize
from bndoctor.layers._batch import batch_moments, batch_stats
from bndoctor.layers._renormalize import renormalize

EPS = 1e-5


@pytest.fixture(params=["one-pass", "folded"])
def path(request, monkeypatch):
    """Force renormalize's path whatever the input's size."""
    monkeypatch.setattr(_renormalize, "one_pass", lambda x: request.param == "one-pass")
    return request.param


def _inputs(shape, seed=0, affine=True):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 1.7 + 0.4
    r = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    d = torch.randn(c, generator=gen, dtype=torch.float64) * 0.3
    weight = (torch.randn(c, generator=gen, dtype=torch.float64) + 1.0).requires_grad_(True) if affine else None
    bias = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_(True) if affine else None
    return x, r, d, weight, bias


def _oracle(x, weight, bias, r, d):
    """The formula from raw operations: batch statistics differentiable, r and d constants."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    x_hat = (x - mean) / torch.sqrt(var + EPS)
    y = x_hat * r.view(shape) + d.view(shape)
    if weight is not None:
        y = y * weight.view(shape) + bias.view(shape)
    return y


def _run(fn, x, weight, bias, r, d, grad):
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) if p is not None else None for p in (weight, bias)]
    out = fn(x, params[0], params[1], r, d)
    out.backward(grad)
    grads = [x.grad] + [p.grad for p in params if p is not None]
    return out.detach(), grads


def _ours(x, weight, bias, r, d):
    with torch.no_grad():
        stats = batch_stats(x, EPS)
    return renormalize(x, weight, bias, r, d, stats, eps=EPS)


def _assert_matches_the_formula(x, weight, bias, r, d, grad):
    """Output and every gradient of renormalize equal the float64 oracle's."""
    out, grads = _run(_ours, x, weight, bias, r, d, grad)
    ref, ref_grads = _run(_oracle, x, weight, bias, r, d, grad)
    torch.testing.assert_close(out, ref)
    for ours, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 2)], ids=["2d", "3d", "4d", "5d"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_output_and_gradients_equal_the_formula(shape, affine, path):
    x, r, d, weight, bias = _inputs(shape, affine=affine)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    _assert_matches_the_formula(x, weight, bias, r, d, grad)


def test_channels_last_input_and_a_non_contiguous_upstream_gradient(path):
    x, r, d, weight, bias = _inputs((3, 4, 5, 6), seed=1)
    x = x.to(memory_format=torch.channels_last)
    grad = torch.randn(3, 6, 5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64).transpose(1, 3)
    assert not grad.is_contiguous()
    _assert_matches_the_formula(x, weight, bias, r, d, grad)


def test_only_the_gradients_asked_for_are_computed(path):
    x, r, d, weight, bias = _inputs((4, 3, 2, 2), seed=3)
    with torch.no_grad():
        stats = batch_stats(x, EPS)
    bias_only = bias.detach().clone().requires_grad_(True)
    renormalize(x, weight.detach(), bias_only, r, d, stats, eps=EPS).sum().backward()  # x and weight: no grad
    torch.testing.assert_close(bias_only.grad, torch.full_like(bias_only, 4 * 2 * 2))
    x_only = x.clone().requires_grad_(True)
    out = renormalize(x_only, weight.detach(), bias.detach(), r, d, stats, eps=EPS)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x_only.grad, torch.zeros_like(x_only), atol=1e-12, rtol=0)  # BN: the sum has no grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_statistics_kernel_takes_the_ema_step_with_the_unbiased_variance(dtype):
    x = _inputs((4, 3, 2, 2), seed=4)[0]
    running_mean = torch.randn(3, dtype=torch.float64)
    running_var = torch.rand(3, dtype=torch.float64) + 0.5
    expected_mean = 0.9 * running_mean + 0.1 * x.mean((0, 2, 3))
    expected_var = 0.9 * running_var + 0.1 * x.var((0, 2, 3), unbiased=True)
    buffers = running_mean.to(dtype), running_var.to(dtype)  # bfloat16: statistics in float32, the step in bf16
    with torch.no_grad():
        mean, _, _ = batch_stats(x.to(dtype), EPS, (*buffers, 0.1))
    tolerance = {} if dtype == torch.float64 else {"atol": 0.02, "rtol": 0.02}
    torch.testing.assert_close(mean.double(), x.to(dtype).double().mean((0, 2, 3)), **tolerance)
    torch.testing.assert_close(buffers[0].double(), expected_mean, **tolerance)
    torch.testing.assert_close(buffers[1].double(), expected_var, **tolerance)


def test_batch_renorm_takes_r_and_d_from_the_statistics_before_the_step(path):
    """The EMA step happens in the statistics kernel, after r and d have read the running statistics."""
    layer = bd.BatchRenorm(3, r_max=2.0, d_max=1.0, warmup_steps=0, momentum=0.5).double()
    layer.running_mean.copy_(torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64))
    layer.running_var.copy_(torch.tensor([2.0, 0.5, 1.5], dtype=torch.float64))
    old_mean, old_var = layer.running_mean.clone(), layer.running_var.clone()
    x = _inputs((4, 3, 2, 2), seed=10)[0]
    out = layer(x)
    dims = (0, 2, 3)
    std_b = torch.sqrt(x.var(dims, unbiased=False) + layer.eps)
    std = torch.sqrt(old_var + layer.eps)
    r = (std_b / std).clamp(0.5, 2.0)
    d = ((x.mean(dims) - old_mean) / std).clamp(-1.0, 1.0)
    expected = _oracle(x, layer.weight.detach(), layer.bias.detach(), r, d)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(layer.running_mean, 0.5 * old_mean + 0.5 * x.mean(dims))
    torch.testing.assert_close(layer.running_var, 0.5 * old_var + 0.5 * x.var(dims, unbiased=True))


def test_one_value_per_channel_leaves_batch_renorm_untouched(path):
    layer = bd.BatchRenorm(3).train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)


def test_one_value_per_channel_is_refused_as_torch_refuses_it(path):
    x, r, d, weight, bias = _inputs((1, 3), seed=5)
    with torch.no_grad():
        stats = batch_stats(x, EPS)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        renormalize(x, weight, bias, r, d, stats, eps=EPS)


def test_both_paths_are_twice_differentiable(path):
    """Second-order gradients (MAML, gradient penalties) equal the formula's, on the one-pass path too."""
    x, r, d, weight, bias = _inputs((4, 3, 2, 2), seed=6)
    results = []
    for fn in (_ours, _oracle):
        xg = x.clone().requires_grad_(True)
        w, b = weight.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
        out = fn(xg, w, b, r, d)
        gx, gw = torch.autograd.grad(
            (out.pow(3) * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (xg, w), create_graph=True
        )
        results.append(torch.autograd.grad(gx.pow(2).sum() + gw.pow(2).sum(), (xg, w, b)))
    for ours, expected in zip(*results, strict=True):
        torch.testing.assert_close(ours, expected)


def test_the_path_follows_the_input_size():
    assert not _renormalize.one_pass(torch.empty(2, 16, 8, 8))  # the tiny ResNet's first layer: 2048 values
    assert _renormalize.one_pass(torch.empty(2, 64, 32, 32))  # a ResNet-18 stem at 64x64 input
    assert not _renormalize.one_pass(torch.empty(4096, 64))  # (N, C): the training-mode kernel is as fast
    assert not _renormalize.one_pass(torch.empty(2, 64, 32, 32, device="meta"))  # not a CPU tensor


def test_bfloat16_input_with_float32_parameters(path):
    x, r, d, weight, bias = _inputs((4, 3, 4, 4), seed=7)
    grad = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    to32 = [t.float() if t is not None else None for t in (weight, bias)]
    out, grads = _run(_ours, x.bfloat16(), *to32, r.float(), d.float(), grad.bfloat16())
    ref, ref_grads = _run(_oracle, x.bfloat16().double(), weight, bias, r, d, grad.bfloat16().double())
    assert out.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=0.05, rtol=0.02)
    torch.testing.assert_close(grads[0].double(), ref_grads[0], atol=0.05, rtol=0.02)
    for ours, expected in zip(grads[1:], ref_grads[1:], strict=True):
        torch.testing.assert_close(ours.double(), expected, atol=1e-3, rtol=1e-3)


def test_statistics_helpers_match_raw_moments():
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3 + 2
    x[:, 1] = 7.0  # a constant channel: variance 0, not NaN
    mean, var, invstd = batch_stats(x, EPS)
    torch.testing.assert_close(mean, x.mean((0, 2)))
    torch.testing.assert_close(var, x.var((0, 2), unbiased=False))
    torch.testing.assert_close(invstd, torch.rsqrt(x.var((0, 2), unbiased=False) + EPS))
    m, v = batch_moments(x)
    torch.testing.assert_close((m, v), (mean, var))
    assert v[1] == 0


def test_one_value_per_channel_leaves_the_accumulation_window_untouched(path):
    layer = bd.AccumBatchNorm(3).train()
    layer.acquire_control()
    layer(torch.randn(4, 3))
    window = [t.clone() for t in layer.window_parts()]
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    torch.testing.assert_close(list(layer.window_parts()), window)

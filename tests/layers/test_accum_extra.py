"""AccumBatchNorm's two-pass variant (collect_window) and pooling across ranks (sync)."""

import copy

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from tests._dist import run_ranks
from tests._fakes import randomize_bn

C = 3
SHAPE = (1, C, 1, 1)


def _micro(k, n=2):
    gen = torch.Generator().manual_seed(k)
    return torch.randn(n, C, 4, 5, generator=gen, dtype=torch.float64) * (1 + k % 3) + k


def _layer(mode="renorm", **kwargs):
    torch.manual_seed(0)
    layer = randomize_bn(bd.AccumBatchNorm(C, mode=mode, momentum=0.2, **kwargs).double())
    layer.running_var.fill_(1.5)
    return layer


def _pooled(xs):
    values = torch.cat([x.transpose(0, 1).reshape(C, -1) for x in xs], dim=1)
    return values.mean(1), values.var(1, unbiased=False), values.var(1, unbiased=True)


def _normalised(layer, x, mean, var):
    return (x - mean.view(SHAPE)) / torch.sqrt(var.view(SHAPE) + layer.eps) * layer.weight.view(
        SHAPE
    ) + layer.bias.view(SHAPE)


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


# --------------------------------------------------------------------------- across ranks


def _sync_rank(rank, world_size, sizes):
    layer = _layer(sync=True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    bd.accumulate_bn(layer, opt)
    outs = []
    for k in range(3):
        x = _micro(10 * k + rank, n=sizes[rank])
        outs.append(layer(x).detach())
    opt.step()
    return {"outs": outs, "running": (layer.running_mean.clone(), layer.running_var.clone())}


@pytest.mark.parametrize("sizes", [(2, 2), (3, 1), (2, 0)])
def test_sync_pools_the_window_across_ranks(sizes):
    results = run_ranks(_sync_rank, 2, sizes)
    for r in results:
        assert not isinstance(r, BaseException), r
    reference = _layer()  # one process, micro-batches = the ranks' micro-batches side by side
    seen = []
    with bd.accumulation_window(reference):
        for k in range(3):
            xs = [_micro(10 * k + r, n=sizes[r]) for r in range(2)]
            seen.extend(xs)
            mean, var, _ = _pooled(seen)
            for rank in range(2):
                if sizes[rank]:
                    expected = _normalised(reference, xs[rank], mean, var)
                    torch.testing.assert_close(results[rank]["outs"][k], expected)
            reference(torch.cat(xs))
    for r in results:
        torch.testing.assert_close(r["running"][0], reference.running_mean)
        torch.testing.assert_close(r["running"][1], reference.running_var)


def test_to_accum_bn_syncs_layers_that_were_syncbn():
    model = nn.Sequential(nn.Conv2d(C, 4, 1), bd.SyncBatchNorm(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    converted = bd.to_accum_bn(model)
    assert converted[1].sync and not converted[3].sync
    assert all(m.sync for m in bd.to_accum_bn(model, sync=True).modules() if isinstance(m, bd.AccumBatchNorm))
    assert type(bd.from_accum_bn(converted)[1]) is bd.SyncBatchNorm
    with pytest.raises(bd.BNDoctorError, match="sync True, False or None"):
        bd.to_accum_bn(model, sync="yes")
    copied = __import__("copy").deepcopy(converted)
    assert copied[1].sync and "sync=True" in repr(copied[1])


def test_sync_without_a_process_group_is_the_local_window():
    local, synced = _layer(), _layer(sync=True)
    xs = [_micro(k) for k in range(3)]
    with bd.accumulation_window(local), bd.accumulation_window(synced):
        for x in xs:
            torch.testing.assert_close(synced(x), local(x))


def test_the_window_starts_in_the_layers_dtype_and_without_running_statistics():
    """The open window is float64 for float64 layers (built, converted or cast); no running stats: plain BN."""

    def dtypes(layer):
        return {t.dtype for t in layer.window_parts()}

    assert dtypes(bd.AccumBatchNorm(4, dtype=torch.float64)) == {torch.float64}
    assert dtypes(bd.AccumBatchNorm(4, affine=False, track_running_stats=False, dtype=torch.float64)) == {torch.float64}
    converted = bd.to_accum_bn(nn.Sequential(nn.BatchNorm2d(3)).double())
    assert dtypes(converted[0]) == {torch.float64}  # a compiled model would otherwise recompile on first use
    assert dtypes(bd.AccumBatchNorm(4).double()) == {torch.float64}
    # track_running_stats=False (built or converted): trains as plain BN, nothing to commit
    for model in (
        nn.Sequential(bd.AccumBatchNorm(3, track_running_stats=False)),
        bd.to_accum_bn(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False))),
    ):
        reference = nn.BatchNorm2d(3, track_running_stats=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        bd.accumulate_bn(model, optimizer)
        x = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close(model(x), reference(x))
        optimizer.step()
        assert model[0].running_mean is None


def test_closing_windows_together_equals_closing_them_one_by_one():
    """The batched close (optimizer hook, close_windows) commits exactly what close_window commits, layer by layer.

    Mixed on purpose: NaN and Inf windows and an empty-count window (not committed), another momentum, momentum
    None, a float64 layer, blend mode, a layer without running statistics and one whose window is not open.
    """
    from bndoctor.layers.accum import close_windows_together

    torch.manual_seed(0)
    layers = [bd.AccumBatchNorm(c) for c in (3, 5, 4, 6, 2, 3, 4, 3)]
    layers[3].momentum = 0.3
    layers[4].momentum = None
    layers[5] = bd.AccumBatchNorm(6, dtype=torch.float64)
    layers[6].mode = "blend"
    layers[7] = bd.AccumBatchNorm(3, track_running_stats=False)
    for layer in layers:
        if layer.running_mean is not None:
            randomize_bn(layer)
        layer.acquire_control()
        layer.train()
        for _ in range(3):
            layer(torch.randn(2, layer.num_features, 3, dtype=layer.weight.dtype) * 2 + 1)
    extra = bd.AccumBatchNorm(4)  # no forward: nothing open
    extra.acquire_control()
    layers.append(extra)
    with torch.no_grad():
        layers[0].window_parts()[1][1] = float("nan")
        layers[1].window_parts()[2][0] = float("inf")
        layers[2].window_parts()[0].zero_()  # an all-empty global window (possible with sync)
    one_by_one = copy.deepcopy(layers)
    for layer in one_by_one:
        layer.close_window()
    close_windows_together(layers)
    for index, (a, b) in enumerate(zip(one_by_one, layers)):
        for (name, x), y in zip(a.named_buffers(), b.buffers()):
            assert torch.equal(x, y), (index, name)
        assert not b.window_open and b.window_statistics() is None
    assert int(layers[0].num_batches_tracked) == 0 and int(layers[3].num_batches_tracked) == 1


@pytest.mark.parametrize("mode", ["renorm", "blend"])
def test_a_model_built_on_the_meta_device_materialises_with_an_empty_window(mode):
    """``to_empty`` (large models are built on the meta device, then materialised) gives a fresh window there."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    model = bd.to_accum_bn(model, mode=mode).to_empty(device="cpu")
    layer = model[1]
    assert all(t.device.type == "cpu" and not t.any() for t in layer.window_parts())
    assert not layer.window_open and layer._previous is None
    for module in model.modules():  # the usual initialisation after to_empty
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bd.accumulate_bn(model, optimizer)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for _ in range(3):
            model(torch.randn(2, 1, 6, 6, generator=gen)).sum().backward()
        assert layer.window_statistics()[0] == 3 * 2 * 4 * 4  # 3 micro-batches of 2 x 4 x 4 values per channel
        optimizer.step()
    assert int(layer.num_batches_tracked) == 2
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()


def test_the_held_windows_follow_the_layer_to_another_dtype():
    """blend's last window and a collected window move with the layer (a later window would mix them otherwise)."""
    layer = bd.AccumBatchNorm(3, mode="blend").train()
    layer.acquire_control()
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    layer(x)
    layer.close_window()
    layer(x)
    layer.hold_collected()
    layer.double()
    held = [*layer._previous, *layer._collected]
    assert all(t.dtype == torch.float64 for t in held)
    eager = layer(x.double())  # normalises with the collected window, in float64 throughout
    assert eager.dtype == torch.float64 and torch.isfinite(eager).all()

"""AccumBatchNorm's window: pooled across ranks (sync), its dtype and device, closed together or one by one."""

import copy

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from tests._dist import run_ranks
from tests._fakes import randomize_bn
from tests.layers._accum_inputs import C, _layer, _micro, _normalised, _pooled

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

"""AccumBatchNorm's window: pooled across ranks (sync), its dtype and device, closed together or one by one."""

import copy
import itertools
import math

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


# --------------------------------------------------------------------------- running statistics of short runs


def _commit_windows(layer, windows):
    """Feed each window's micro-batches and close it; returns every window's (mean, unbiased var) in float64."""
    layer.acquire_control()
    layer.train()
    stats = []
    for xs in windows:
        for x in xs:
            layer(x)
        values = torch.cat([x.transpose(0, 1).reshape(C, -1) for x in xs], dim=1)
        stats.append((values.mean(1), values.var(1, unbiased=True)))
        layer.close_window()
    return stats


def _windows(count, seed=0):
    return [[_micro(100 * seed + 10 * w + k) for k in range(3)] for w in range(count)]


def test_a_fresh_layer_warm_starts_its_running_statistics_from_the_first_window():
    """Running statistics still at their initial values: window k commits with max(m, 1 / (1 + m (k - 1))), so
    after k windows they are a weighted mean of the windows with weights summing to one and growing towards
    the latest window; from about 1 / m^2 windows on, the steps are plain EMA steps."""
    m = 0.1
    layer = bd.AccumBatchNorm(C, momentum=m, dtype=torch.float64)
    assert layer.warm_start is None and layer.warm_decision is None  # decided at the first commit, on the device
    stats = _commit_windows(layer, _windows(1))
    assert bool(layer.warm_decision) and int(layer.num_batches_tracked) == 1
    torch.testing.assert_close(layer.running_mean, stats[0][0], rtol=1e-12, atol=1e-12)  # the initial values are gone
    torch.testing.assert_close(layer.running_var, stats[0][1], rtol=1e-12, atol=1e-12)

    def weights(k):  # window j's weight after k windows: its factor, then (1 - factor) of every later window
        factors = [max(m, 1 / (1 + m * (j - 1))) for j in range(1, k + 1)]
        return [f * math.prod(1 - g for g in factors[j + 1 :]) for j, f in enumerate(factors)]

    for more in (9, 90, 20):  # 10 windows, 100 (the handover at 91), 120
        stats += _commit_windows(layer, _windows(more, seed=len(stats)))
        w = weights(len(stats))
        assert abs(sum(w) - 1.0) < 1e-12 and all(a <= b for a, b in itertools.pairwise(w))  # a mean, favouring recent
        for index, running in ((0, layer.running_mean), (1, layer.running_var)):
            expected = sum(wj * s[index] for wj, s in zip(w, stats))
            torch.testing.assert_close(running, expected, rtol=1e-10, atol=1e-12)
    assert weights(10)[-1] > 0.5  # a 10-window run: mostly the last window's, whose weights are the closest
    assert max(m, 1 / (1 + m * 119)) == m  # past the handover: plain EMA steps


def test_a_fresh_layer_with_momentum_zero_keeps_its_statistics():
    """momentum 0 means the running statistics never move; the warm start must not override that (or divide by 0)."""
    layer = bd.AccumBatchNorm(C, momentum=0.0, dtype=torch.float64)
    _commit_windows(layer, _windows(2))
    assert torch.equal(layer.running_mean, torch.zeros(C, dtype=torch.float64))
    assert torch.equal(layer.running_var, torch.ones(C, dtype=torch.float64))
    assert int(layer.num_batches_tracked) == 2


def test_trained_or_loaded_statistics_and_warm_start_false_take_plain_ema_steps():
    """A checkpoint's statistics (even with num_batches_tracked 0, as many pretrained weights ship) are kept."""
    loaded = bd.AccumBatchNorm(C, momentum=0.1, dtype=torch.float64)
    with torch.no_grad():
        loaded.running_mean.uniform_(-1, 1)
        loaded.running_var.uniform_(0.5, 2)
    cold = bd.AccumBatchNorm(C, momentum=0.1, dtype=torch.float64, warm_start=False)
    for layer in (loaded, cold):
        before = (layer.running_mean.clone(), layer.running_var.clone())
        (mean, var), *_ = _commit_windows(layer, _windows(1))
        assert not (layer.warm_decision is not None and bool(layer.warm_decision))
        torch.testing.assert_close(layer.running_mean, 0.9 * before[0] + 0.1 * mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, 0.9 * before[1] + 0.1 * var, rtol=1e-12, atol=1e-12)
    with pytest.raises(bd.BNDoctorError, match="warm_start"):
        bd.AccumBatchNorm(C, warm_start="yes")


def test_reset_running_stats_decides_the_warm_start_again_and_conversion_passes_it_on():
    layer = bd.AccumBatchNorm(C, momentum=0.1, dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.fill_(3.0)
    _commit_windows(layer, _windows(1))
    assert not bool(layer.warm_decision)  # trained statistics
    layer.reset_running_stats()
    assert layer.warm_decision is None
    (mean, _), *_ = _commit_windows(layer, _windows(1, seed=2))
    assert bool(layer.warm_decision)
    torch.testing.assert_close(layer.running_mean, mean, rtol=1e-12, atol=1e-12)
    converted = bd.to_accum_bn(nn.Sequential(nn.BatchNorm2d(C)), warm_start=False)
    assert converted[0].warm_start is False and "warm_start=False" in repr(converted[0])


def test_a_ten_step_run_evaluates_within_two_points_of_its_recalibrated_statistics():
    """One EMA step per window leaves a 10-step run's statistics near their initial values (digits, shuffled
    micro-batches of 2 x 32: 46 % against 75 % recalibrated for this seed); the default warm start weighs the
    latest windows most and evaluates within 2 points of recalibration (benchmarks/short_runs.py: over seeds)."""
    import numpy as np
    import torch.nn.functional as F

    from bndoctor.bench.data import load_data
    from bndoctor.bench.samplers import schedule
    from bndoctor.models import tiny_resnet

    data = load_data("digits", "source")

    def accuracy(model):
        with torch.no_grad():
            return (model.eval()(data.x_val).argmax(1) == data.y_val).double().mean().item()

    def ten_steps(warm_start):
        torch.manual_seed(0)
        model = bd.to_accum_bn(tiny_resnet(10), warm_start=warm_start)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        bd.accumulate_bn(model, optimizer)
        for _, logical in zip(range(10), schedule(data.y_train, 2, 32, "iid", np.random.default_rng(0))):
            optimizer.zero_grad()
            for idx in logical:
                F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).div(len(logical)).backward()
            optimizer.step()
        return model

    cold, model = accuracy(ten_steps(False)), ten_steps(None)
    warm = accuracy(model)
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))[:400]
    bd.recalibrate(model, [data.x_train[order[i : i + 50]] for i in range(0, 400, 50)], progress=False)
    recalibrated = accuracy(model)
    assert abs(warm - recalibrated) <= 0.02, (cold, warm, recalibrated)
    assert recalibrated - cold > 0.2, (cold, warm, recalibrated)  # what the warm start repairs


def test_a_ten_step_exact_run_evaluates_within_two_points_of_recalibration():
    """The exact mode's window statistics are the logical batch's; with the default warm start a 10-step run
    evaluates as its recalibrated statistics do, where plain EMA steps per window lag the fast-moving weights
    (docs/accumulation.md)."""
    import numpy as np
    import torch.nn.functional as F

    from bndoctor.bench.data import load_data
    from bndoctor.bench.samplers import schedule
    from bndoctor.models import tiny_resnet

    data = load_data("digits", "source")

    def accuracy(model):
        with torch.no_grad():
            return (model.eval()(data.x_val).argmax(1) == data.y_val).double().mean().item()

    def gap(warm_start):
        torch.manual_seed(1)
        model = bd.to_accum_bn(tiny_resnet(10), mode="exact", passes=2, warm_start=warm_start)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        bd.accumulate_bn(model, optimizer)
        for _, logical in zip(range(10), schedule(data.y_train, 2, 32, "iid", np.random.default_rng(1))):
            model.train()
            optimizer.zero_grad()
            bd.collect_window(model, [data.x_train[idx] for idx in logical])
            for idx in logical:
                F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).div(len(logical)).backward()
            optimizer.step()
        trained = accuracy(model)
        order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(1))[:400]
        bd.recalibrate(model, [data.x_train[order[i : i + 50]] for i in range(0, 400, 50)], progress=False)
        return trained - accuracy(model)

    assert abs(gap(None)) <= 0.02
    assert gap(False) < -0.05  # plain EMA steps per window: 11 points below for this seed

"""bndoctor.SyncBatchNorm against single-process BatchNorm over the concatenated batch (gloo, real processes)."""

import copy

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from tests._dist import count_collectives, run_ranks
from tests._fakes import ScaledOutputBN, randomize_bn

C = 3


def _local_batch(rank, sizes, dims=4):
    gen = torch.Generator().manual_seed(10 + rank)
    shape = (sizes[rank], C, 4, 5) if dims == 4 else (sizes[rank], C)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + rank) + 2 * rank
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x, g


def _layer():
    torch.manual_seed(0)
    layer = bd.SyncBatchNorm(C).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64))
        layer.bias.copy_(torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64))
    return layer


def _sync_rank(rank, world_size, sizes, dims, steps):
    layer = _layer()
    outs = []
    for _ in range(steps):
        x, g = _local_batch(rank, sizes, dims)
        x.requires_grad_(True)
        y = layer(x)
        (y * g).sum().backward()
        outs.append((y.detach(), x.grad))
    return {
        "outs": outs,
        "weight_grad": layer.weight.grad,
        "bias_grad": layer.bias.grad,
        "running": (layer.running_mean.clone(), layer.running_var.clone(), int(layer.num_batches_tracked)),
    }


def _oracle(world_size, sizes, dims, steps):
    bn = nn.BatchNorm2d(C) if dims == 4 else nn.BatchNorm1d(C)
    bn = bn.double()
    reference = _layer()
    bn.load_state_dict(reference.state_dict())
    outs = []
    for _ in range(steps):
        parts = [_local_batch(r, sizes, dims) for r in range(world_size)]
        x = torch.cat([p[0] for p in parts]).requires_grad_(True)
        g = torch.cat([p[1] for p in parts])
        y = bn(x)
        (y * g).sum().backward()
        outs.append((y.detach(), x.grad))
    return bn, outs


@pytest.mark.parametrize(
    ("world_size", "sizes", "dims"),
    [(2, [3, 5], 4), (4, [2, 0, 5, 1], 4), (2, [4, 3], 2)],
    ids=["2-ranks-uneven", "4-ranks-one-empty", "2-ranks-2d-input"],
)
def test_equals_bn_over_the_concatenated_batch(world_size, sizes, dims):
    steps = 2
    results = run_ranks(_sync_rank, world_size, sizes, dims, steps)
    for r in results:
        assert not isinstance(r, BaseException), r
    bn, outs = _oracle(world_size, sizes, dims, steps)
    offsets = [sum(sizes[:r]) for r in range(world_size)]
    for step in range(steps):
        y, x_grad = outs[step]
        for rank, result in enumerate(results):
            local_y, local_x_grad = result["outs"][step]
            sl = slice(offsets[rank], offsets[rank] + sizes[rank])
            torch.testing.assert_close(local_y, y[sl], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(local_x_grad, x_grad[sl], atol=1e-5, rtol=1e-5)
    weight_grad = sum(r["weight_grad"] for r in results)  # DDP sums (averages) the local contributions
    bias_grad = sum(r["bias_grad"] for r in results)
    torch.testing.assert_close(weight_grad, bn.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bias_grad, bn.bias.grad, atol=1e-5, rtol=1e-5)
    for result in results:
        mean, var, tracked = result["running"]
        torch.testing.assert_close(mean, bn.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(var, bn.running_var, atol=1e-5, rtol=1e-5)
        assert tracked == steps


def _count_collectives(rank, world_size):
    layer = _layer()
    x, g = _local_batch(rank, [2, 3])
    x.requires_grad_(True)
    calls = []
    with count_collectives() as counter:
        for _ in range(2):
            before = counter.calls
            (layer(x) * g).sum().backward()
            calls.append(counter.calls - before)
        train_calls = counter.calls
        layer.eval()
        layer(x)
        return calls, counter.calls - train_calls


def test_two_collectives_per_training_step_none_in_eval():
    """The first step also checks once that every rank has the same layer; then two collectives per step."""
    for train_calls, eval_calls in run_ranks(_count_collectives, 2):
        assert (train_calls, eval_calls) == ([3, 2], 0)


def _mismatched_rank(rank, world_size, layer_kind):
    channels = C + (rank == world_size - 1)  # the last rank built another model
    if layer_kind == "sync":
        layer = bd.SyncBatchNorm(channels).double()
    else:
        layer = bd.AccumBatchNorm(channels, sync=True).double()
        layer.acquire_control()
    x = torch.randn(4, channels, 3, 3, dtype=torch.float64)
    try:
        layer(x)
    except bd.BNDoctorError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("layer_kind", ["sync", "accum-sync"])
def test_ranks_whose_layers_differ_all_raise_the_same_error_instead_of_aborting(world_size, layer_kind):
    messages = run_ranks(_mismatched_rank, world_size, layer_kind, timeout=30)
    assert len(set(messages)) == 1, messages  # every rank: the same error
    assert f"rank(s) [{world_size - 1}] differ from rank 0" in messages[0]
    assert f"rank {world_size - 1}: {C + 1} channels" in messages[0]


def _only_rank_zero_evaluates(rank, world_size):
    import torch.distributed as dist

    layer = bd.SyncBatchNorm(C, track_running_stats=False).double().eval()
    x = _local_batch(rank, [4, 4])[0]
    if rank == 0:  # e.g. validation on the main process only: must not wait for the other rank
        out = layer(x)
        reference = torch.nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
        torch.testing.assert_close(out, reference)  # the local batch's statistics, as torch's SyncBatchNorm
    dist.barrier()
    return True


def test_eval_without_running_statistics_calls_no_collective():
    assert run_ranks(_only_rank_zero_evaluates, 2, timeout=30) == [True, True]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)
        self.head = nn.Linear(C, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def _micro_batches(rank, step):
    gen = torch.Generator().manual_seed(1000 * rank + step)
    n = 2 + rank  # uneven
    return torch.randn(n, 2, 5, 5, generator=gen) + rank, torch.randint(0, 4, (n,), generator=gen)


def _ddp_rank(rank, world_size, accum):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(bd.to_sync_bn(Net()))
    for step in range(accum):
        x, y = _micro_batches(rank, step)
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum") * world_size  # DDP averages
        if step < accum - 1:
            with model.no_sync():
                loss.backward()
        else:
            loss.backward()
    module = model.module
    return {n: p.grad.clone() for n, p in module.named_parameters()}, module.bn.running_var.clone()


def test_ddp_gradient_accumulation_under_no_sync_matches_the_global_batch():
    world_size, accum = 2, 3
    results = run_ranks(_ddp_rank, world_size, accum)
    for r in results:
        assert not isinstance(r, BaseException), r
    torch.manual_seed(0)
    reference = Net()
    for step in range(accum):
        parts = [_micro_batches(r, step) for r in range(world_size)]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        nn.functional.cross_entropy(reference(x), y, reduction="sum").backward()
    for grads, running_var in results:
        for name, param in reference.named_parameters():
            torch.testing.assert_close(grads[name], param.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(running_var, reference.bn.running_var, atol=1e-5, rtol=1e-5)


def _subgroup_rank(rank, world_size):
    model = bd.to_sync_bn(nn.Sequential(nn.BatchNorm1d(C)), group_size=2)
    x = torch.randn(4, C, generator=torch.Generator().manual_seed(rank)) + rank * 3
    model(x)
    return model[0].running_mean.clone()


def test_group_size_syncs_within_blocks_of_ranks():
    means = run_ranks(_subgroup_rank, 4)
    for m in means:
        assert not isinstance(m, BaseException), m
    assert torch.equal(means[0], means[1]) and torch.equal(means[2], means[3])
    assert not torch.allclose(means[0], means[2])


def _offset_rank(rank, world_size):
    # float32 input far from zero with a small spread: pooling E[x^2] - mean^2 in float32 would lose the
    # variance entirely (1e6 * 6e-8 against 1e-4); pooling per-rank means and M2 keeps it
    x = 1000.0 + 0.01 * torch.randn(6, C, 3, 3, generator=torch.Generator().manual_seed(rank))
    layer = bd.SyncBatchNorm(C)
    return x, layer(x).detach(), layer.running_var.clone()


def test_float32_statistics_keep_a_small_spread_far_from_zero():
    results = run_ranks(_offset_rank, 2)
    for r in results:
        assert not isinstance(r, BaseException), r
    x = torch.cat([r[0] for r in results])
    bn = nn.BatchNorm2d(C).double()
    bn(x.double())
    torch.testing.assert_close(results[0][2].double(), bn.running_var, rtol=1e-3, atol=0)
    # the output as torch's float32 BN gives it (x - mean in float32 rounds at 6e-5 / 0.01 here)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), nn.BatchNorm2d(C)(x), atol=2e-2, rtol=0)


def _half_rank(rank, world_size, autocast):
    torch.manual_seed(0)
    layer = bd.SyncBatchNorm(C)
    if not autocast:
        layer = layer.to(torch.bfloat16)  # a wholly half-precision layer: parameters and buffers bf16
    x = torch.randn(4, C, 5, 5, generator=torch.Generator().manual_seed(rank)) * 2 + 1
    xb = x.to(torch.bfloat16).requires_grad_(True)
    y = layer(xb)
    (y.float() * x).sum().backward()
    return xb.detach(), y.detach(), xb.grad, layer.weight.grad, layer.running_mean, layer.weight.grad.dtype


@pytest.mark.parametrize("autocast", [True, False], ids=["float32-layer", "bfloat16-layer"])
def test_bfloat16_input(autocast):
    results = run_ranks(_half_rank, 2, autocast)
    for r in results:
        assert not isinstance(r, BaseException), r
    x = torch.cat([r[0] for r in results]).double().requires_grad_(True)
    bn = nn.BatchNorm2d(C).double()
    y = bn(x)
    (y * x.detach()).sum().backward()
    torch.testing.assert_close(torch.cat([r[1] for r in results]).double(), y.detach(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(torch.cat([r[2] for r in results]).double(), x.grad, atol=0.1, rtol=0.05)
    torch.testing.assert_close(sum(r[3].double() for r in results), bn.weight.grad, atol=0.5, rtol=0.02)
    torch.testing.assert_close(results[0][4].double(), bn.running_mean, atol=0.01, rtol=0.02)
    assert results[0][5] == (torch.float32 if autocast else torch.bfloat16)


# --------------------------------------------------------------------------- single process


def test_without_distributed_it_is_plain_batchnorm():
    x = torch.randn(6, C, 4, 4)
    ours, theirs = bd.SyncBatchNorm(C), nn.BatchNorm2d(C)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    with pytest.raises(bd.BNDoctorError, match=r"expected at least 2D input \(got 1D input\)"):
        ours(torch.randn(3))


def test_convert_revert_round_trip_is_lossless():
    model = randomize_bn(
        nn.Sequential(
            nn.Conv1d(2, 3, 1),
            nn.BatchNorm1d(3, momentum=None),
            nn.Conv2d(3, 4, 1),
            nn.BatchNorm2d(4),
            nn.Conv3d(4, 5, 1),
            nn.BatchNorm3d(5, eps=1e-3, affine=False),
        )
    )
    model[3].weight.requires_grad_(False)
    model[1].num_batches_tracked.fill_(9)
    model[3].eval()
    synced = bd.to_sync_bn(model)
    assert all(isinstance(synced[i], bd.SyncBatchNorm) for i in (1, 3, 5))
    assert isinstance(model[1], nn.BatchNorm1d)  # caller's model untouched
    back = bd.from_sync_bn(synced)
    assert [type(m) for m in back] == [type(m) for m in model]
    for a, b in zip(model, back):
        if isinstance(a, nn.modules.batchnorm._BatchNorm):
            assert (a.momentum, a.eps, a.affine, a.track_running_stats, a.training) == (
                b.momentum,
                b.eps,
                b.affine,
                b.track_running_stats,
                b.training,
            )
    sa, sb = model.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [p.requires_grad for p in back.parameters()] == [p.requires_grad for p in model.parameters()]


def test_modules_selection_frozen_and_custom_layers():
    model = nn.ModuleDict(
        {"backbone": nn.Sequential(nn.BatchNorm2d(2), ScaledOutputBN(2)), "head": nn.Sequential(nn.BatchNorm1d(2))}
    )
    with pytest.warns(bd.BNDoctorWarning, match=r"left 1 BN subclass.*backbone\.1"):
        synced = bd.to_sync_bn(model, modules="backbone")
    assert isinstance(synced["backbone"][0], bd.SyncBatchNorm)
    assert type(synced["backbone"][1]) is ScaledOutputBN and type(synced["head"][0]) is nn.BatchNorm1d
    frozen = bd.to_sync_bn(bd.freeze_bn(nn.Sequential(nn.BatchNorm2d(2))))
    assert isinstance(frozen[0], bd.layers.FrozenBatchNorm2d)


def test_torch_syncbatchnorm_converts_and_needs_dims_to_revert():
    torch_sync = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))
    ours = bd.to_sync_bn(torch_sync)
    assert isinstance(ours[0], bd.SyncBatchNorm)
    with pytest.raises(bd.BNDoctorError, match="no remembered BatchNorm class") as e:
        bd.from_sync_bn(ours)
    assert "dims=1, 2 or 3" in e.value.hint
    assert type(bd.from_sync_bn(ours, dims=2)[0]) is nn.BatchNorm2d
    assert type(bd.from_sync_bn(torch_sync, dims=2)[0]) is nn.BatchNorm2d


def test_deepcopy_and_pickle():
    layer = bd.SyncBatchNorm(3)
    assert copy.deepcopy(layer).process_group is None
    import io

    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert isinstance(torch.load(buffer, weights_only=False), bd.SyncBatchNorm)


def test_group_size_must_divide_world():
    with pytest.raises(bd.BNDoctorError, match="divide the world size 1"):
        bd.to_sync_bn(nn.Sequential(nn.BatchNorm2d(2)), group_size=0)
    with pytest.raises(bd.BNDoctorError, match="either process_group or group_size"):
        bd.to_sync_bn(nn.Sequential(nn.BatchNorm2d(2)), process_group=object(), group_size=1)


def _fallback_rank(rank, world_size, message):
    import torch.distributed as dist

    from bndoctor import distributed

    def unsupported(*args, **kwargs):
        raise RuntimeError(message)

    for name in ("all_gather_single", "all_gather_into_tensor"):
        if hasattr(dist, name):
            setattr(dist, name, unsupported)
    rows = distributed.gather_rows(torch.tensor([float(rank), 10.0 + rank]))
    return rows, bool(distributed._FLAT_GATHER_UNSUPPORTED)


@pytest.mark.parametrize(
    "message",
    [
        "no support for _allgather_base in Gloo process group",  # gloo's own words in older torch
        "ProcessGroupGloo::_allgather_base: unsupported device type cuda",
    ],
)
def test_gather_falls_back_to_a_list_gather_where_the_backend_cannot_gather_flat(message):
    for rows, fell_back in run_ranks(_fallback_rank, 2, message):
        assert fell_back and torch.equal(rows, torch.tensor([[0.0, 10.0], [1.0, 11.0]]))


def _other_error_rank(rank, world_size):
    import torch.distributed as dist

    from bndoctor import distributed

    def broken(*args, **kwargs):
        raise RuntimeError("Connection reset by peer")

    for name in ("all_gather_single", "all_gather_into_tensor"):
        if hasattr(dist, name):
            setattr(dist, name, broken)
    try:
        distributed.gather_rows(torch.tensor([float(rank)]))
    except RuntimeError as exc:
        return str(exc), bool(distributed._FLAT_GATHER_UNSUPPORTED)
    return None, bool(distributed._FLAT_GATHER_UNSUPPORTED)


def test_gather_raises_other_backend_errors_instead_of_falling_back():
    for message, fell_back in run_ranks(_other_error_rank, 2):
        assert message == "Connection reset by peer" and not fell_back

"""recalibrate under torch.distributed (gloo, real processes)."""

import pytest
import torch

import bndoctor as bd
from bndoctor.models import tiny_resnet
from tests._dist import run_ranks

SHARES = {0: [7, 16], 1: [3], 2: []}  # uneven, and rank 2 holds no batch


def _batches(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(n, 1, 8, 8, generator=gen) * 2 + rank for n in SHARES.get(rank, [])]


def _model():
    torch.manual_seed(0)
    return tiny_resnet()


def _stats(model):
    return {r.name: (r.module.running_mean.clone(), r.module.running_var.clone()) for r in bd.find_bn(model)}


def _recalibrate_rank(rank, world_size):
    model = _model()
    report = bd.recalibrate(model, _batches(rank), progress=False)
    return _stats(model), report.samples, report.global_samples


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_rank_ends_with_the_union_statistics(world_size):
    results = run_ranks(_recalibrate_rank, world_size)
    for result in results:
        assert not isinstance(result, BaseException), result
    union = [b for rank in range(world_size) for b in _batches(rank)]
    reference = _model()
    bd.recalibrate(reference, union, progress=False)
    expected = _stats(reference)
    total = sum(len(b) for b in union)
    for rank, (stats, samples, global_samples) in enumerate(results):
        assert samples == sum(SHARES[rank]) and global_samples == total
        for name, (mean, var) in expected.items():
            torch.testing.assert_close(stats[name][0], mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stats[name][1], var, rtol=1e-5, atol=1e-6)
    first = results[0][0]
    for stats, _, _ in results[1:]:
        assert all(torch.equal(stats[n][0], first[n][0]) and torch.equal(stats[n][1], first[n][1]) for n in first)


def _failing_rank(rank, world_size):
    model = _model()
    before = _stats(model)

    def forward(m, batch):
        if rank == 1:
            raise RuntimeError("rank 1 broke")
        return m(batch)

    try:
        bd.recalibrate(model, [torch.randn(4, 1, 8, 8)], forward=forward, progress=False)
    except Exception as exc:
        after = _stats(model)
        unchanged = all(
            torch.equal(before[n][0], after[n][0]) and torch.equal(before[n][1], after[n][1]) for n in before
        )
        return type(exc).__name__, str(exc), unchanged
    return "no error", "", False


def test_a_failing_rank_stops_every_rank_without_deadlock():
    results = run_ranks(_failing_rank, 2)
    assert results[0][0] == "BNDoctorError" and "failed on rank(s) [1]" in results[0][1]
    assert results[1][:2] == ("RuntimeError", "rank 1 broke")
    assert results[0][2] and results[1][2]


def _empty_everywhere(rank, world_size):
    try:
        bd.recalibrate(_model(), [], progress=False)
    except bd.BNDoctorError as exc:
        return str(exc)
    return "no error"


def test_no_data_on_any_rank_is_an_error_on_every_rank():
    assert all("on any rank" in r for r in run_ranks(_empty_everywhere, 2))


def _nan_on_rank_zero(rank, world_size):
    model = _model()
    before = _stats(model)
    batches = _batches(rank)
    if rank == 0:
        batches[1] = batches[1].clone()
        batches[1][0, 0, 0, 0] = float("nan")
    try:
        bd.recalibrate(model, batches, progress=False)
    except bd.BNDoctorError as exc:
        after = _stats(model)
        unchanged = all(torch.equal(a, b) for k in before for a, b in zip(before[k], after[k]))
        return str(exc), unchanged
    return "no error", False


def test_a_nan_batch_on_one_rank_is_refused_on_every_rank_with_nothing_written():
    (msg0, same0), (msg1, same1), (msg2, same2) = run_ranks(_nan_on_rank_zero, 3, timeout=30)
    assert same0 and same1 and same2
    assert "batch 1 gives NaN or Inf statistics at 'stem.1'" in msg0
    assert "failed on rank(s) [0]" in msg1 and "failed on rank(s) [0]" in msg2


def _recalibrate_synced(rank, world_size, fail_rank):
    model = bd.to_sync_bn(_model())
    batches = _batches(rank)  # uneven: 2, 1 and 0 batches

    def forward(m, batch):
        if rank == fail_rank:
            raise RuntimeError("bad batch on this rank")
        return m(batch)

    try:
        bd.recalibrate(model, batches, progress=False, forward=forward)
    except (RuntimeError, bd.BNDoctorError) as exc:
        return type(exc).__name__
    return _stats(model)


@pytest.mark.parametrize("fail_rank", [None, 0])
def test_recalibrating_a_synced_model_with_uneven_data_or_a_failing_rank_does_not_hang(fail_rank):
    # SyncBatchNorm normalises locally during the pass (statistics are pooled once, after it), so ranks with
    # different numbers of batches, or one that raises, never leave another waiting in a collective
    results = run_ranks(_recalibrate_synced, 3, fail_rank, timeout=30)
    if fail_rank is None:
        assert results[0].keys() == results[1].keys() == results[2].keys()
        for name in results[0]:
            for a, b in zip(results[0][name], results[2][name]):
                torch.testing.assert_close(a, b)  # every rank ends with the same, union statistics
    else:
        assert results == ["RuntimeError", "BNDoctorError", "BNDoctorError"]


def _different_models(rank, world_size):
    model = _model() if rank == 0 else torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    before = _stats(model)
    try:
        bd.recalibrate(model, [torch.randn(4, 1, 8, 8)], progress=False)
    except bd.BNDoctorError as exc:
        after = _stats(model)
        return str(exc), all(torch.equal(a, b) for k in before for a, b in zip(before[k], after[k]))
    return "no error", False


def test_ranks_with_different_models_all_raise_with_nothing_written():
    results = run_ranks(_different_models, 2, timeout=30)
    for message, unchanged in results:
        assert "same BN layers on every rank" in message and "rank(s) [1]" in message and unchanged

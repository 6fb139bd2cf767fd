import numpy as np
import pytest
import torch

from bndoctor.bench.data import load_digits
from bndoctor.bench.samplers import schedule

LABELS = load_digits().y_train


def _flat(batches):
    return torch.cat([idx for logical in batches for idx in logical])


def test_iid_is_a_permutation_in_full_micro_batches():
    batches = schedule(LABELS, 64, 1, "iid", np.random.default_rng(0))
    flat = _flat(batches)
    assert len(flat) == 1438 // 64 * 64 and len(set(flat.tolist())) == len(flat)
    assert all(len(idx) == 64 for logical in batches for idx in logical)


def test_logical_batches_hold_accum_micro_batches():
    batches = schedule(LABELS, 2, 32, "iid", np.random.default_rng(0))
    assert all(len(logical) == 32 for logical in batches[:-1]) and 1 <= len(batches[-1]) <= 32
    assert len(_flat(batches)) == 1438


def test_correlated_micro_batches_hold_one_class_and_logical_batches_mix():
    batches = schedule(LABELS, 2, 32, "correlated", np.random.default_rng(0))
    for logical in batches:
        for idx in logical:
            assert len(idx) == 2 and len(set(LABELS[idx].tolist())) == 1
    classes_per_logical = [len(set(LABELS[torch.cat(logical)].tolist())) for logical in batches[:-1]]
    assert min(classes_per_logical) >= 6 and np.mean(classes_per_logical) >= 9
    flat = _flat(batches)
    assert len(set(flat.tolist())) == len(flat) >= 1438 - 10  # at most one leftover per class


def test_iid_micro_batches_do_mix_classes():
    batches = schedule(LABELS, 8, 1, "iid", np.random.default_rng(0))
    single = sum(len(set(LABELS[logical[0]].tolist())) == 1 for logical in batches)
    assert single <= 1


def test_same_rng_seed_same_schedule_and_bad_arguments():
    a = schedule(LABELS, 4, 2, "correlated", np.random.default_rng(3))
    b = schedule(LABELS, 4, 2, "correlated", np.random.default_rng(3))
    assert all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))
    with pytest.raises(ValueError, match="sampler"):
        schedule(LABELS, 4, 2, "grouped", np.random.default_rng(0))
    with pytest.raises(ValueError, match="micro_batch >= 1"):
        schedule(LABELS, 0, 2, "iid", np.random.default_rng(0))

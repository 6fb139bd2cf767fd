import numpy as np
import pytest
import torch

from bndoctor.bench.data import load_digits, stratified_split


def test_split_sizes_disjoint_and_stratified():
    data = load_digits()
    assert data.x_train.shape == (1438, 1, 8, 8) and data.x_val.shape == (359, 1, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    train_counts = torch.bincount(data.y_train, minlength=10).double()
    val_counts = torch.bincount(data.y_val, minlength=10).double()
    share = val_counts / (train_counts + val_counts)
    assert torch.all((share - 0.2).abs() < 0.01)


def test_split_indices_are_a_partition():
    labels = np.repeat(np.arange(3), [10, 11, 7])
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    assert [int((labels[val] == c).sum()) for c in range(3)] == [2, 2, 1]
    again = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])


def test_normalised_with_training_statistics():
    data = load_digits()
    assert abs(data.x_train.mean().item()) < 1e-5
    assert abs(data.x_train.std().item() - 1) < 1e-3


def test_shifted_domain_inverts_intensities_with_source_normalisation():
    source, shifted = load_digits("source"), load_digits("shifted")
    assert torch.equal(source.y_train, shifted.y_train)
    # x' = (16 - p - m)/s and x = (p - m)/s  =>  x + x' = (16 - 2m)/s, one constant for all pixels
    total = source.x_train + shifted.x_train
    assert torch.allclose(total, total.flatten()[0].expand_as(total), atol=1e-5)
    assert shifted.x_train.mean().item() > 1.0  # a large shift in the input mean
    with pytest.raises(ValueError, match="'source' or 'shifted'"):
        load_digits("other")

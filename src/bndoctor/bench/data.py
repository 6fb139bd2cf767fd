"""scikit-learn's digits as tensors: a fixed stratified split, normalisation, a shifted domain.

The 1,797 8x8 images ship inside scikit-learn (no download). The split is
stratified by class and fixed (seed 0): 1,438 training and 359 validation
images. Pixels (0..16) are scaled to zero mean and unit variance with the
training set's mean and standard deviation.

The shifted domain inverts the intensities (``16 - pixel``) and is then
normalised with the *source* statistics, so a network trained on the source
sees inputs with a very different mean: the setting in which frozen BN
statistics go stale and need recalibration on the target data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["Digits", "load_digits", "stratified_split"]

VAL_FRACTION = 0.2
SPLIT_SEED = 0
NUM_CLASSES = 10


@dataclass(frozen=True)
class Digits:
    """Train and validation tensors, ``x`` of shape ``(N, 1, 8, 8)`` (float32), ``y`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    domain: str = "source"

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a split that keeps each class's share (rounded per class)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = round(len(members) * val_fraction)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _require_sklearn():
    try:
        from sklearn import datasets
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the benchmark data set needs scikit-learn: pip install 'bndoctor[demo]'") from exc
    return datasets


@lru_cache(maxsize=2)
def load_digits(domain: str = "source") -> Digits:
    """The digits split; ``domain="shifted"`` gives the intensity-inverted copy."""
    if domain not in ("source", "shifted"):
        raise ValueError(f"expected domain 'source' or 'shifted' (got {domain!r})")
    raw = _require_sklearn().load_digits()
    images = raw.images.astype(np.float64)  # (1797, 8, 8), values 0..16
    labels = raw.target.astype(np.int64)
    train_idx, val_idx = stratified_split(labels, VAL_FRACTION, SPLIT_SEED)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    if domain == "shifted":
        images = 16.0 - images
    x = torch.from_numpy(((images - mean) / std).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(labels)
    return Digits(x[train_idx], y[train_idx], x[val_idx], y[val_idx], domain)

"""Micro-batch schedules: which samples go into each micro-batch of each logical batch.

A schedule is a list of logical (optimizer) batches, each a list of
micro-batches (index tensors into the training set). Incomplete micro-batches
are dropped (a BN layer should not see a batch of one); the last logical
batch of an epoch may hold fewer micro-batches.

* ``iid``: a random permutation cut into micro-batches.
* ``correlated``: every micro-batch holds samples of one class, and the
  micro-batches are shuffled, so each logical batch still mixes classes —
  what happens when data are grouped by video, patient, shard or source.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

__all__ = ["SamplerName", "schedule"]

SamplerName = Literal["iid", "correlated"]


def _chunks(indices: np.ndarray, size: int) -> list[np.ndarray]:
    full = len(indices) // size
    return [indices[i * size : (i + 1) * size] for i in range(full)]


def schedule(
    labels: torch.Tensor | np.ndarray,
    micro_batch: int,
    accum_steps: int,
    sampler: SamplerName,
    rng: np.random.Generator,
) -> list[list[torch.Tensor]]:
    """One epoch's logical batches of micro-batch index tensors."""
    if micro_batch < 1 or accum_steps < 1:
        raise ValueError(f"expected micro_batch >= 1 and accum_steps >= 1 (got {micro_batch}, {accum_steps})")
    labels = np.asarray(labels)
    if sampler == "iid":
        micro = _chunks(rng.permutation(len(labels)), micro_batch)
    elif sampler == "correlated":
        micro = []
        for label in np.unique(labels):
            micro.extend(_chunks(rng.permutation(np.flatnonzero(labels == label)), micro_batch))
        micro = [micro[i] for i in rng.permutation(len(micro))]
    else:
        raise ValueError(f"expected sampler 'iid' or 'correlated' (got {sampler!r})")
    tensors = [torch.from_numpy(np.ascontiguousarray(m)) for m in micro]
    return [tensors[i : i + accum_steps] for i in range(0, len(tensors), accum_steps)]

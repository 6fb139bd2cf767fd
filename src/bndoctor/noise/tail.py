"""Tail index of gradient noise (Mohammadi, Mohammadpour and Ogata 2015; used by Simsekli et al. 2019).

For X_1..X_K independent symmetric alpha-stable, split them into K2 blocks of
K1 (K = K1 K2) and let Y_i be the block sums. Since a sum of K1 such variables
is K1^(1/alpha) times one of them,

    1/alpha = (1 / log K1) * ( mean_i log|Y_i| - mean_k log|X_k| ).

alpha = 2 is Gaussian; alpha < 2 is heavy-tailed (Simsekli et al. 2019, "A
tail-index analysis of stochastic gradient noise in deep neural networks").
The estimate is clipped to (0, 2].
"""

from __future__ import annotations

import math

import torch

from ..errors import BNDoctorError

__all__ = ["tail_index"]


def tail_index(samples: torch.Tensor, *, block: int | None = None) -> float:
    """Estimate the tail index alpha of symmetric noise ``samples`` (Mohammadi et al. 2015).

    Args:
        samples: the noise, any shape (flattened). Zeros and non-finite values are dropped (they carry no
            scale information).
        block: K1, the block length (default: about sqrt(K)).

    Returns:
        alpha in (0, 2]: 2 for Gaussian noise, smaller for heavier tails.

    Raises:
        BNDoctorError: fewer than 16 usable values, or a block length outside 2..K/2.
    """
    if not isinstance(samples, torch.Tensor):
        raise BNDoctorError(
            f"expected a tensor of noise samples (got {type(samples).__name__})",
            hint="pass e.g. micro-batch gradient minus full-batch gradient, flattened",
        )
    x = samples.detach().flatten().double()
    x = x[torch.isfinite(x) & (x != 0)]
    k = x.numel()
    if k < 16:
        raise BNDoctorError(
            f"tail_index needs at least 16 non-zero finite samples (got {k})", hint="collect more noise samples"
        )
    k1 = block if block is not None else max(2, int(math.sqrt(k)))
    if k1 < 2 or k1 > k // 2:
        raise BNDoctorError(
            f"expected 2 <= block <= {k // 2} for {k} samples (got {block})", hint="leave block=None for sqrt(K)"
        )
    k2 = k // k1
    x = x[: k1 * k2]
    sums = x.view(k2, k1).sum(1)
    sums = sums[sums != 0]
    inverse = (sums.abs().log().mean() - x.abs().log().mean()) / math.log(k1)
    if inverse <= 0:
        return 2.0
    return float(min(2.0, 1.0 / float(inverse)))

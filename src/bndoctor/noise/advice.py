"""Advice on the logical batch from the measured noise scale and tail index, as findings.

McCandlish et al. (2018): training at batch B needs S = S_min (1 + B_noise / B)
steps and E = E_min (1 + B / B_noise) samples, with B_noise ~ B_simple. Far
below B_noise a larger batch is an almost free speed-up (steps fall in
proportion); far above it, extra samples per step buy little.
"""

from __future__ import annotations

import math

from ..findings import FINETUNE_RANGE, Alert, Finding

__all__ = ["ADVICE", "advise"]


LARGE_BATCH = 8192
#: the tail index below which the gradient noise counts as heavy-tailed (2 is Gaussian)
HEAVY_TAIL_BELOW = 1.8

BELOW_NOISE_SCALE = Alert(
    "BS101",
    "info",
    "logical batch far below the gradient noise scale (noise advice)",
    "McCandlish et al. (2018): steps S = S_min (1 + B_noise / B); far below B_noise a larger batch cuts steps "
    "almost for free.",
    "more accumulation steps or ranks, with the learning rate scaled to match.",
)
ABOVE_NOISE_SCALE = Alert(
    "BS102",
    "warning",
    "logical batch far above the gradient noise scale (noise advice)",
    "samples E = E_min (1 + B / B_noise); far above B_noise each sample helps little.",
    "a logical batch near B_simple reaches the same loss with fewer samples.",
)
FINETUNE_BATCH = Alert(
    "BS103",
    "info",
    "fine-tuning with a logical batch outside 32-128 (noise advice)",
    "the range usually chosen for fine-tuning pretrained encoders.",
    "adjust the accumulation steps to reach it, or retune the learning rate.",
)
VERY_LARGE_BATCH = Alert(
    "BS104",
    "info",
    "a very large logical batch (noise advice)",
    "first-order optimizers with one global learning rate degrade there.",
    "use a layer-wise or second-order optimizer from a maintained package (LAMB/LARS, e.g. in timm.optim; Lion; "
    "Shampoo/distributed Shampoo) with warm-up.",
)
HEAVY_TAIL = Alert(
    "BS105",
    "info",
    "heavy-tailed gradient noise (noise advice)",
    "a tail index alpha well below 2 (Simsekli et al. 2019) means rare large gradient jumps.",
    "gradient clipping (torch.nn.utils.clip_grad_norm_) or an adaptive optimizer tames the rare large steps.",
)

#: code -> alert, for ``bndoctor explain``
ADVICE: dict[str, Alert] = {
    a.code: a for a in (BELOW_NOISE_SCALE, ABOVE_NOISE_SCALE, FINETUNE_BATCH, VERY_LARGE_BATCH, HEAVY_TAIL)
}


def advise(logical_batch: int, b_simple: float, *, alpha: float | None = None, finetune: bool = False) -> list[Finding]:
    """Findings (codes BS1xx) for training at a logical batch, given the measured noise scale.

    Args:
        logical_batch: samples per optimizer step (micro-batch x accumulation steps x ranks).
        b_simple: the gradient noise scale (:class:`bndoctor.GradientNoiseScale`); ``inf`` when the noise
            swamps the gradient, NaN when unknown.
        alpha: the tail index of the gradient noise, when measured.
        finetune: also check the fine-tuning range (BS103).

    Returns:
        The findings, in code order; empty when the batch suits the noise.
    """
    found = [
        _against_noise_scale(logical_batch, b_simple),
        _outside_finetune_range(logical_batch) if finetune else None,
        _very_large(logical_batch),
        _heavy_tailed(alpha),
    ]
    return [f for f in found if f is not None]


def _against_noise_scale(logical_batch: int, b_simple: float) -> Finding | None:
    """BS101 far below the noise scale (or when the noise swamps the gradient), BS102 far above it."""
    evidence: dict[str, float] = {"logical_batch": logical_batch, "b_simple": b_simple}
    if math.isinf(b_simple) and b_simple > 0:
        return BELOW_NOISE_SCALE.finding(
            None,
            f"the gradient noise swamps the gradient (B_simple too large to measure): the logical batch "
            f"{logical_batch} is far below the noise scale",
            evidence,
            "a larger logical batch (more accumulation steps or ranks) would cut the steps almost in proportion",
        )
    if not (math.isfinite(b_simple) and b_simple > 0):
        return None
    ratio = logical_batch / b_simple
    steps = 1 + b_simple / logical_batch
    samples = 1 + logical_batch / b_simple
    evidence.update(steps_over_min=steps, samples_over_min=samples)
    if ratio < 0.25:
        return BELOW_NOISE_SCALE.finding(
            None,
            f"the logical batch {logical_batch} is far below the noise scale (B_simple ~ {b_simple:.0f}): "
            f"training takes about {steps:.1f}x the minimum number of steps, and a larger batch would cut "
            "steps almost in proportion at little cost in samples",
            evidence,
            f"raise the logical batch towards {b_simple:.0f} (more accumulation steps or ranks) with the "
            "learning rate scaled to match",
        )
    if ratio > 4:
        return ABOVE_NOISE_SCALE.finding(
            None,
            f"the logical batch {logical_batch} is far above the noise scale (B_simple ~ {b_simple:.0f}): "
            f"each sample helps little (about {samples:.1f}x the minimum samples for the same progress)",
            evidence,
            f"a logical batch near {b_simple:.0f} reaches the same loss with fewer samples; "
            "keep the large batch only if wall-clock per step is what matters",
        )
    return None


def _outside_finetune_range(logical_batch: int) -> Finding | None:
    low, high = FINETUNE_RANGE
    if low <= logical_batch <= high:
        return None
    return FINETUNE_BATCH.finding(
        None,
        f"fine-tuning usually works best with a logical batch of {low}-{high} (this run: {logical_batch})",
        {"logical_batch": logical_batch, "range": list(FINETUNE_RANGE)},
        "adjust the accumulation steps",
    )


def _very_large(logical_batch: int) -> Finding | None:
    if logical_batch < LARGE_BATCH:
        return None
    return VERY_LARGE_BATCH.finding(
        None,
        f"a logical batch of {logical_batch} is in the regime where first-order optimizers with one global "
        "learning rate stall",
        {"logical_batch": logical_batch},
    )


def _heavy_tailed(alpha: float | None) -> Finding | None:
    if alpha is None or not alpha < HEAVY_TAIL_BELOW:
        return None
    return HEAVY_TAIL.finding(
        None,
        f"the gradient noise is heavy-tailed (tail index alpha ~ {alpha:.2f}; 2 is Gaussian): rare large "
        "gradients dominate the noise",
        {"alpha": alpha},
    )

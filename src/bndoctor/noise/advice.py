"""Advice on the logical batch from the measured noise scale and tail index, as findings.

McCandlish et al. (2018): training at batch B needs S = S_min (1 + B_noise / B)
steps and E = E_min (1 + B / B_noise) samples, with B_noise ~ B_simple. Far
below B_noise a larger batch is an almost free speed-up (steps fall in
proportion); far above it, extra samples per step buy little.
"""

from __future__ import annotations

import math

from ..findings import FINETUNE_RANGE, Finding

__all__ = ["advise"]


LARGE_BATCH = 8192


def advise(logical_batch: int, b_simple: float, *, alpha: float | None = None, finetune: bool = False) -> list[Finding]:
    """Findings (codes BS1xx) for training at ``logical_batch`` given the measured noise scale.

    ``b_simple`` is the gradient noise scale (:class:`bndoctor.GradientNoiseScale`),
    ``alpha`` the tail index of the gradient noise when measured, and
    ``finetune=True`` adds the fine-tuning range check (BS103).
    """
    out: list[Finding] = []
    evidence = {"logical_batch": logical_batch, "b_simple": b_simple}
    if math.isinf(b_simple) and b_simple > 0:
        out.append(
            Finding(
                "BS101",
                "info",
                None,
                f"the gradient noise swamps the gradient (B_simple too large to measure): the logical batch "
                f"{logical_batch} is far below the noise scale",
                evidence,
                "a larger logical batch (more accumulation steps or ranks) would cut the steps almost in proportion",
            )
        )
    elif math.isfinite(b_simple) and b_simple > 0:
        ratio = logical_batch / b_simple
        steps = 1 + b_simple / logical_batch
        samples = 1 + logical_batch / b_simple
        evidence.update(steps_over_min=steps, samples_over_min=samples)
        if ratio < 0.25:
            out.append(
                Finding(
                    "BS101",
                    "info",
                    None,
                    f"the logical batch {logical_batch} is far below the noise scale (B_simple ~ {b_simple:.0f}): "
                    f"training takes about {steps:.1f}x the minimum number of steps, and a larger batch would cut "
                    "steps almost in proportion at little cost in samples",
                    evidence,
                    f"raise the logical batch towards {b_simple:.0f} (more accumulation steps or ranks) with the "
                    "learning rate scaled to match",
                )
            )
        elif ratio > 4:
            out.append(
                Finding(
                    "BS102",
                    "warning",
                    None,
                    f"the logical batch {logical_batch} is far above the noise scale (B_simple ~ {b_simple:.0f}): "
                    f"each sample helps little (about {samples:.1f}x the minimum samples for the same progress)",
                    evidence,
                    f"a logical batch near {b_simple:.0f} reaches the same loss with fewer samples; "
                    "keep the large batch only if wall-clock per step is what matters",
                )
            )
    if finetune and not FINETUNE_RANGE[0] <= logical_batch <= FINETUNE_RANGE[1]:
        out.append(
            Finding(
                "BS103",
                "info",
                None,
                f"fine-tuning usually works best with a logical batch of {FINETUNE_RANGE[0]}-{FINETUNE_RANGE[1]} "
                f"(this run: {logical_batch})",
                {"logical_batch": logical_batch, "range": list(FINETUNE_RANGE)},
                "adjust the accumulation steps",
            )
        )
    if logical_batch >= LARGE_BATCH:
        out.append(
            Finding(
                "BS104",
                "info",
                None,
                f"a logical batch of {logical_batch} is in the regime where first-order optimizers with one global "
                "learning rate stall",
                {"logical_batch": logical_batch},
                "use a layer-wise or second-order optimizer from a maintained package (LAMB/LARS, e.g. in timm.optim; "
                "Lion; Shampoo/distributed Shampoo) with warm-up",
            )
        )
    if alpha is not None and alpha < 1.8:
        out.append(
            Finding(
                "BS105",
                "info",
                None,
                f"the gradient noise is heavy-tailed (tail index alpha ~ {alpha:.2f}; 2 is Gaussian): rare large "
                "gradients dominate the noise",
                {"alpha": alpha},
                "gradient clipping (torch.nn.utils.clip_grad_norm_) or an adaptive optimizer tames the rare large "
                "steps",
            )
        )
    return out

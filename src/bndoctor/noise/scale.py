"""Gradient noise scale (McCandlish, Kaplan, Amodei et al. 2018, "An empirical model of large-batch training").

With |G_B|^2 the squared norm of a gradient estimated from B samples,
E|G_B|^2 = |G|^2 + tr(Sigma) / B. Two batch sizes give unbiased estimates of
both terms (their Appendix A.1):

    |G|^2     = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

and the simple noise scale B_simple = tr(Sigma) / |G|^2. Each is noisy per
step, so numerator and denominator are smoothed separately (EMA) before the
ratio. Gradient accumulation already computes both sizes: every micro-batch
gradient is a small-batch estimate and the accumulated gradient at the
optimizer step a large-batch one (under DDP: micro-batch x accumulation x
world size, after the all-reduce). ``GradientNoiseScale`` reads them with
tensor hooks, at no extra forward or backward.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .. import distributed
from .._validate import positive_int
from ..errors import BNDoctorError
from ..training import torch_optimizer
from .tail import tail_index

__all__ = ["GradientNoiseScale", "NoiseSample"]


@dataclass(frozen=True)
class NoiseSample:
    """One optimizer step's estimates.

    ``step``; ``g2_small`` / ``g2_big``: the squared gradient norms at the
    micro-batch and at the logical batch; ``grad_sq`` (|G|^2) and ``trace``
    (tr Sigma): this step's unbiased estimates; ``b_simple``: the ratio of
    their smoothed values; ``alpha``: the tail index (``None`` when off).
    """

    step: int
    g2_small: float
    g2_big: float
    grad_sq: float  # |G|^2, this step
    trace: float  # tr(Sigma), this step
    b_simple: float  # smoothed
    alpha: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class GradientNoiseScale:
    """Track B_simple (and the noise tail index) from the gradients an accumulation loop computes anyway.

        gns = bndoctor.GradientNoiseScale(model, micro_batch=4, accum_steps=8)
        gns.attach(optimizer)                      # reads the gradients at every optimizer.step()
        ... train as usual: loss / accum_steps, backward per micro-batch, one step per window ...
        print(gns.b_simple, gns.alpha)

    The loop must scale each micro-batch loss by ``1 / accum_steps`` (the usual
    pattern; ``loss_scale`` says otherwise) and call ``optimizer.step()`` once
    per window. Under DDP each rank's micro-batch gradients are local and the
    gradient at the step is the all-reduced one, so the large batch is
    ``micro_batch * accum_steps * world_size``. ``beta`` is the EMA factor;
    ``tail_coordinates`` random gradient coordinates per micro-batch (0: no
    tail index) feed :func:`bndoctor.tail_index` each step; ``seed`` picks them.
    """

    def __init__(
        self,
        model: nn.Module | Iterable[torch.nn.Parameter],
        *,
        micro_batch: int,
        accum_steps: int,
        world_size: int | None = None,
        beta: float = 0.95,
        loss_scale: float | None = None,
        tail_coordinates: int = 4096,
        seed: int = 0,
    ) -> None:
        params = list(model.parameters()) if isinstance(model, nn.Module) else list(model)
        self.params = [p for p in params if isinstance(p, torch.Tensor) and p.requires_grad]
        if not self.params:
            raise BNDoctorError(
                "GradientNoiseScale found no parameter that requires a gradient",
                hint="pass the model (or its trainable parameters) that the optimizer updates",
            )
        self.micro_batch = positive_int(micro_batch, "micro_batch")
        self.accum_steps = positive_int(accum_steps, "accum_steps")
        self.world_size = positive_int(world_size, "world_size") if world_size is not None else distributed.world_size()
        if self.accum_steps * self.world_size < 2:
            raise BNDoctorError(
                "the gradient noise scale needs two batch sizes, but one micro-batch makes each step "
                f"(accum_steps={self.accum_steps}, world_size={self.world_size})",
                hint="accumulate over >= 2 micro-batches or run on >= 2 ranks",
            )
        if not 0.0 <= beta < 1.0:
            raise BNDoctorError(f"expected 0 <= beta < 1 (got {beta})", hint="e.g. beta=0.95")
        self.beta = beta
        self.loss_scale = float(loss_scale) if loss_scale is not None else 1.0 / self.accum_steps
        self.b_small = self.micro_batch
        self.b_big = self.micro_batch * self.accum_steps * self.world_size
        self.samples: list[NoiseSample] = []
        self.steps = 0
        self._ema_g2 = self._ema_trace = 0.0
        self._ema_weight = 0.0
        self.skipped_steps = 0  # optimizer steps whose gradients were not finite (left out of the averages)
        self._micro_sq: list[torch.Tensor] = []  # kept on the device: no host sync per micro-batch
        self._pending: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._step_hook: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        generator = torch.Generator().manual_seed(seed)
        total = sum(p.numel() for p in self.params)
        take = min(tail_coordinates, total)
        chosen = torch.randperm(total, generator=generator)[:take].sort().values if take else torch.empty(0)
        self._coords: dict[int, torch.Tensor] = {}
        offset = 0
        for i, p in enumerate(self.params):
            mask = (chosen >= offset) & (chosen < offset + p.numel())
            if mask.any():
                self._coords[i] = (chosen[mask] - offset).to(p.device)
            offset += p.numel()
        self._tail_micro: list[torch.Tensor] = []
        self._tail_parts: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ wiring

    def attach(self, optimizer: torch.optim.Optimizer) -> GradientNoiseScale:
        """Hook the parameters (one squared norm per micro-batch) and ``optimizer.step()`` (the large batch).

        Wrapped optimizers (Accelerate's, Lightning's) are unwrapped to the torch optimizer inside.
        """
        optimizer = torch_optimizer(optimizer)
        if self._handles:
            raise BNDoctorError("this GradientNoiseScale is attached already", hint="call detach() first")
        self.optimizer = optimizer  # the torch optimizer the hooks sit on (wrappers removed)
        for i, p in enumerate(self.params):
            self._handles.append(p.register_hook(self._grad_hook(i)))
        # after the step: frameworks that run the last backward inside optimizer.step(closure) have finished it,
        # and torch's optimizers leave .grad as it was
        self._step_hook = optimizer.register_step_post_hook(self._after_step)
        return self

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.observe_step()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None

    def _grad_hook(self, index: int) -> Any:
        count = len(self.params)

        def hook(grad: torch.Tensor) -> None:
            if index in self._pending:  # a new backward began before every parameter reported the last one
                self._close_micro()
            g = grad.detach()
            self._pending[index] = g.float().pow(2).sum()
            coords = self._coords.get(index)
            if coords is not None:
                self._tail_parts[index] = g.flatten()[coords].float()
            if len(self._pending) == count:
                self._close_micro()

        return hook

    def _close_micro(self) -> None:
        self._micro_sq.append(torch.stack(list(self._pending.values())).sum() / self.loss_scale**2)
        if self._tail_parts:
            parts = [self._tail_parts[i] for i in sorted(self._tail_parts)]
            self._tail_micro.append(torch.cat(parts) / self.loss_scale)
        self._pending = {}
        self._tail_parts = {}

    # ------------------------------------------------------------------ estimates

    @torch.no_grad()
    def observe_step(self) -> NoiseSample | None:
        """Read the accumulated gradient (call before ``zero_grad()``; ``attach`` does it after each step)."""
        if self._pending:  # parameters that got no gradient in the last backward
            self._close_micro()
        micro, tail = self._micro_sq, self._tail_micro
        self._micro_sq, self._tail_micro = [], []
        grads = [p.grad for p in self.params if p.grad is not None]
        if not micro or not grads:
            return None
        g2_big = float(sum(g.detach().float().pow(2).sum() for g in grads))
        g2_small = float(torch.stack(micro).mean())
        if self.world_size > 1 and distributed.active():
            total = distributed.all_reduce_sum(torch.tensor([g2_small], dtype=torch.float64))
            g2_small = float(total[0]) / self.world_size
        b_small, b_big = self.b_small, self.b_big
        grad_sq = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
        trace = (g2_small - g2_big) / (1.0 / b_small - 1.0 / b_big)
        self.steps += 1
        if math.isfinite(grad_sq) and math.isfinite(trace):
            self._ema_g2 = self.beta * self._ema_g2 + (1 - self.beta) * grad_sq
            self._ema_trace = self.beta * self._ema_trace + (1 - self.beta) * trace
            self._ema_weight = self.beta * self._ema_weight + (1 - self.beta)
        else:  # a NaN/Inf gradient (an overflow, a bad batch) is reported in its sample, not kept in the averages
            self.skipped_steps += 1
        alpha = None
        if tail:
            big = torch.cat(
                [
                    p.grad.detach().flatten()[self._coords[i]].float()
                    for i, p in enumerate(self.params)
                    if i in self._coords and p.grad is not None
                ]
            )
            noise = torch.cat([t - big for t in tail if t.numel() == big.numel()])
            if noise.numel() >= 16:
                alpha = tail_index(noise)
        sample = NoiseSample(self.steps, g2_small, g2_big, grad_sq, trace, self.b_simple, alpha)
        self.samples.append(sample)
        return sample

    @property
    def b_simple(self) -> float:
        """tr(Sigma) / |G|^2 from the smoothed terms.

        nan before the first step; inf while the smoothed |G|^2 estimate is not
        positive although the noise is (late in training the true gradient can
        be too small next to the noise for the estimator to resolve it).
        """
        if self._ema_weight == 0:
            return math.nan
        if self._ema_g2 <= 0:
            return math.inf if self._ema_trace > 0 else math.nan
        return self._ema_trace / self._ema_g2

    @property
    def alpha(self) -> float | None:
        """Median tail index over the recorded steps (None without tail coordinates)."""
        values = sorted(s.alpha for s in self.samples if s.alpha is not None)
        return values[len(values) // 2] if values else None

    def __enter__(self) -> GradientNoiseScale:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

"""Accumulation-aware BatchNorm: normalise each micro-batch with the statistics of the window so far.

Between two optimizer steps the weights do not change, so the statistics of
earlier micro-batches of the accumulation window are statistics of the same
network. ``AccumBatchNorm`` normalises micro-batch k with the statistics
pooled over micro-batches 1..k of the window (earlier ones detached; the
gradient flows through the current micro-batch's share) and updates its
running statistics once per optimizer step, with the pooled statistics of the
whole logical batch.

Math, per channel: the window holds count N_w, mean m_w and sum of squared
deviations M2_w; micro-batch k has n values with mean m and biased variance v.
Pooling (Chan et al. 1979): N = N_w + n, mean = m_w + (m - m_w) n / N,
M2 = M2_w + n v + (m - m_w)^2 N_w n / N, var = M2 / N. With x_hat = (x - mean)
/ sqrt(var + eps) and g = dL/dy * gamma, the input gradient is

    dL/dx_i = g_i / sqrt(var + eps) - (sum_k g + x_hat_i sum_k g x_hat) / (N sqrt(var + eps))

(sums over the current micro-batch only): torch's BN backward with the
reductions divided by N instead of n, computed as
``(n/N) * bn_backward + (1 - n/N) * g / sqrt(var + eps)`` with torch's own
kernels. This is the ``"progressive"`` mode's gradient; the default
``"renorm"`` mode uses Batch Renormalization's instead (below).

Variants (``mode``); all normalise with the pooled window statistics in the
forward pass and differ in the gradient or the statistics:

* ``"renorm"`` (default): Batch Renormalization's gradient (Ioffe 2017) with
  the window so far as the reference: plain BN's gradient over the
  micro-batch, times r = sigma_B / sigma (r and d = (mu_B - mu) / sigma held
  constant). Keeps BN's invariances within each micro-batch; measured best in
  the harness (docs/accumulation.md).
* ``"progressive"``: the exact gradient of the pooled formulation above
  (reductions divided by the window count N instead of n).
* ``"blend"``: as ``progressive``, and while the window is still filling,
  also pool in the previous window's statistics with the weight of the
  samples still missing (one optimizer step stale).

A window is closed by :func:`bndoctor.accumulate_bn` (an optimizer step hook)
or by the :func:`bndoctor.accumulation_window` context manager. In training
mode without either, the layer behaves as plain BatchNorm and warns once.
In eval mode it is plain BatchNorm with its running statistics.

Running statistics take one EMA step per window, K times fewer than plain
BatchNorm takes in the same run, so a short run's EMA would still hold much of
its initial values (mean 0, variance 1), and an EMA over all windows so far
would average statistics of weights that have moved since. With
``warm_start`` (the default for a layer whose running statistics are still
those initial values when its first window commits) window k is committed
with the factor ``max(momentum, 1 / (1 + momentum (k - 1)))``,
polynomial-decay averaging (Shamir & Zhang 2013): the first window replaces
the initial values, the running statistics are a mean of the windows so far
weighing the latest most (roughly the last ``momentum * k`` windows), and
from about ``1 / momentum^2`` windows on the steps are plain EMA steps.
Running statistics that were trained or loaded
(a pretrained model being fine-tuned) take plain EMA steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .. import distributed
from ..distributed import HasProcessGroup
from ..errors import BNDoctorError, BNDoctorWarning, caller_stacklevel
from ..moments import pool_step, pool_two
from ._base import BNDoctorLayer, compiling, snapshot
from ._batch import batch_moments, batch_stats, require_batch
from ._commit import commit_windows
from ._exact import Call, ExactRenorm, injections, pass_sums
from ._renormalize import renormalize

__all__ = ["MODES", "AccumBatchNorm", "AccumMode", "close_windows_together", "require_mode"]


def require_mode(mode: Any) -> None:
    """Refuse a mode that is not one of :data:`MODES`."""
    if mode not in MODES:
        raise BNDoctorError(
            f"expected mode 'progressive', 'renorm', 'blend' or 'exact' (got {mode!r})", hint="the default is fine"
        )


def require_passes(passes: Any) -> None:
    """Refuse a number of correction passes that is not None or an int >= 0."""
    if passes is not None and (isinstance(passes, bool) or not isinstance(passes, int) or passes < 0):
        raise BNDoctorError(
            f"expected passes None (exact) or an int >= 0 (got {passes!r})",
            hint="None replays the window until the gradient is exact; 1 or 2 cost less",
        )


AccumMode = Literal["progressive", "renorm", "blend", "exact"]
MODES = ("progressive", "renorm", "blend", "exact")


class _PooledNorm(torch.autograd.Function):
    """y = BN(x) with given pooled statistics; earlier micro-batches are constants in the backward.

    The exact gradient of that formulation: torch's BN backward with the
    reductions over the micro-batch divided by the window count (``ratio`` =
    n / N), as derived in the module docstring.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, mean, var, ratio: float, eps: float):  # type: ignore[override]
        invstd = torch.rsqrt(var + eps)
        w = weight.detach() if weight is not None else torch.ones_like(mean)
        ctx.save_for_backward(x, w, mean, invstd)
        ctx.ratio = ratio
        ctx.eps = eps
        ctx.has_weight = weight is not None
        return torch.nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        x, w, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        shape = [1, -1] + [1] * (x.dim() - 2)
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad, x, w, None, None, mean, invstd, True, ctx.eps, [need_x, True, True]
        )
        if need_x:  # ratio * bn_backward + (1 - ratio) * g / sqrt(var + eps); ratio is a 0-d tensor (no host read)
            dx = torch.lerp(grad * (invstd * w).view(shape), dx, ctx.ratio.to(dx.dtype))
        return dx, (dw if need_w and ctx.has_weight else None), (db if need_b else None), None, None, None, None


class AccumBatchNorm(BNDoctorLayer, HasProcessGroup, _BatchNorm):
    """BatchNorm whose training statistics span the whole gradient-accumulation window.

    Same arguments as ``torch.nn.BatchNorm2d`` plus ``mode`` (``"renorm"``,
    ``"progressive"``, ``"blend"`` or ``"exact"``; see :mod:`bndoctor.layers.accum`
    and :func:`bndoctor.to_accum_bn`), ``passes`` (exact mode: the correction
    passes at each window's close, None until exact),
    ``sync`` (pool each window across the ranks of ``process_group`` too;
    default the world), ``process_group`` and ``warm_start`` (averaged
    windows from the first on, the latest weighed most: ``True``, ``False``, or ``None``, the
    default: when the running statistics still hold their initial values and
    ``num_batches_tracked`` is 0 at the first commit; see
    :mod:`bndoctor.layers.accum`); accepts inputs
    ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` and ``(N, C, D, H, W)``. Build
    it with :func:`bndoctor.to_accum_bn` and attach the window control with
    :func:`bndoctor.accumulate_bn`.

    Window control is counted: :meth:`acquire_control` / :meth:`release_control`
    are called by whatever closes the windows (the optimizer hook of
    ``accumulate_bn``, an ``accumulation_window`` block); without any, training
    falls back to plain BatchNorm with a warning.
    """

    pools_window = True
    small_batch_remedy = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        mode: AccumMode = "renorm",
        sync: bool = False,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        warm_start: bool | None = None,
        passes: int | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        require_mode(mode)
        require_passes(passes)
        if warm_start not in (None, True, False):
            raise BNDoctorError(
                f"expected warm_start True, False or None (got {warm_start!r})",
                hint="None (the default) warm-starts layers whose running statistics are still the initial values",
            )
        self.mode = mode
        self.passes = passes  # exact mode: the correction passes at the window's close (None: until exact)
        self.warm_start = warm_start
        self.warm_decision: torch.Tensor | None = None  # commit_windows decides it at the first commit
        self.sync = sync
        self._group = distributed.GroupRef(process_group)
        self._bndoctor_source_class: type | None = None
        self._controllers = 0  # attached accumulate_bn hooks / open accumulation_window blocks
        self._in_block = False  # inside an accumulation_window block
        self._warned = False
        # the open window: count (shape 1), mean and sum of squared deviations per channel, as tensors on the
        # layer's device (no host read in the training step; torch.compile sees tensors, not numbers), updated
        # in place or replaced in the list (_writes_window_in_place)
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        self._window = [torch.zeros(size, device=device, dtype=wide) for size in (1, num_features, num_features)]
        # whether a training forward has run since the last close or reset: a host-side flag in a list cell, which
        # the forward sets without reading it, so a compiled forward is one graph (not one per flag value) whose
        # guards need not check the module's attribute-write path
        self._opened = [False]
        self._collected: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # two passes
        self._previous: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # blend: the last window
        self._calls: list[Call] = []  # exact mode: this window's training calls, in order
        self._replay: _Replay | None = None  # exact mode: set while the window is replayed
        self._pass_sums: torch.Tensor | None = None  # exact mode, during a replay: the calls' sums it injects
        self._match_window()

    # ----------------------------------------------------------------- window

    def window_parts(self) -> list[torch.Tensor]:
        """The open window's tensors: count (shape 1), mean (C) and sum of squared deviations (C).

        The layer's own tensors (read, do not modify); :func:`~bndoctor.layers._commit.commit_windows` reads them.
        """
        return self._window

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self.__dict__["warm_decision"] = None  # fresh statistics: the next commit decides the warm start again

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        super()._apply(fn, recurse)
        self._match_window()
        return self

    def _match_window(self) -> None:
        """Put the window on the layer's device: float32, or float64 with float64 layers (as the forward wants it)."""
        reference = self.running_mean if self.running_mean is not None else self.weight
        if reference is not None:
            dtype = torch.float64 if reference.dtype == torch.float64 else torch.float32
            self._move_window(reference.device, dtype)

    def _move_window(self, device: torch.device, dtype: torch.dtype) -> None:
        if self._window[1].is_meta and device.type != "meta":
            # materialised from the meta device (``to_empty``): a meta window holds no statistics, so an empty one
            self._window = [torch.zeros(t.shape, device=device, dtype=dtype) for t in self._window]
            self.forget_window()
            self._previous = None
            self.__dict__["warm_decision"] = None
        else:
            self._window = [t.to(device=device, dtype=dtype) for t in self._window]
            # the collected window (two passes), the last window (blend) and the warm-start decision travel with it
            for name in ("_collected", "_previous"):
                held = self.__dict__.get(name)
                if held is not None:
                    self.__dict__[name] = tuple(t.to(device=device, dtype=dtype) for t in held)
            decision = self.__dict__.get("warm_decision")
            if decision is not None:
                self.__dict__["warm_decision"] = decision.to(device=device)

    def reset_window(self) -> None:
        """Forget the open window's statistics (and collected ones) without committing them."""
        torch._foreach_zero_(self._window)
        self.forget_window()

    def forget_window(self) -> None:
        """The host-side half of :meth:`reset_window` (for window tensors already zeroed)."""
        self._opened[0] = False
        # a plain attribute (None or a tuple): nn.Module.__setattr__'s checks would cost more than the rest of this
        self.__dict__["_collected"] = None
        calls = self.__dict__.get("_calls")  # absent in layers pickled by an older bndoctor
        if calls:
            calls.clear()

    def hold_collected(self) -> None:
        """Keep the open window's statistics as the whole window's (two passes), and start an empty window.

        Called by :func:`bndoctor.collect_window` after its no-grad pass; the
        following micro-batches are normalised with these statistics until the
        window closes.
        """
        collected = tuple(t.clone() for t in self._window) if self.window_open else None
        self.reset_window()
        self._collected = collected  # type: ignore[assignment]

    @property
    def holds_collected(self) -> bool:
        return self._collected is not None

    @property
    def window_open(self) -> bool:
        return self._opened[0]

    def window_statistics(self, *, collected: bool = False) -> tuple[float, torch.Tensor, torch.Tensor] | None:
        """``(count, mean, biased var)`` of the open window (``collected=True``: of the collected whole window).

        ``None`` when nothing is there. Tensors are the layer's own: read, do not modify.
        """
        if collected:
            held = self._collected
            return None if held is None else (float(held[0]), held[1], held[2] / held[0])
        count, mean, m2 = self._window
        if not self.window_open or float(count) == 0:
            return None
        return float(count), mean, m2 / count

    @property
    def pools_ranks(self) -> bool:
        return bool(self.sync)

    @property
    def controlled(self) -> bool:
        """Whether something closes this layer's windows (else training is plain BN)."""
        return self._controllers > 0

    def acquire_control(self, *, block: bool = False) -> None:
        """Count one more window controller (``block``: an ``accumulation_window`` block, which does not nest)."""
        if block:
            if self._in_block:
                raise BNDoctorError(
                    "accumulation_window blocks do not nest",
                    hint="close the outer window before opening another",
                )
            self._in_block = True
        self._controllers += 1

    def release_control(self, *, block: bool = False) -> None:
        if block:
            self._in_block = False
        self._controllers = max(self._controllers - 1, 0)

    @torch.no_grad()
    def normalisation_statistics(
        self, mean: torch.Tensor, var: torch.Tensor, n: int
    ) -> tuple[float | torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The window statistics this micro-batch will be normalised with, given its own (mean, biased var).

        The count is a 0-d tensor once the window holds data (no host read). ``None`` when no window
        control is attached (the layer then trains as plain BN).
        """
        if not self.controlled:
            return None
        if self._collected is not None:
            count, w_mean, w_m2 = (t.double() for t in self._collected)
            return count.reshape(()), w_mean, w_m2 / count
        if not self.window_open:
            return float(n), mean, var
        w_count, w_mean, w_m2 = self._window
        count, pooled_mean, pooled_m2 = pool_two(
            w_count.double().reshape(()), w_mean.double(), w_m2.double(), n, mean, var * n
        )
        return count, pooled_mean, pooled_m2 / count

    def close_window(self) -> None:
        """Commit the window: one EMA update of the running statistics with its pooled statistics.

        A window whose statistics hold NaN or Inf is not committed (decided on
        the device: no host synchronisation); :meth:`window_finite` tells.
        """
        close_windows_together((self,))

    def window_finite(self) -> bool:
        """Whether the open window's statistics are finite (reads one flag from the device)."""
        if not self.window_open:
            return True
        _, mean, m2 = self._window
        return bool(torch.isfinite(mean).all() & torch.isfinite(m2).all())

    # ----------------------------------------------------------------- forward

    def _normalise(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or not self.track_running_stats or self.running_mean is None:
            return _BatchNorm.forward(self, input)
        if not self.controlled:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "AccumBatchNorm is training without window control, so it behaves as plain BatchNorm; "
                    "call bndoctor.accumulate_bn(model, optimizer) or use bndoctor.accumulation_window(model) "
                    "(bndoctor's Lightning and Hugging Face callbacks attach it for you)",
                    BNDoctorWarning,
                    stacklevel=caller_stacklevel(),
                )
            return _BatchNorm.forward(self, input)
        if self.mode == "exact":
            return self._exact_forward(input)
        return self._window_forward(input)

    def _synced(self) -> bool:
        return self.sync and distributed.active(self.process_group)

    def _window_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool the micro-batch (with sync: the micro-step over all ranks) into the window, then normalise.

        The window is updated on the device (:func:`bndoctor.moments.pool_step`), in place, except in traced
        code where a backward needs a value derived from it (:meth:`_writes_window_in_place`).
        """
        n = x.numel() // x.shape[1]
        synced = self._synced()
        if n == 0 and not synced:
            return x.clone()
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        window = self._window[1]
        if window.device != x.device or window.dtype != wide:  # buffers replaced without .to()
            self._move_window(x.device, wide)
        renorm = self.mode in ("renorm", "exact")
        if renorm and not synced:
            require_batch(x)  # as torch's BN, and before the window takes the micro-batch in
        if synced:
            self.require_same_layout(x, self.num_features)
        in_place = self._writes_window_in_place(synced)
        with torch.no_grad():
            if n == 0:  # nothing to normalise here; the other ranks' statistics are pooled all the same
                mean = var = invstd = torch.zeros(x.shape[1], device=x.device, dtype=wide)
            elif renorm:  # this micro-batch's mean, biased var and 1/sqrt(var + eps)
                mean, var, invstd = batch_stats(x, self.eps)
            else:
                mean, var = batch_moments(x)
            step = distributed.pool_over_ranks(mean, var, n, self.process_group) if synced else (n, mean, var)
            count, w_mean, w_m2, spread = pool_step(*self._window, *step, inplace=in_place)
            if not in_place:
                self._window[:] = count, w_mean, w_m2
            self._opened[0] = True
            if n == 0:
                return x.clone()
            if renorm:
                if self._collected is None and not synced:  # against the window so far: its spread is m - mean
                    r, d = self._renorm_factors(invstd, w_m2 / count, spread)
                else:
                    _, ref_mean, ref_var = self._reference(count, w_mean, w_m2)
                    r, d = self._renorm_factors(invstd, ref_var, mean - ref_mean)
            else:  # the pooled gradient saves the mean, which an in-place window moves on from: a copy then
                use_count, use_mean, use_var = self._reference(count, w_mean.clone() if in_place else w_mean, w_m2)
        if renorm:
            if self.mode == "exact" and torch.is_grad_enabled():  # a call the window's replays correct
                call = Call(r, d, n, (mean, var, invstd), x)
                self._calls.append(call)
                return ExactRenorm.apply(x, self.weight, self.bias, self.eps, call, False)
            return renormalize(x, self.weight, self.bias, r, d, (mean, var, invstd), eps=self.eps)
        return self._pooled_norm(x, use_mean, use_var, n / use_count)

    @torch.compiler.disable
    def _exact_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The exact mode: the renorm forward that records its call, or, in a replay, the recorded call again.

        Runs eagerly under torch.compile (its records and replays are Python state).
        """
        replay = self._replay
        if replay is None:
            return self._window_forward(x)
        if x.numel() == 0:  # an empty local batch records no call (see _window_forward)
            return x.clone()
        if replay.index >= len(self._calls):
            raise BNDoctorError(
                f"the replayed window calls '{replay.name}' more often than the recorded window did "
                f"({len(self._calls)} calls recorded)",
                hint="the exact mode replays the outermost module call of each micro-batch; a model must call its "
                "BN layers the same way each time it is given the same input",
            )
        call = self._calls[replay.index]
        replay.index += 1
        if x.numel() // x.shape[1] != call.n:
            raise BNDoctorError(
                f"a replayed call of '{replay.name}' has {x.numel() // x.shape[1]} values per channel, "
                f"the recorded one {call.n}",
                hint="the exact mode needs the model to do the same with the same input (no data-dependent shapes)",
            )
        out = ExactRenorm.apply(x, self.weight, self.bias, self.eps, call, True)  # the recorded normalisation
        replay.outputs.append(out)
        return out

    # ----------------------------------------------------------------- exact mode's replays

    @property
    def recorded_calls(self) -> int:
        """Exact mode: the training calls recorded in the open window."""
        return len(self._calls)

    @torch.no_grad()
    def begin_pass(self) -> torch.Tensor | None:
        """Start a replay pass: this pass injects what the previous one recorded. Returns the local totals (2, C).

        ``None`` when the window recorded no call.
        """
        if not self._calls:
            return None
        sums = self._pass_sums = pass_sums(self._calls)
        for call in self._calls:
            call.grads = None
        return sums.sum(0)

    def open_pass(self, totals: torch.Tensor, outputs: list[torch.Tensor], name: str = "") -> None:
        """Replay with the window's totals (summed over the ranks that share the window); outputs go to ``outputs``.

        ``name``: the layer's path in the model, for errors.
        """
        count = self._window[0].reshape(()).to(totals.dtype)
        previous = self.__dict__.get("_pass_sums")  # absent in layers pickled by an older bndoctor
        if previous is not None:
            injections(self._calls, previous, totals, count, self.weight)
        self._replay = _Replay(outputs, name)

    def close_pass(self) -> BNDoctorError | None:
        """End a replay pass; returns the error (not raised) when the pass did not replay every recorded call."""
        replay, self._replay = self._replay, None
        self._pass_sums = None
        for call in self._calls:
            call.shift = None
        if replay is None or replay.index == len(self._calls):
            return None
        return BNDoctorError(
            f"the replayed window called '{replay.name}' {replay.index} times, the recorded one "
            f"{len(self._calls)} times",
            hint="the exact mode replays the outermost module call of each micro-batch; call the model "
            "once per micro-batch, the same way each time",
        )

    def pending_correction(self) -> torch.Tensor:
        """The size of what the next pass would inject (0 when this layer's gradient is exact): a 0-d tensor."""
        seen = [g for call in self._calls if call.grads is not None for g in call.grads]
        if not seen:
            return torch.zeros((), dtype=self._window[1].dtype, device=self._window[1].device)
        return torch.stack(seen).abs().sum()

    def _writes_window_in_place(self, synced: bool) -> bool:
        """Whether this forward updates the window's tensors in place (else it replaces them).

        Eager code always does. In traced code the window's tensors are inputs of the compiled graph, and
        AOTAutograd's partitioner may recompute a value the backward needs from such an input after the
        forward has overwritten it: the progressive gradient's n / count (``progressive`` and ``blend``
        modes). ``renorm`` without sync writes in place when traced too: its backward needs only r and d,
        which it takes through :func:`~bndoctor.layers._base.snapshot`. The synced path replaces the window in
        every mode. docs/accumulation.md ("torch.compile and GPUs") has the measurements behind this choice;
        tests/layers/test_compile.py compares every mode's compiled gradients with eager ones.
        """
        return not compiling() or (self.mode == "renorm" and not synced)

    def _pooled_norm(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, ratio: Any) -> torch.Tensor:
        """The progressive/blend output; traced, its saved statistics are copies the backward keeps (see snapshot)."""
        if compiling():
            mean, var = snapshot(mean), snapshot(var)
            ratio = snapshot(ratio) if isinstance(ratio, torch.Tensor) else ratio
        return _PooledNorm.apply(x, self.weight, self.bias, mean, var, ratio, self.eps)

    def _renorm_factors(
        self, invstd: torch.Tensor, ref_var: torch.Tensor, spread: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """r = sigma_B / sigma and d = (mu_B - mu) / sigma against the reference statistics (Ioffe 2017).

        ``invstd`` is the micro-batch's ``1 / sqrt(var + eps)``, ``ref_var`` the reference's biased variance
        and ``spread`` = mu_B - mu; eps sits inside both sigmas. ``ref_var`` and ``spread`` are taken over
        (written in place).
        """
        ref_invstd = ref_var.add_(self.eps).rsqrt_()
        return ref_invstd.div(invstd), spread.mul_(ref_invstd)

    def _reference(
        self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(count, mean, biased var) to normalise with, given the window so far.

        The count and mean may come back as the very tensors passed in; the variance is always new.
        """
        if self._collected is not None:  # two passes: the whole window's statistics, collected beforehand
            count, mean, m2 = self._collected
        elif self.mode == "blend" and self._previous is not None:
            # the samples this window has not seen yet, taken from the last window (none once it is full)
            p_count, p_mean, p_m2 = self._previous
            prior = (p_count - count).clamp(min=0.0)
            count, mean, m2 = pool_two(count, mean, m2, prior, p_mean, p_m2 * (prior / p_count.clamp(min=1.0)))
        return count, mean, m2 / count  # every term of the pooled M2 is >= 0

    def extra_repr(self) -> str:
        warm = "" if self.warm_start is None else f", warm_start={self.warm_start}"
        passes = f", passes={self.passes}" if self.mode == "exact" and self.passes is not None else ""
        return super().extra_repr() + f", mode={self.mode}" + passes + (", sync=True" if self.sync else "") + warm


class _Replay:
    """A replay pass in progress: the next recorded call, and where outputs go."""

    __slots__ = ("index", "name", "outputs")

    def __init__(self, outputs: list[torch.Tensor], name: str) -> None:
        self.index = 0
        self.outputs = outputs
        self.name = name


@torch.no_grad()
def close_windows_together(layers: Sequence[AccumBatchNorm]) -> None:
    """``layer.close_window()`` for every layer, in a few operations for all layers at once.

    ``blend`` layers keep their window as the last one first; then
    :func:`~bndoctor.layers._commit.commit_windows` commits every window (one
    EMA step each; a window with NaN or Inf, or no samples, is not committed)
    and empties them.
    """
    for layer in layers:
        if layer.mode == "blend" and layer.window_open:  # only blend reads the last window
            layer._previous = tuple(t.clone() for t in layer._window)  # type: ignore[assignment]
    commit_windows(layers)

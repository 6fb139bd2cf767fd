"""Every bndoctor operation on one model, each checked against an independent answer: the compatibility matrix.

:func:`run_operations` takes a built model (random init; timm, torchvision,
transformers or your own) and an example batch, and returns one
:class:`OpResult` per operation:

==============  ==============================================================================
operation       passes when
==============  ==============================================================================
inventory       ``find_bn`` finds BN layers and every one is supported
freeze          ``unfreeze_bn(freeze_bn(m))`` has the same classes and state_dict; frozen layers
                keep their statistics through a training forward
groupnorm       ``convert_bn`` leaves no BN that normalised with batch statistics, keeps every
                norm+activation layer's activation, and the model runs
fold            ``fold_bn(m.eval(), example_input=x)`` folds at least one layer and computes the
                same outputs
sync            ``to_sync_bn`` then ``from_sync_bn`` (one process): same outputs in eval mode,
                same classes and state_dict after the round trip
accumulate      an accumulation loop with ``to_accum_bn`` + ``accumulate_bn`` (2 windows of 2
                micro-batches) runs with a finite loss, commits one update per window, and
                ``from_accum_bn`` restores the classes
recalibrate     ``recalibrate`` writes the float64 statistics of every layer's inputs, gathered
                independently with hooks (relative error < 1e-3)
monitor         ``BNMonitor`` samples every layer that learns statistics during training forwards
                (with accumulation-aware BN: the window it normalises with), with finite values,
                and removes every hook on close
check+fix       ``check`` (setup: micro-batch 2 x 4 accumulation) then ``fix``: every layer a
                finding names is converted or listed in ``skipped``, and the fixed model runs
==============  ==============================================================================

Used by ``benchmarks/compat_matrix.py`` (all architectures it can build) and
by the test suite (a representative subset). Models are never downloaded.
"""

from __future__ import annotations

import copy
import math
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._batches import default_forward
from ..diagnose import TrainingSetup, check, fix
from ..errors import BNDoctorWarning
from ..families import has_post_ops, normalises_then_post_ops
from ..layers import AccumBatchNorm, GroupNormAct, SyncBatchNorm
from ..remedies import (
    accumulate_bn,
    attach_all,
    convert_bn,
    fold_bn,
    freeze_bn,
    from_accum_bn,
    from_sync_bn,
    to_accum_bn,
    to_sync_bn,
    unfreeze_bn,
)
from ..stats import recalibrate

__all__ = ["OPERATIONS", "OpResult", "run_operations"]

OPERATIONS = (
    "inventory",
    "freeze",
    "groupnorm",
    "fold",
    "sync",
    "accumulate",
    "recalibrate",
    "monitor",
    "check+fix",
)


@dataclass
class OpResult:
    """``status``: ``"pass"``, ``"fail"`` (``detail`` says why) or ``"n/a"`` (e.g. every BN layer is frozen)."""

    operation: str
    status: str
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "fail"


class _Failed(AssertionError):
    pass


class _NotApplicable(Exception):
    pass


def _learning_layers(model: nn.Module) -> None:
    """Operations that change how BN learns need a layer that learns: n/a when all are frozen."""
    from .._walk import find_bn

    if all(r.frozen for r in find_bn(model)):
        raise _NotApplicable("every BN layer is frozen (normalises with fixed statistics)")


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise _Failed(message)


def _output(out: Any) -> torch.Tensor:
    """The first floating tensor of a model's output (tensor, tuple, dict, ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else vars(out).values()
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
        if isinstance(value, (list, tuple, dict)):
            try:
                return _output(value)
            except _Failed:
                continue
    raise _Failed(f"no tensor in the model's output ({type(out).__name__})")


def _run(model: nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        out = _output(default_forward(model, x))
    return out if out.dtype == torch.float64 else out.float()


def _to_double(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_to_double(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_double(v) for k, v in x.items()}
    return x


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    scale = float(b.abs().max().clamp(min=1.0))
    err = float((a - b).abs().max()) / scale
    _expect(bool(torch.isfinite(a).all()), f"{what}: non-finite output")
    _expect(err <= tol, f"{what}: outputs differ by {err:.2e} (relative to max |y|)")


def _classes(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


def _same_state(a: nn.Module, b: nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    _expect(sa.keys() == sb.keys(), f"{what}: state_dict keys differ")
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    _expect(not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:2]}")


def _bn_inputs(model: nn.Module, names: list[str], x: Any) -> dict[str, list[torch.Tensor]]:
    """Every input each named BN receives in one forward where BN normalises with batch statistics."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: seen[n].append(a[0].detach().double())))
    try:
        with torch.no_grad():
            default_forward(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


# --------------------------------------------------------------------------- operations


def _inventory(model: nn.Module, x: Any) -> str:
    from .._walk import find_bn

    records = find_bn(model)
    _expect(bool(records), "no BN layer found")
    unsupported = [f"{r.name} ({r.reason})" for r in records if not r.supported]
    _expect(not unsupported, f"unsupported: {'; '.join(unsupported[:3])}")
    families = sorted({r.family.name for r in records if r.family is not None})
    return f"{len(records)} layers ({', '.join(families)})"


def _freeze(model: nn.Module, x: Any) -> str:
    frozen = freeze_bn(model)
    before = {k: v.clone() for k, v in frozen.state_dict().items() if "running" in k}
    frozen.train()
    with torch.no_grad():
        default_forward(frozen, x)
    after = frozen.state_dict()
    _expect(all(torch.equal(v, after[k]) for k, v in before.items()), "statistics changed while frozen")
    back = unfreeze_bn(frozen)
    _expect(_classes(back) == _classes(model), "classes differ after the round trip")
    _same_state(back, model, "freeze round trip")
    return f"{len(before) // 2} layers"


def _groupnorm(model: nn.Module, x: Any) -> str:
    from .._walk import find_bn

    acts = sum(1 for r in find_bn(model) if not r.frozen and has_post_ops(r.module))
    converted = convert_bn(model)
    left = [r.name for r in find_bn(converted) if not r.frozen]
    _expect(not left, f"{len(left)} BN layer(s) left, e.g. {left[:2]}")
    kept = sum(isinstance(m, GroupNormAct) for m in converted.modules())
    _expect(kept >= acts, f"{acts - kept} norm+activation layer(s) lost their activation")
    out = _run(converted.train(), x)
    _expect(bool(torch.isfinite(out).all()), "non-finite output")
    return f"{sum(isinstance(m, nn.GroupNorm) for m in converted.modules())} GroupNorm ({kept} with activation)"


def _fold(model: nn.Module, x: Any) -> str:
    from .._pairs import ForwardPairs, pairs_from_fx
    from .._walk import find_bn

    # in float64, so that the comparison tests the folding itself, not float32 rounding amplified by a deep
    # randomly initialised network
    model = copy.deepcopy(model).double().eval()
    x = _to_double(x)
    records = [r for r in find_bn(model) if normalises_then_post_ops(r.module)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BNDoctorWarning)
        folded = fold_bn(model, example_input=x)
    after = len([r for r in find_bn(folded) if normalises_then_post_ops(r.module)])
    _close(_run(folded, x), _run(model, x), "folded vs unfolded (float64)", tol=1e-8)
    count = len(records) - after
    if count == 0:
        with ForwardPairs(model, {id(r.module): r for r in records}) as seen, torch.no_grad():
            default_forward(model, x)
        _expect(not list(seen.producers_of()), "nothing folded although a BN follows a conv/linear")
        raise _NotApplicable("no BN directly after a conv/linear (e.g. conv -> activation -> BN)")
    try:  # where torch.fx can trace the model, the forward pass must find the same pairs
        traced = len(pairs_from_fx(model, {id(r.module): r for r in records}))
    except Exception:
        traced = None
    if traced is not None:
        _expect(traced == count, f"the forward pass folded {count} layers, the fx trace finds {traced}")
    return f"{count} of {len(records)} folded" + ("" if traced is None else " (fx agrees)")


def _sync(model: nn.Module, x: Any) -> str:
    _learning_layers(model)
    model = copy.deepcopy(model).eval()
    synced = to_sync_bn(model)
    count = sum(isinstance(m, SyncBatchNorm) for m in synced.modules())
    _expect(count > 0, "nothing converted")
    _close(_run(synced, x), _run(model, x), "SyncBN vs BN in eval mode")
    back = from_sync_bn(synced, dims=2)
    _expect(_classes(back) == _classes(model), "classes differ after the round trip")
    _same_state(back, model, "sync round trip")
    return f"{count} layers"


def _accumulate(model: nn.Module, x: Any) -> str:
    _learning_layers(model)
    converted = to_accum_bn(model).train()
    layers = [m for m in converted.modules() if isinstance(m, AccumBatchNorm)]
    _expect(bool(layers), "nothing converted")
    params = [p for p in converted.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    accumulate_bn(converted, optimizer)
    for _ in range(2):
        for _ in range(2):
            loss = _output(default_forward(converted, x)).float().pow(2).mean()
            _expect(bool(torch.isfinite(loss)), "non-finite loss")
            (loss / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
    tracked = {int(m.num_batches_tracked) for m in layers}
    _expect(tracked == {2}, f"expected one running-statistics update per window, got {sorted(tracked)}")
    back = from_accum_bn(converted)
    _expect(_classes(back) == _classes(model), "classes differ after from_accum_bn")
    return f"{len(layers)} layers"


def _recalibrate(model: nn.Module, x: Any) -> str:
    from .._walk import find_bn

    _learning_layers(model)
    work = copy.deepcopy(model)
    names = [r.name for r in find_bn(work) if not r.frozen and r.track_running_stats]
    _expect(bool(names), "no layer to recalibrate")
    batches = [x, x]  # two batches: pooled statistics of their union
    oracle_model = copy.deepcopy(model).eval()
    for name in names:
        oracle_model.get_submodule(name).train()  # as recalibration runs: batch statistics, the rest eval
    inputs = {n: [] for n in names}
    for batch in batches:
        for n, xs in _bn_inputs(oracle_model, names, batch).items():
            inputs[n] += xs
    report = recalibrate(work, batches, progress=False)
    reached = [n for n in names if inputs[n]]  # e.g. auxiliary heads run in training mode only
    _expect(
        sorted(report.unreached) == sorted(set(names) - set(reached)),
        f"reached layers differ from the oracle's: {sorted(set(report.unreached) ^ (set(names) - set(reached)))[:3]}",
    )
    worst = 0.0
    for name in reached:
        values = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in inputs[name]], dim=1)
        mean, var = values.mean(1), values.var(1, unbiased=True)
        module = work.get_submodule(name)
        err_mean = float((module.running_mean.double() - mean).abs().max() / var.sqrt().clamp(min=1e-6).max())
        err_var = float(((module.running_var.double() - var).abs() / var.clamp(min=1e-12)).max())
        worst = max(worst, err_mean, err_var)
    _expect(worst < 1e-3, f"statistics differ from the float64 oracle by {worst:.2e}")
    skipped = len(names) - len(reached)
    return f"{len(reached)} layers, max relative error {worst:.1e}" + (
        f" ({skipped} not reached in eval mode, kept as they were)" if skipped else ""
    )


def _monitor(model: nn.Module, x: Any) -> str:
    from ..monitor import BNMonitor

    _learning_layers(model)
    converted = to_accum_bn(model).train()
    optimizer = torch.optim.SGD([p for p in converted.parameters() if p.requires_grad], lr=0.0)
    handles = attach_all(converted, optimizer)
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in converted.modules())
    with BNMonitor(converted, every=1, keep=True, warmup=0, log=False) as monitor:
        for _ in range(2):
            with torch.no_grad():
                default_forward(converted, x)
    optimizer.step()
    for handle in handles:
        handle.remove()
    hooks_after = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in converted.modules())
    _expect(hooks_after == hooks_before, "the monitor left hooks behind")
    samples = [r for r in monitor.records if r["kind"] == "sample"]
    _expect(len(samples) == 2, f"expected 2 samples, got {len(samples)}")
    learning = set(monitor.layers) - {n for n, r in monitor.layers.items() if r.frozen}
    seen = samples[-1]["layers"]
    _expect(learning <= set(seen), f"layers not sampled: {sorted(learning - set(seen))[:3]}")
    windows = sum("window" in v for v in seen.values())
    _expect(windows == len(learning), f"{len(learning) - windows} layer(s) without their window statistics")
    bad = [n for n in learning if not math.isfinite(seen[n]["shift"])]
    _expect(not bad, f"non-finite values for {bad[:3]}")
    return f"{len(learning)} layers sampled (windows of {int(seen[sorted(learning)[0]]['window'])} values)"


def _check_fix(model: nn.Module, x: Any) -> str:
    setup = TrainingSetup(micro_batch=2, accum_steps=4)
    shape = tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else None
    report = check(model, setup, input_shape=shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BNDoctorWarning)
        result = fix(model, report)
    actions = [f.action for f in report.findings if f.action is not None]
    named = {m for a in actions for m in a.modules}
    fixed_modules = dict(result.model.named_modules())
    original = dict(model.named_modules())
    untouched = [
        n
        for n in named
        if n in fixed_modules
        and type(fixed_modules[n]) is type(original.get(n))
        and isinstance(original.get(n), _BatchNorm)
        and not any(s.startswith(f"{n} ") for s in result.skipped)
        and any(a.name != "drop_bias" and n in a.modules for a in actions)
    ]
    _expect(not untouched, f"prescribed but neither fixed nor listed: {untouched[:3]}")
    fixed = result.model.train()
    optimizer = torch.optim.SGD([p for p in fixed.parameters() if p.requires_grad] or [torch.zeros(1)], lr=0.0)
    handles = attach_all(fixed, optimizer)  # what the fixes need from the loop (accumulation windows)
    out = _output(default_forward(fixed, x))
    _expect(bool(torch.isfinite(out).all()), "non-finite output after fix")
    optimizer.step()  # closes the accumulation windows the forward opened
    for handle in handles:
        handle.remove()
    return f"{', '.join(report.codes()) or 'no findings'} -> {len(result.changes)} change(s)"


_OPS: dict[str, Callable[[nn.Module, Any], str]] = {
    "inventory": _inventory,
    "freeze": _freeze,
    "groupnorm": _groupnorm,
    "fold": _fold,
    "sync": _sync,
    "accumulate": _accumulate,
    "recalibrate": _recalibrate,
    "monitor": _monitor,
    "check+fix": _check_fix,
}


def run_operations(
    build: Callable[[], nn.Module], example_input: Any, operations: tuple[str, ...] = OPERATIONS
) -> list[OpResult]:
    """Run each operation on a fresh model from ``build()`` and an example batch; never raises for a failure."""
    results = []
    for name in operations:
        start = time.perf_counter()
        try:
            torch.manual_seed(0)
            model = build()
            detail = _OPS[name](model, example_input)
            results.append(OpResult(name, "pass", detail, time.perf_counter() - start))
        except _NotApplicable as exc:
            results.append(OpResult(name, "n/a", str(exc), time.perf_counter() - start))
        except Exception as exc:  # a failing operation is a result, with its reason
            where = traceback.extract_tb(exc.__traceback__)[-1]
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            if not isinstance(exc, _Failed):
                reason = f"{type(exc).__name__}: {reason} ({where.filename.rsplit('/', 1)[-1]}:{where.lineno})"
            results.append(OpResult(name, "fail", reason, time.perf_counter() - start))
    return results

"""Fault injection: every API that runs the user's model leaves the model exactly as it was when something fails.

Faults: the forward raises after k batches, a KeyboardInterrupt, the data iterator raises, a NaN batch, an
empty loader, a batch of one. After each, the model's state_dict (bitwise), every module's mode and
instance attributes, BN momentum, requires_grad and every hook must be as before, and the optimizer's hooks too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from bndoctor.models import tiny_resnet


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    modules = dict(model.named_modules())
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": {n: m.training for n, m in modules.items()},
        "classes": {n: type(m) for n, m in modules.items()},
        "attributes": {n: sorted(k for k in vars(m) if not k.startswith("_")) for n, m in modules.items()},
        "forward_patched": {n: "forward" in vars(m) for n, m in modules.items()},
        "momentum": {n: getattr(m, "momentum", None) for n, m in modules.items()},
        "track": {n: getattr(m, "track_running_stats", None) for n, m in modules.items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for n, m in modules.items()
        },
        "optimizer_hooks": None if optimizer is None else len(optimizer._optimizer_step_post_hooks),
    }


def _assert_same(before: dict, after: dict) -> None:
    for key, value in before.items():
        if key == "tensors":
            assert value.keys() == after[key].keys()
            changed = [
                k for k in value if not torch.equal(value[k], after[key][k]) and not _both_nan(value[k], after[key][k])
            ]
            assert not changed, f"tensors changed: {changed[:3]}"
        else:
            assert value == after[key], key


def _both_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.is_floating_point()
        and bool(torch.equal(a.isnan(), b.isnan()))
        and torch.equal(a.nan_to_num(), b.nan_to_num())
    )


class Boom(Exception):
    pass


def _batches(n: int = 4, size: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(size, 1, 8, 8, generator=gen) for _ in range(n)]


def _raising_forward(after: int, exc: type[BaseException] = Boom) -> Callable:
    calls = [0]

    def forward(model, batch):
        calls[0] += 1
        if calls[0] > after:
            raise exc("injected")
        return model(batch)

    return forward


def _raising_iterator(after: int):
    def gen():
        for i, batch in enumerate(_batches()):
            if i == after:
                raise Boom("the loader broke")
            yield batch

    return gen()


def _nan_batches() -> list[torch.Tensor]:
    batches = _batches()
    batches[2] = batches[2].clone()
    batches[2][0, 0, 0, 0] = float("nan")
    return batches


FAULTS = {
    "forward raises after 2 batches": (lambda: _batches(), lambda: _raising_forward(2), Boom),
    "KeyboardInterrupt": (lambda: _batches(), lambda: _raising_forward(1, KeyboardInterrupt), KeyboardInterrupt),
    "iterator raises": (lambda: _raising_iterator(2), lambda: None, Boom),
    "a NaN batch": (_nan_batches, lambda: None, bd.BNDoctorError),
    "empty loader": (lambda: [], lambda: None, bd.BNDoctorError),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = tiny_resnet().train()
    model.layers[0][0].bn1.momentum = 0.3  # something non-default to restore
    model.fc.weight.requires_grad_(False)
    model.stem[1].register_forward_hook(lambda m, a, o: None)  # the user's own hook stays
    return model


@pytest.mark.parametrize("fault", list(FAULTS))
def test_recalibrate_restores_everything(fault):
    data, forward, expected = FAULTS[fault]
    model = _model()
    before = _state(model)
    with pytest.raises(expected):
        bd.recalibrate(model, data(), forward=forward(), progress=False)
    _assert_same(before, _state(model))


@pytest.mark.parametrize("fault", [f for f in FAULTS if f not in ("a NaN batch",)])
def test_collect_window_restores_everything(fault):
    data, forward, expected = FAULTS[fault]
    model = bd.to_accum_bn(_model())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    handle = bd.accumulate_bn(model, optimizer)
    before = _state(model, optimizer)
    if fault == "empty loader":
        assert bd.collect_window(model, data()) == 0  # nothing to collect is not an error
        model.stem[1].reset_window()
    else:
        with pytest.raises(expected):
            bd.collect_window(model, data(), forward=forward())
    _assert_same(before, _state(model, optimizer))
    assert not any(m.window_open or m.holds_collected for m in model.modules() if isinstance(m, bd.AccumBatchNorm))
    handle.remove()


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_accumulation_window_discards_and_restores_when_the_loop_raises(exc):
    model = bd.to_accum_bn(_model())
    before = _state(model)
    with pytest.raises(exc), bd.accumulation_window(model):
        model(_batches()[0])
        raise exc("injected")
    _assert_same(before, _state(model))


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_fold_with_an_example_input_restores_the_model_when_the_forward_raises(exc):
    model = _model().eval()
    before = _state(model)
    with pytest.raises(exc):
        bd.fold_bn(model, example_input=_batches()[0], forward=_raising_forward(0, exc), inplace=True)
    _assert_same(before, _state(model))


def test_check_restores_the_model_when_its_forward_raises_on_meta_tensors():
    model = _model()

    def explode(module, args):
        raise Boom("a custom op without a meta kernel")

    model.layers[1].register_forward_pre_hook(explode)
    before = _state(model)
    report = bd.check(model, bd.TrainingSetup(micro_batch=2), input_shape=(1, 8, 8))
    assert not report.traced and "(in 'layers" in report.trace_error
    _assert_same(before, _state(model))


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_the_monitor_leaves_nothing_behind_when_a_sampled_forward_raises(exc):
    model = _model()
    before = _state(model)
    monitor = bd.BNMonitor(model, every=1, log=False)
    with pytest.raises(exc):
        _raising_forward(0, exc)(model, _batches()[0])
    model(_batches()[0])
    monitor.close()
    after = _state(model)
    for key in ("hooks", "forward_patched", "attributes", "modes"):
        assert before[key] == after[key], key


def test_a_batch_of_one_is_recalibrated_or_refused_as_batchnorm_would():
    model = _model()
    before = _state(model)
    one = [torch.randn(1, 1, 8, 8)]  # the last layers see one value per channel: BN itself cannot train on it
    try:
        bd.recalibrate(model, one, progress=False)
    except (ValueError, RuntimeError):
        _assert_same(before, _state(model))
    else:
        assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def test_conversions_that_refuse_a_layer_change_nothing_even_in_place():
    model = _model()
    model.add_module("extra", nn.BatchNorm1d(3, track_running_stats=False))
    before = _state(model)
    for convert in (bd.freeze_bn, bd.to_batch_renorm):
        with pytest.raises(bd.errors.MissingRunningStatsError):
            convert(model, inplace=True)
        _assert_same(before, _state(model))
    with pytest.raises(bd.errors.GroupCountError):
        bd.convert_bn(model, num_groups=7, inplace=True)
    _assert_same(before, _state(model))


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_use_stats_switches_back_when_the_block_raises(exc):
    model = _model()
    bd.recalibrate(model, _batches(), progress=False, domain="target")
    before = _state(model)
    with pytest.raises(exc), bd.use_stats(model, "target"):
        model.eval()(_batches()[0])
        raise exc("injected")
    after = _state(model)
    after["modes"] = before["modes"]  # the block's own model.eval() is the user's doing
    _assert_same(before, after)


def test_noise_scale_attach_and_detach_leave_no_hooks_even_after_a_failed_step():
    model = _model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = _state(model, optimizer)
    gns = bd.GradientNoiseScale(model, micro_batch=4, accum_steps=2).attach(optimizer)
    with pytest.raises(Boom):
        model(_batches()[0]).sum().backward()
        raise Boom("the loop broke before the step")
    gns.detach()
    optimizer.step()  # the step hook is gone: no estimate
    after = _state(model, optimizer)
    after["tensors"] = before["tensors"]  # gradients were computed; no parameter or buffer is a gradient
    _assert_same(before, after)
    assert not gns._handles  # every tensor hook removed
    seen = []
    for p in model.parameters():  # a later backward reaches no bndoctor hook
        if p.requires_grad:
            p.register_hook(lambda g: seen.append(1))
    model(_batches()[0]).sum().backward()
    assert gns.steps == 0 and len(gns.samples) == 0 and seen

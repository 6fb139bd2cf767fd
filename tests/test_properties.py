"""Property-based tests over random module trees (hypothesis).

The trees mix Sequential, ModuleList, ModuleDict and custom modules, conv and
linear layers with and without bias, BN 1d/2d with random hyper-parameters,
statistics, modes and requires_grad flags, and BN layers shared between two
paths.
"""

import copy
import warnings

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bndoctor as bd
from tests._fakes import randomize_bn

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class ListNet(nn.Module):
    def __init__(self, layers) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class DictNet(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({"a": first, "b": second})

    def forward(self, x):
        return self.parts["b"](self.parts["a"](x))


class Twice(nn.Module):
    """Applies the same module at two paths (shared submodule)."""

    def __init__(self, shared: nn.Module) -> None:
        super().__init__()
        self.first = shared
        self.second = shared

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


class Head(nn.Module):
    def __init__(self, channels: int, features: int, bias: bool, bn: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, features, bias=bias)
        self.bn = bn

    def forward(self, x):
        return self.bn(self.fc(x.mean(dim=(2, 3))))


def _bn(draw, channels, dims=2):
    cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return cls(
        channels,
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        momentum=draw(st.sampled_from([0.1, 0.01, None])),
        affine=draw(st.booleans()),
    )


@st.composite
def blocks(draw, channels, depth):
    kind = draw(st.sampled_from(["convbn", "convbn", "residual", "list", "dict", "shared"] if depth else ["convbn"]))
    if kind == "convbn":
        out = draw(st.sampled_from([channels, 4, 6, 8]))
        conv = nn.Conv2d(channels, out, draw(st.sampled_from([1, 3])), padding="same", bias=draw(st.booleans()))
        layers = [conv, _bn(draw, out)]
        if draw(st.booleans()):
            layers.append(nn.ReLU())
        return nn.Sequential(*layers), out
    if kind == "residual":
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        return Residual(nn.Sequential(conv, _bn(draw, channels))), channels
    if kind == "shared":
        return Twice(_bn(draw, channels)), channels
    first, mid = draw(blocks(channels, depth - 1))
    second, out = draw(blocks(mid, depth - 1))
    return (ListNet([first, second]) if kind == "list" else DictNet(first, second)), out


@st.composite
def models(draw):
    body, channels = draw(blocks(3, depth=3))
    features = draw(st.sampled_from([5, 7]))
    model = nn.Sequential(body, Head(channels, features, draw(st.booleans()), _bn(draw, features, dims=1)))
    randomize_bn(model, seed=draw(st.integers(0, 2**16)))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(draw(st.booleans()))
        for param in module.parameters(recurse=False):
            param.requires_grad_(draw(st.booleans()))
    if draw(st.booleans()):
        model = model.double()
    return model


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m), m.training) for n, m in model.named_modules(remove_duplicate=False)],
        [(n, p.requires_grad, p.dtype) for n, p in model.named_parameters()],
    )


def _same(a, b):
    return a[1:] == b[1:] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def _input(model):
    dtype = next(model.parameters()).dtype
    return torch.randn(4, 3, 5, 5, dtype=dtype, generator=torch.Generator().manual_seed(1))


def _close(a, b):
    tol = 1e-9 if a.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@SETTINGS
@given(models(), st.booleans())
def test_freeze_keeps_eval_outputs_in_any_mode_and_leaves_input_untouched(model, affine):
    before = _snapshot(model)
    frozen = bd.freeze_bn(model, affine=affine)
    assert _same(_snapshot(model), before)
    x = _input(model)
    reference = copy.deepcopy(model).eval()(x)
    _close(frozen.train()(x), reference)
    _close(frozen.eval()(x), reference)
    assert all(r.frozen for r in bd.find_bn(frozen))


@SETTINGS
@given(models(), st.booleans())
def test_freeze_unfreeze_round_trip(model, affine):
    before = _snapshot(model)
    back = bd.unfreeze_bn(bd.freeze_bn(model, affine=affine))
    assert _same(_snapshot(back), before)
    assert [m.momentum for m in bd.find_bn(back)] == [m.momentum for m in bd.find_bn(model)]
    model.load_state_dict(bd.freeze_bn(model).state_dict())  # checkpoints cross both ways


@SETTINGS
@given(models())
def test_fold_keeps_eval_outputs(model):
    model.eval()
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bd.BNDoctorWarning)  # shared BN layers are left, with a warning
        folded = bd.fold_bn(model)
    assert _same(_snapshot(model), before)
    x = _input(model)
    _close(folded(x), model(x))
    # everything but BN layers shared between two paths (applied twice, no single producer) folds
    left = bd.find_bn(folded)
    assert all(r.aliases for r in left)


@SETTINGS
@given(models(), st.sampled_from(["group", "layer", "instance"]))
def test_convert_preserves_flags_dtype_sharing(model, to):
    bn_before = {r.name: r for r in bd.find_bn(model)}
    before = _snapshot(model)
    out = bd.convert_bn(model, to)
    assert _same(_snapshot(model), before)
    assert not bd.find_bn(out)
    for name, record in bn_before.items():
        new = out.get_submodule(name)
        assert isinstance(new, nn.GroupNorm) and new.training == record.training
        for alias in record.aliases:
            assert out.get_submodule(alias) is new
        for pname in ("weight", "bias"):
            old_p = getattr(record.module, pname)
            new_p = getattr(new, pname)
            assert (old_p is None) == (new_p is None)
            if old_p is not None:
                assert new_p.dtype == old_p.dtype and new_p.device == old_p.device
                assert new_p.requires_grad == old_p.requires_grad
                assert torch.equal(new_p, old_p)
    # modules that are not BN keep their flags
    others = [(n, m.training) for n, m in model.named_modules() if n not in bn_before]
    assert others == [(n, out.get_submodule(n).training) for n, _ in others]
    out(_input(model))  # still runs


@SETTINGS
@given(models())
def test_inplace_changes_the_given_object(model):
    frozen = bd.freeze_bn(model, inplace=True)
    assert frozen is model and all(r.frozen for r in bd.find_bn(model))


@SETTINGS
@given(models(), st.sampled_from([1, 2, 4, 32]), st.sampled_from([1, 8]), st.sampled_from([1, 4]), st.booleans())
def test_check_and_fix_never_touch_the_model_and_fixed_models_run(model, micro, accum, world, finetune):
    before = _snapshot(model)
    setup = bd.TrainingSetup(micro_batch=micro, accum_steps=accum, world_size=world, finetune=finetune)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bd.BNDoctorWarning)
        report = bd.check(model, setup, input_shape=(3, 5, 5))
        assert _same(before, _snapshot(model))  # checking (and its meta trace) changed nothing
        assert report.traced and all(f.severity in ("error", "warning", "info") for f in report.findings)
        fixed, _ = bd.fix(model, report)
    assert _same(before, _snapshot(model))  # fix works on a copy
    fixed.train()
    with warnings.catch_warnings():  # accumulation-aware BN without window control warns and acts as plain BN
        warnings.simplefilter("ignore", bd.BNDoctorWarning)
        out = fixed(_input(model))  # training mode: SyncBN and accumulation-aware BN fall back to local here
    assert out.shape == (4, model[1].fc.out_features) and torch.isfinite(out).all()
    fixed.eval()
    assert torch.isfinite(fixed(_input(model))).all()
    # a redundant-bias repair is exact in eval mode
    only_bias = bd.diagnose.Report([f for f in report.findings if f.code == "BN201"], setup, "m", report.bn_layers)
    repaired, _ = bd.fix(model, only_bias)
    _close(repaired.eval()(_input(model)), copy.deepcopy(model).eval()(_input(model)))


@SETTINGS
@given(models())
def test_monitoring_a_forward_changes_nothing(model):
    reference = copy.deepcopy(model)
    monitor = bd.BNMonitor(model, every=1, keep=True, warmup=0, window=1)
    model.train()
    reference.train()
    _close(model(_input(model)), reference(_input(reference)))
    monitor.close()
    after, expected = _snapshot(model), _snapshot(reference)
    assert _same(after, expected)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    sample = [r for r in monitor.records if r["kind"] == "sample"]
    assert len(sample) == 1 and set(sample[0]["layers"]) == {r.name for r in bd.find_bn(model)}


@SETTINGS
@given(models(), st.sampled_from(["renorm", "progressive"]))
def test_accumulation_aware_bn_on_any_tree_round_trips(model, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bd.BNDoctorWarning)
        converted = bd.to_accum_bn(model, mode=mode)
    converted.train()
    with bd.accumulation_window(converted):
        bd.collect_window(converted, [_input(model), _input(model)])
        out = converted(_input(model))
    assert torch.isfinite(out).all()
    back = bd.from_accum_bn(converted)
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]

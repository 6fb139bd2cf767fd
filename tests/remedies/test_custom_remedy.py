"""A remedy defined outside the package (docs/architecture.md) is picked up everywhere with no edit inside it."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from bndoctor import families, remedies
from bndoctor.diagnose import CHECKS
from bndoctor.findings import Action, Finding
from bndoctor.models import tiny_resnet

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
SETUP = bd.TrainingSetup(micro_batch=2)


@pytest.fixture
def registries():
    """Snapshot the three registries; a test's registrations are undone afterwards."""
    saved = (dict(CHECKS), dict(remedies.REMEDIES), list(families.FAMILIES))
    yield
    CHECKS.clear()
    CHECKS.update(saved[0])
    remedies.REMEDIES.clear()
    remedies.REMEDIES.update(saved[1])
    families.FAMILIES[:] = saved[2]


@pytest.fixture
def toy(registries):
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    env: dict = {"__name__": "toy_remedy"}
    exec(compile(code, str(DOC), "exec"), env)
    return env


def test_check_prescribes_the_toy_remedy_and_fix_applies_it(toy):
    model = tiny_resnet()
    report = bd.check(model, SETUP, input_shape=(1, 8, 8))
    (bn101,) = report.by_code("BN101")
    assert bn101.action.name == "to_prior_bn"  # rank 5: ahead of the built-in prescriptions
    assert bn101.fix.startswith("prior BN")
    assert report.by_code("PRIOR01")[0].action.name == "to_prior_bn"
    fixed, changes = bd.fix(model, report)
    assert changes == ["to_prior_bn: 9 layer(s)"]
    layers = bd.find_bn(fixed)
    assert all(type(r.module) is toy["PriorBatchNorm"] for r in layers)
    assert {r.family.name for r in layers} == {"prior-bn"}
    assert type(model.stem[1]) is nn.BatchNorm2d  # fix worked on a copy
    again = bd.check(fixed, SETUP, input_shape=(1, 8, 8))
    assert not again.by_code("BN101") and not again.by_code("PRIOR01")  # the layer says it is a remedy


def test_the_monitor_reads_the_statistics_the_toy_layer_normalises_with(toy):
    model = toy["to_prior_bn"](tiny_resnet(), prior=6.0)
    with bd.BNMonitor(model, every=1, keep=True, warmup=0) as monitor:
        model.train()(torch.randn(2, 1, 8, 8))
    sample = next(r for r in monitor.records if r["kind"] == "sample")
    assert sample["layers"]["stem.1"]["window"] == 2 * 8 * 8 + 6.0


def test_the_toy_layer_trains_and_reverts_to_batchnorm_exactly(toy):
    torch.manual_seed(0)
    model = toy["to_prior_bn"](tiny_resnet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    assert remedies.attach_all(model, optimizer) == []  # nothing to attach for this remedy
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(torch.randn(2, 1, 8, 8)), torch.randint(0, 10, (2,)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    back = toy["from_prior_bn"](model)
    assert all(type(r.module) is nn.BatchNorm2d for r in bd.find_bn(back))
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(back.eval()(x), model.eval()(x))
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)


def test_an_action_without_a_fixer_is_listed_not_dropped(registries):
    @bd.register_check("NOFIX01", "prescribes something nobody registered")
    def prescribe_unknown(ctx):
        return Finding("NOFIX01", "warning", "stem.1", "needs a repair", action=Action("to_nowhere", ("stem.1",)))

    result = bd.fix(tiny_resnet(), bd.check(tiny_resnet()))
    assert any("NOFIX01 stem.1" in s and "to_nowhere" in s and "register_fix" in s for s in result.skipped)


def test_register_fix_serves_a_check_of_your_own(registries):
    @bd.register_check("MOM01", "momentum too high for this run")
    def momentum(ctx):
        return Finding("MOM01", "info", "stem.1", "lower it", action=Action("halve_momentum", ("stem.1",)))

    @bd.register_fix("halve_momentum")
    def halve(step):
        for name in step.layers:
            step.model.get_submodule(name).momentum /= 2
        step.note("halve_momentum")
        return step.model

    fixed, changes = bd.fix(tiny_resnet(), bd.check(tiny_resnet()))
    assert fixed.stem[1].momentum == pytest.approx(0.05) and changes == ["halve_momentum: 1 layer(s)"]
    with pytest.raises(bd.BNDoctorError, match="already registered"):
        bd.register_fix("halve_momentum")(halve)


def test_registries_reject_bad_input(registries):
    with pytest.raises(bd.BNDoctorError, match="already registered"):
        remedies.register_remedy(remedies.Remedy("to_accum_bn"))
    with pytest.raises(bd.BNDoctorError, match=r"expected a bndoctor\.remedies\.Remedy"):
        remedies.register_remedy("to_x")  # type: ignore[arg-type]
    with pytest.raises(bd.BNDoctorError, match="no layer family named 'nope'"):
        families.register_family(families.Family("x", "batchnorm", lambda m: False), before="nope")
    with pytest.raises(bd.BNDoctorError, match="already registered"):
        families.register_family(families.Family("torch", "batchnorm", lambda m: False))


def test_a_layers_qconfig_travels_through_every_class_swap_and_back():
    """torch.ao.quantization's per-module ``qconfig`` is kept by to_/from_ sync, accumulation-aware and renorm."""
    qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[1].qconfig = qconfig
    for to, back in ((bd.to_sync_bn, bd.from_sync_bn), (bd.to_accum_bn, bd.from_accum_bn),
                     (bd.to_batch_renorm, bd.from_batch_renorm)):  # fmt: skip
        converted = to(model, inplace=True)
        assert converted[1].qconfig is qconfig, to.__name__
        model = back(converted, inplace=True)
        assert type(model[1]) is nn.BatchNorm2d and model[1].qconfig is qconfig, back.__name__

"""BNMonitor: the numbers it records (float64 oracles), when it samples, alerts, sinks, state, safety."""

import contextlib
import copy
import json
import logging
import math
import statistics
import warnings

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from bndoctor.models import tiny_resnet
from bndoctor.monitor import BNMonitor, JsonlSink, ListSink, LoggingSink

C = 3


def _bn(mean=0.0, var=1.0):
    layer = nn.BatchNorm2d(C).double()
    layer.running_mean.fill_(mean)
    layer.running_var.fill_(var)
    return layer


def _sample(monitor, name="0"):
    return [r for r in monitor.records if r["kind"] == "sample"][-1]["layers"][name]


def test_recorded_statistics_match_float64_oracles():
    model = nn.Sequential(_bn(mean=0.5, var=2.0))
    monitor = BNMonitor(model, every=1, keep=True, window=3)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, C, 5, 5, generator=gen, dtype=torch.float64) * 1.5 + 0.2 for _ in range(3)]
    spreads, designs = [], []
    previous = None
    for x in xs:
        rm, rv = model[0].running_mean.clone(), model[0].running_var.clone()
        model(x)
        got = _sample(monitor)
        scale = rv + model[0].eps
        image_means = x.mean((2, 3))  # (images, C)
        shift = ((x.mean((0, 2, 3)) - rm) ** 2 / scale).mean()
        spread = ((image_means - rm) ** 2 / scale).mean()
        spreads.append(float(spread))
        within = (((image_means - image_means.mean(0)) ** 2).sum(0) / (len(x) - 1) / scale).mean()
        var_ratio = (x.var((0, 2, 3), unbiased=False) / scale).mean()
        assert got["n"] == 100 and not got["nonfinite"] and got["collapsed"] == 0.0
        assert got["shift"] == pytest.approx(float(shift), rel=1e-9)
        assert got["image_spread"] == pytest.approx(float(spread), rel=1e-9)
        assert got["within"] == pytest.approx(float(within), rel=1e-9)
        designs.append(float(shift) * len(x) / float(within))  # the design effect of a batch of 4 samples
        rho = min(max(statistics.median(designs) - 1, 0) / 3, 1)
        assert got["images"] == 4 and got["batch"] == 4 and got["norm"] == "batch"
        assert got["n_eff"] == pytest.approx(4 / (1 + 3 * rho), rel=1e-9)
        assert got["var_ratio"] == pytest.approx(float(var_ratio), rel=1e-9)
        if previous is not None:
            new_rm, new_rv = previous
            drift = (((rm - new_rm) ** 2) / (rv + model[0].eps)).mean().sqrt()
            assert got["drift_mean"] == pytest.approx(float(drift), rel=1e-9)
            expected_var = ((rv + model[0].eps) / (new_rv + model[0].eps)).log().abs().mean()
            assert got["drift_var"] == pytest.approx(float(expected_var), rel=1e-9)
        else:
            assert got["drift_mean"] is None
        previous = (rm, rv)
    monitor.close()


def test_effective_batch_tells_independent_from_alike_samples():
    torch.manual_seed(0)
    population = torch.randn(4096, C, 4, 4, dtype=torch.float64) + torch.randn(4096, C, 1, 1, dtype=torch.float64) * 2
    layer = _bn()
    layer.running_mean.copy_(population.mean((0, 2, 3)))
    layer.running_var.copy_(population.var((0, 2, 3)))
    layer.momentum = 0.0  # keep the population statistics as the reference
    model = nn.Sequential(layer)

    def median_n_eff(batches):
        with BNMonitor(model, every=1, keep=True, window=50, warmup=0) as monitor:
            for batch in batches:
                model(batch)
        values = [r["layers"]["0"]["n_eff"] for r in monitor.records if r["kind"] == "sample"]
        return sorted(values)[len(values) // 2]

    iid = median_n_eff([population[i * 32 : (i + 1) * 32] for i in range(50)])
    alike = median_n_eff([population[i : i + 1].repeat(32, 1, 1, 1) for i in range(50)])  # 32 copies of one
    assert 16 < iid <= 32 and alike < 2, (iid, alike)  # never above the 32 samples of the batch


def test_samples_one_training_forward_in_every_with_one_hook_per_layer():
    model = tiny_resnet()
    monitor = BNMonitor(model, every=3, keep=True)
    x = torch.randn(4, 1, 8, 8)
    for _ in range(7):
        model(x)
        hooked = [m for m in model.modules() if m is not model and m._forward_pre_hooks]
        assert hooked == [r.module for r in monitor.layers.values()]
        assert all(len(m._forward_pre_hooks) == 1 and not m._forward_hooks for m in hooked)
    model.eval()
    model(x)  # eval forwards are not counted
    samples = [r for r in monitor.records if r["kind"] == "sample"]
    assert [r["forward"] for r in samples] == [1, 4, 7] and monitor.forwards == 7
    assert len(samples[0]["layers"]) == 9
    monitor.set_step(42)
    model.train()
    for _ in range(3):
        model(x)
    assert [r for r in monitor.records if r["kind"] == "sample"][-1]["step"] == 42
    monitor.close()
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_monitoring_changes_nothing_in_training():
    def train(monitored):
        torch.manual_seed(0)
        model = tiny_resnet()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = BNMonitor(model, every=2) if monitored else None
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            x, y = torch.randn(4, 1, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        if monitor:
            monitor.close()
        return model.state_dict()

    plain, watched = train(False), train(True)
    assert all(torch.equal(plain[k], watched[k]) for k in plain)


def test_a_failing_forward_leaves_no_hook_behind():
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(C)
            self.fail = True

        def forward(self, x):
            y = self.bn(x)
            if self.fail:
                raise RuntimeError("user error")
            return y

    model = Breaks()
    monitor = BNMonitor(model, every=1, keep=True)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, C, 2, 2))
    model.fail = False
    model(torch.randn(2, C, 2, 2))
    assert len([r for r in monitor.records if r["kind"] == "sample"]) == 1  # the failed one is dropped
    assert monitor.forwards == 2 and monitor.samples == 1
    monitor.close()
    assert not model.bn._forward_pre_hooks and not model._forward_pre_hooks


def test_alerts_are_findings_raised_once_and_logged(caplog):
    layer = _bn()
    layer.momentum = 0.0
    model = nn.Sequential(layer)
    monitor = BNMonitor(model, every=1, window=3, warmup=2, keep=True)
    x = torch.full((4, C, 2, 2), 3.0, dtype=torch.float64) + torch.randn(4, C, 2, 2, dtype=torch.float64) * 0.01
    with caplog.at_level(logging.WARNING, logger="bndoctor.monitor"):
        for _ in range(8):
            model(x)  # all samples alike and far from the running mean
    assert [(f.code, f.severity, f.module) for f in monitor.alerts] == [("BN101", "error", None)]  # the model's
    assert monitor.alerts[0].evidence["alike"] > 0.9 and monitor.alerts[0].evidence["effective_batch"] < 1.5
    assert "BN101" in caplog.text and caplog.text.count("BN101") == 1
    assert [r["finding"]["code"] for r in monitor.records if r["kind"] == "alert"] == ["BN101"]


def test_nan_and_variance_collapse_alerts():
    layer = _bn()
    monitor = BNMonitor(nn.Sequential(layer), every=1, keep=True)
    x = torch.randn(4, C, 2, 2, dtype=torch.float64)
    x[0, 0, 0, 0] = math.nan
    monitor.close()
    model = nn.Sequential(_bn())
    monitor = BNMonitor(model, every=1)
    model(x)
    assert [f.code for f in monitor.alerts] == ["BN501"]
    model = nn.Sequential(_bn(var=1e-9))
    monitor = BNMonitor(model, every=1)
    model(torch.randn(4, C, 2, 2, dtype=torch.float64))
    assert [f.code for f in monitor.alerts] == ["BN502"]
    healthy = nn.Sequential(_bn())
    monitor = BNMonitor(healthy, every=1)
    for _ in range(3):
        healthy(torch.randn(64, C, 2, 2, dtype=torch.float64))
    assert monitor.alerts == []


def test_an_alert_carries_the_fix_that_explain_shows_from_the_same_table(capsys):
    """The monitor's rules and `bndoctor explain` read one table: a changed fix shows in both."""
    from bndoctor.cli import main
    from bndoctor.monitor.alerts import ALERTS

    raised = []
    for var in (1e-9, 1.0):
        model = nn.Sequential(_bn(var=var))
        monitor = BNMonitor(model, every=1)
        x = torch.randn(4, C, 2, 2, dtype=torch.float64)
        if var == 1.0:
            x[0, 0, 0, 0] = math.nan
        model(x)
        raised += monitor.alerts
    assert [f.code for f in raised] == ["BN502", "BN501"]
    for finding in raised:
        alert = ALERTS[finding.code]
        assert finding.fix == alert.fix and finding.severity == alert.severity
        assert main(["explain", finding.code, "--format", "json"]) == 0
        assert alert.fix in json.loads(capsys.readouterr().out)["text"]
    assert set(ALERTS) == {"BN101", "BN501", "BN502", "BN503", "BN504"}


def test_state_dict_resumes_without_repeating_alerts():
    model = nn.Sequential(_bn(var=1e-9))
    first = BNMonitor(model, every=1)
    model(torch.randn(4, C, 2, 2, dtype=torch.float64))
    state = json.loads(json.dumps(first.state_dict()))  # checkpoint-safe
    first.close()
    second = BNMonitor(model, every=1)
    second.load_state_dict(state)
    model(torch.randn(4, C, 2, 2, dtype=torch.float64))
    assert second.alerts == [] and second.forwards == 2


def test_sinks(tmp_path, caplog):
    path = tmp_path / "run" / "bn.jsonl"
    memory = ListSink()
    model = nn.Sequential(_bn())
    x = torch.randn(4, C, 2, 2, dtype=torch.float64)
    x[0, 0, 0, 0] = math.inf
    with (
        BNMonitor(model, every=1, sink=[path, memory, LoggingSink()]) as monitor,
        caplog.at_level(logging.INFO, logger="bndoctor.monitor"),
    ):
        model(x)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["start", "sample", "alert"] == [r["kind"] for r in memory.records]
    assert lines[1]["layers"]["0"]["n_eff"] == "nan"  # valid JSON, no bare NaN
    assert "smallest effective BN batch" in caplog.text
    assert monitor._closed


def test_tensorboard_sink(tmp_path):
    pytest.importorskip("tensorboard")
    from bndoctor.monitor import TensorBoardSink

    model = tiny_resnet()
    with BNMonitor(model, every=1, sink=TensorBoardSink(tmp_path)):
        model(torch.randn(4, 1, 8, 8))
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_bad_input_is_refused_with_a_hint():
    with pytest.raises(bd.BNDoctorError, match="no BN layer"):
        BNMonitor(nn.Sequential(nn.Conv2d(1, 2, 1), nn.GroupNorm(1, 2)))
    with pytest.raises(bd.BNDoctorError, match="every"):
        BNMonitor(tiny_resnet(), every=0)
    with pytest.raises(bd.BNDoctorError, match="sink"):
        BNMonitor(tiny_resnet(), sink=42)
    with pytest.raises(bd.errors.NotAModuleError):
        BNMonitor([])
    with pytest.raises(bd.errors.ModuleSelectionError):
        BNMonitor(tiny_resnet(), modules="nope")


def test_jsonl_sink_appends(tmp_path):
    sink = JsonlSink(tmp_path / "a.jsonl")
    sink.write({"kind": "x", "v": float("inf")})
    sink.close()
    sink = JsonlSink(tmp_path / "a.jsonl")
    sink.write({"kind": "y"})
    sink.close()
    assert [json.loads(line)["kind"] for line in (tmp_path / "a.jsonl").read_text().splitlines()] == ["x", "y"]


def test_accumulation_aware_bn_is_measured_on_its_window():
    torch.manual_seed(0)
    population = torch.randn(512, C, 2, 2, dtype=torch.float64) + torch.randn(512, C, 1, 1, dtype=torch.float64)
    plain, pooled = _bn(), bd.to_accum_bn(_bn())
    for layer in (plain, pooled):
        layer.running_mean.copy_(population.mean((0, 2, 3)))
        layer.running_var.copy_(population.var((0, 2, 3)))
    effective = {}
    for name, layer in (("plain", plain), ("pooled", pooled)):
        model = nn.Sequential(layer)
        monitor = BNMonitor(model, every=1, keep=True, window=8, warmup=0)
        for w in range(8):
            with bd.accumulation_window(model) if name == "pooled" else torch.no_grad():
                for k in range(16):
                    model(population[(w * 16 + k) * 2 : (w * 16 + k) * 2 + 2])
        values = [r["layers"]["0"]["n_eff"] for r in monitor.records if r["kind"] == "sample"]
        effective[name] = sorted(values)[len(values) // 2]
        if name == "pooled":
            windows = [r["layers"]["0"]["window"] for r in monitor.records if r["kind"] == "sample"]
            assert windows[:3] == [8, 16, 24]  # values per channel: 2 samples x 4 positions per micro-batch
        monitor.close()
    assert effective["plain"] < 4 < 8 < effective["pooled"], effective


def test_a_sampled_forward_that_raises_records_nothing_later():
    model = tiny_resnet()

    def explode(module, args):
        raise RuntimeError("data loader gave a bad batch")

    with BNMonitor(model, every=1, keep=True, warmup=0, log=False) as monitor:
        model.train()(torch.randn(2, 1, 8, 8))  # sample 1
        handle = model.layers[1].register_forward_pre_hook(explode)
        with pytest.raises(RuntimeError, match="bad batch"):
            model(torch.randn(2, 1, 8, 8))  # sampled, raises half-way
        handle.remove()
        model.eval()(torch.randn(2, 1, 8, 8))  # an eval forward is never a training sample
    samples = [r for r in monitor.records if r["kind"] == "sample"]
    assert len(samples) == 1
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_a_finding_survives_its_run_file_form():
    """Alerts are read back from JSONL (bndoctor report, bndoctor watch) with Finding.from_dict."""
    import json

    from bndoctor.findings import Action, Finding

    finding = Finding("BN101", "error", "layer1.0.bn1", "few samples", {"effective_batch": 1.5}, "accumulate",
                      Action("to_accum_bn"))  # fmt: skip
    back = Finding.from_dict(json.loads(json.dumps(finding.as_dict())))
    assert back == finding and back.action is None  # action is not compared and not rebuilt
    assert (
        str(Finding.from_dict({"code": "BN503", "severity": "warning", "message": "m"})) == "BN503 warning (model): m"
    )


def test_a_sample_reads_the_device_once_not_per_layer():
    """Every figure of every layer stays a device tensor until one read per sample (on a GPU each read stalls)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith(("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal")):
                self.reads.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = bd.to_accum_bn(tiny_resnet())  # the window count too stays on the device
    monitor = BNMonitor(model, every=1, keep=True, warmup=0)
    x = torch.randn(2, 1, 8, 8)
    with bd.accumulation_window(model):
        model(x)
        recorder = HostReads()
        with recorder:
            model(x)
    monitor.close()
    assert recorder.reads == []
    layer = _sample(monitor, "stem.1")
    assert layer["window"] == 256 and math.isfinite(layer["shift"]) and layer["drift_mean"] is not None


@pytest.mark.parametrize("where", ["input nan", "input +inf and -inf", "input inf", "running_var inf"])
def test_every_non_finite_value_is_flagged(where):
    layer = _bn()
    x = torch.randn(4, C, 2, 2, dtype=torch.float64)
    if where == "input nan":
        x[1, 2, 0, 1] = math.nan
    elif where == "input +inf and -inf":  # their sum is NaN, not inf
        x[0, 1, 0, 0], x[3, 1, 1, 1] = math.inf, -math.inf
    elif where == "input inf":
        x[2, 0, 1, 0] = math.inf
    else:
        layer.running_var[1] = math.inf
    model = nn.Sequential(layer)
    monitor = BNMonitor(model, every=1, keep=True, warmup=0)
    model(x)
    sample = _sample(monitor)
    monitor.close()
    assert sample["nonfinite"] and math.isnan(sample["shift"]) and sample["drift_mean"] is None


class _TwoParts(nn.Module):
    """A model trained by calling its parts, never itself (a LightningModule's training_step does this)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 36, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: m.encoder(x),  # one submodule (self.net(x))
        lambda m, x: m.head(m.encoder(x)),  # several submodules, one after the other
        lambda m, x: m.head(m.encoder[1](m.encoder[0](x)).relu()),  # the layers' parents skipped too
    ],
    ids=["one part", "two parts", "layer by layer"],
)
def test_forwards_that_do_not_go_through_the_root_are_sampled(call):
    torch.manual_seed(0)
    model = _TwoParts()
    x = torch.randn(4, 1, 8, 8)
    with BNMonitor(model, every=2, keep=True, warmup=0, log=False) as monitor:
        for step in range(5):
            monitor.set_step(step)
            call(model, x)
        model.eval()
        call(model, x)  # evaluation is not a training forward
        model.train()
        call(model, x)  # a second call of the same layer starts the next forward; close() ends the last one
    samples = [r for r in monitor.records if r["kind"] == "sample"]
    assert monitor.forwards == 6 and [r["forward"] for r in samples] == [1, 3, 5]
    assert [r["step"] for r in samples] == [0, 2, 4]
    assert set(samples[0]["layers"]) == {"encoder.1", "head.2"} & set(samples[0]["layers"]) != set()
    assert all(math.isfinite(la["shift"]) for r in samples for la in r["layers"].values())


def test_a_model_mixing_root_and_part_calls_counts_each_forward_once():
    model = _TwoParts()
    model.forward = lambda x: model.head(model.encoder(x))
    x = torch.randn(4, 1, 8, 8)
    with BNMonitor(model, every=1, keep=True, warmup=0, log=False) as monitor:
        model(x)  # through the root: one forward however many layers it calls
        model.encoder(x)  # outside: one more
        model(x)  # the root ends the loose forward before its own
    samples = [r for r in monitor.records if r["kind"] == "sample"]
    assert monitor.forwards == 3 and [sorted(r["layers"]) for r in samples] == [
        ["encoder.1", "head.2"],
        ["encoder.1"],
        ["encoder.1", "head.2"],
    ]


def test_a_monitor_on_layers_that_never_train_warns_once():
    model = tiny_resnet()
    monitor = BNMonitor(model, every=1)
    converted = bd.to_accum_bn(model)  # a copy: the monitor still watches the original's layers
    with pytest.warns(bd.BNDoctorWarning, match=r"none of the 9 BN layers .*\(to_accum_bn"):
        for step in range(12):
            monitor.set_step(step)
            with bd.accumulation_window(converted):
                converted(torch.randn(2, 1, 8, 8))
    assert monitor.samples == 0
    with warnings_as_errors():
        monitor.close()  # said once already


def test_a_root_that_trains_without_its_monitored_layers_warns_at_close_and_an_idle_monitor_does_not():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    monitor = BNMonitor(model, every=100, warmup=0)
    model[1] = nn.BatchNorm2d(4)  # replaced after the monitor was made
    for _ in range(3):
        model(torch.randn(2, 1, 8, 8))
    with pytest.warns(bd.BNDoctorWarning, match=r"none of the 1 BN layers it watches \(1\) .* 3 training forwards"):
        monitor.close()
    assert monitor.samples == 0
    model = tiny_resnet()
    with warnings_as_errors():
        BNMonitor(model).close()
        with BNMonitor(model, every=1):
            model.eval()(torch.randn(2, 1, 8, 8))


@contextlib.contextmanager
def warnings_as_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_a_model_compiled_after_the_monitor_was_made_is_sampled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    monitor = BNMonitor(model, every=3, keep=True, warmup=0, log=False)
    compiled = torch.compile(model)
    x = torch.randn(4, 3, 12, 12)
    for _ in range(7):
        compiled(x).sum().backward()
    monitor.close()
    samples = [r for r in monitor.records if r["kind"] == "sample"]
    assert monitor.forwards == 7 and [r["forward"] for r in samples] == [1, 4, 7]
    assert all(sorted(r["layers"]) == ["1", "4"] for r in samples)
    assert samples[-1]["layers"]["1"]["n"] == 4 * 10 * 10 and math.isfinite(samples[-1]["layers"]["4"]["shift"])


def test_the_train_eval_gap_matches_its_definition_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    model[1].running_mean.fill_(0.3)
    frozen = nn.BatchNorm1d(3).eval()  # a layer the user keeps in eval mode while the rest trains
    model.append(frozen)
    x = torch.randn(4, 1, 8, 8)
    with BNMonitor(model, every=1, keep=True, warmup=0, log=False) as monitor:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        trained = model(x)
    after_train = {k: v.clone() for k, v in model.state_dict().items()}
    assert monitor.forwards == 1 and model[1].training and not frozen.training  # modes as they were
    assert int(after_train["1.num_batches_tracked"]) == int(before["1.num_batches_tracked"]) + 1  # one update only
    # the oracle: the trained model (running statistics updated by this forward) in eval mode, float64
    reference = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        evaluated = reference(x.double())
    a, b = trained.detach().double(), evaluated
    expected = float(((a - b) ** 2).sum() / (a**2).sum())
    sample = next(r for r in monitor.records if r["kind"] == "sample")
    assert sample["mode_gap"] == pytest.approx(expected, rel=1e-5)  # float32 model against its float64 copy


def test_the_gap_is_taken_with_keyword_inputs_and_skipped_for_outputs_it_cannot_compare():
    from bndoctor.monitor._probe import output_tensor

    class KeywordModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))

        def forward(self, *, pixel_values, labels=None):
            logits = self.net(pixel_values)
            return {"loss": logits.pow(2).mean(), "logits": logits}

    model = KeywordModel()
    with BNMonitor(model, every=1, keep=True, warmup=0, log=False) as monitor:
        model(pixel_values=torch.randn(8, 5))
    gap = next(r for r in monitor.records if r["kind"] == "sample")["mode_gap"]
    assert math.isfinite(gap) and gap > 0
    assert output_tensor({"loss": torch.ones(()), "logits": torch.ones(8, 2)}).shape == (8, 2)
    assert output_tensor([torch.ones(3, dtype=torch.long)]) is None
    with BNMonitor(model, every=1, keep=True, warmup=0, log=False, probe=False) as monitor:
        model(pixel_values=torch.randn(8, 5))
    assert math.isnan(next(r for r in monitor.records if r["kind"] == "sample")["mode_gap"])


def test_alerts_of_one_code_on_many_layers_are_one_line():
    from bndoctor.findings import Finding
    from bndoctor.monitor import group_alerts

    findings = [Finding("BN502", "warning", f"layer{i}.bn", f"{i}0% of the channels: dead", {}) for i in range(5)]
    findings.append(Finding("BN101", "error", None, "the samples of each micro-batch share about 90%", {}))
    lines = group_alerts(findings)
    assert (
        lines[0]
        == "BN502 warning on 5 layers: layer0.bn, layer1.bn, layer2.bn, ... (+2): 00% of the channels (at layer0.bn)"
    )
    assert lines[1].startswith("BN101 error (model): the samples") and len(lines) == 2


def test_a_model_the_probe_cannot_run_in_eval_mode_trains_on_and_is_not_probed_again():
    class TrainOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            if not self.training:
                raise RuntimeError("this model only runs in training mode")
            return self.bn(x)

    model = TrainOnly()
    with BNMonitor(model, every=1, keep=True, warmup=0, log=False) as monitor:
        for _ in range(3):
            model(torch.randn(4, 3))
    samples = [r for r in monitor.records if r["kind"] == "sample"]
    assert len(samples) == 3 and all(math.isnan(r["mode_gap"]) for r in samples)
    assert not monitor.probe and model.training and model.bn.training

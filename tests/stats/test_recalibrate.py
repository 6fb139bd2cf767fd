import collections
import copy

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from bndoctor.models import tiny_resnet
from tests._fakes import ThirdPartyFrozenBN2d, randomize_bn


class Capture:
    """Records every BN input during a pass: the oracle's raw material."""

    def __init__(self, model):
        self.inputs = collections.defaultdict(list)
        self.handles = [
            r.module.register_forward_hook(self._hook(r.name)) for r in bd.find_bn(model) if r.kind != "bn-like"
        ]

    def _hook(self, name):
        def hook(module, args, output):
            self.inputs[name].append(args[0].detach().double().clone())

        return hook

    def oracle(self, name):
        per_channel = [t.transpose(0, 1).reshape(t.shape[1], -1) for t in self.inputs[name]]
        values = torch.cat(per_channel, dim=1)
        return values.mean(1), values.var(1)  # unbiased, like torch's running_var

    def close(self):
        for h in self.handles:
            h.remove()


def _assert_matches_oracle(model, capture, names=None):
    for record in bd.find_bn(model):
        if names is not None and record.name not in names:
            continue
        mean, var = capture.oracle(record.name)
        torch.testing.assert_close(record.module.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(record.module.running_var.double(), var, rtol=1e-6, atol=0)


class Mixed(nn.Module):
    """BN 1d (on 3-D input), 2d, 3d and 1d (on 2-D input) in one network."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 4, 3)
        self.bn1 = nn.BatchNorm1d(4)
        self.conv2 = nn.Conv2d(4, 5, 1)
        self.bn2 = nn.BatchNorm2d(5)
        self.conv3 = nn.Conv3d(5, 6, 1)
        self.bn3 = nn.BatchNorm3d(6)
        self.fc = nn.Linear(6, 7)
        self.bn4 = nn.BatchNorm1d(7)

    def forward(self, x):  # x: (N, 3, 10)
        h = torch.relu(self.bn1(self.conv1(x)))  # (N, 4, 8)
        h = torch.relu(self.bn2(self.conv2(h.view(h.shape[0], 4, 2, 4))))
        h = torch.relu(self.bn3(self.conv3(h.unsqueeze(2))))
        return self.bn4(self.fc(h.mean(dim=(2, 3, 4))))


def _correlated_batches(sizes, shift=4.0):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, 3, 10, generator=gen) + shift * (i % 3) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("correlated", [False, True])
def test_matches_float64_oracle_with_uneven_batches_1d_2d_3d(exact, correlated):
    torch.manual_seed(0)
    model = randomize_bn(Mixed())
    batches = _correlated_batches([2, 7, 16, 3, 9], shift=4.0 if correlated else 0.0)
    capture = Capture(model)
    report = bd.recalibrate(model, batches, exact=exact, progress=False)
    capture.close()
    _assert_matches_oracle(model, capture)
    assert report.samples == 37 and report.batches == 5 and not report.unreached
    assert all(layer.batches == 5 for layer in report.layers)
    assert report.layers[0].count == 37 * 8  # batch x positions


def test_resnet_oracle_and_num_batches_tracked_kept():
    """The pass hides num_batches_tracked from torch's BN (nothing to count); the same tensor comes back, unchanged."""
    model = tiny_resnet()
    model.stem[1].num_batches_tracked.fill_(7)
    tracked = [m.num_batches_tracked for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    capture = Capture(model)
    bd.recalibrate(model, [torch.randn(n, 1, 8, 8) * 2 + 1 for n in (64, 5, 30)], progress=False)
    capture.close()
    _assert_matches_oracle(model, capture)
    assert int(model.stem[1].num_batches_tracked) == 7
    after = [m.num_batches_tracked for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(a is b for a, b in zip(after, tracked)) and len(after) == len(tracked)


def test_modes_momentum_hooks_restored_and_dropout_stays_off():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.9), nn.BatchNorm1d(8, momentum=None))
    model.train()
    model[0].eval()
    seen_dropout_modes = []
    model[1].register_forward_hook(lambda m, a, o: seen_dropout_modes.append(m.training))
    hooks_before = (dict(model[2]._forward_hooks), dict(model[2]._forward_pre_hooks))
    capture = Capture(model)
    bd.recalibrate(model, [torch.randn(16, 4) for _ in range(3)], progress=False)
    capture.close()
    assert seen_dropout_modes == [False, False, False]
    assert model[2].momentum is None and model[2].training and model.training and not model[0].training
    assert (dict(model[2]._forward_hooks), dict(model[2]._forward_pre_hooks)) == hooks_before
    _assert_matches_oracle(model, capture)  # deterministic network: dropout was off


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_forward_that_raises_leaves_model_exactly_as_before(exc_type):
    model = randomize_bn(tiny_resnet())
    model.layers[1].eval()
    frozen_model = bd.freeze_bn(model, modules="layers.2")
    before_state = copy.deepcopy(frozen_model.state_dict())
    before_modes = [(n, m.training) for n, m in frozen_model.named_modules()]
    before_momentum = [getattr(m, "momentum", None) for m in frozen_model.modules()]
    before_hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in frozen_model.modules()]
    calls = []

    def flaky_forward(model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise exc_type("data loader broke")
        return model(batch)

    with pytest.raises(exc_type, match="data loader broke"):
        bd.recalibrate(frozen_model, [torch.randn(8, 1, 8, 8)] * 5, forward=flaky_forward, modules="*", progress=False)
    after = frozen_model.state_dict()
    assert all(torch.equal(before_state[k], after[k]) for k in before_state)
    assert [(n, m.training) for n, m in frozen_model.named_modules()] == before_modes
    assert [getattr(m, "momentum", None) for m in frozen_model.modules()] == before_momentum
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in frozen_model.modules()] == before_hooks


def test_frozen_layers_untouched_unless_selected():
    model = randomize_bn(tiny_resnet())
    model = bd.freeze_bn(model, modules="stem")
    before = model.stem[1].running_mean.clone()
    report = bd.recalibrate(model, [torch.randn(16, 1, 8, 8)], progress=False)
    assert torch.equal(model.stem[1].running_mean, before) and "stem.1 (frozen)" in report.skipped
    bd.recalibrate(model, [torch.randn(16, 1, 8, 8)], modules="stem", progress=False)
    assert not torch.equal(model.stem[1].running_mean, before)
    assert isinstance(model.stem[1], bd.layers.FrozenBatchNorm2d) and not model.stem[1].training


def test_third_party_frozen_layer_recalibrated_from_its_input_when_selected():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), ThirdPartyFrozenBN2d(3))
    capture = Capture(model)
    bd.recalibrate(model, [torch.randn(4, 2, 3, 3) + 2], modules="1", progress=False)
    capture.close()
    _assert_matches_oracle(model, capture)


def test_unreached_layers_keep_statistics_and_are_reported():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.BatchNorm1d(3)
            self.b = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.a(x)

    model = randomize_bn(TwoHeads())
    before = model.b.running_var.clone()
    report = bd.recalibrate(model, [torch.randn(5, 3)], progress=False)
    assert report.unreached == ["b"] and torch.equal(model.b.running_var, before)
    assert "not reached by the forward" in str(report)


def test_batch_formats_and_custom_forward():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    x = torch.randn(12, 3)
    reference = copy.deepcopy(model)
    bd.recalibrate(reference, [x], progress=False)
    Pair = collections.namedtuple("Pair", "x y")
    for data, forward in (
        ([(x, torch.zeros(12))], None),
        ([[x]], None),
        ([Pair(x, 0)], lambda m, b: m(b.x)),
        ([{"input": x}], lambda m, b: m(b["input"])),
    ):
        copy_ = copy.deepcopy(model)
        report = bd.recalibrate(copy_, data, forward=forward, progress=False)
        assert report.samples == 12
        torch.testing.assert_close(copy_[1].running_var, reference[1].running_var)

    class KwModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = copy.deepcopy(model)

        def forward(self, pixel_values):
            return self.net(pixel_values)

    kw = KwModel()
    bd.recalibrate(kw, [{"pixel_values": x}], progress=False)
    torch.testing.assert_close(kw.net[1].running_var, reference[1].running_var)
    with pytest.raises(bd.BNDoctorError, match="cannot feed a batch of type int"):
        bd.recalibrate(copy.deepcopy(model), [3], progress=False)


def test_budget_whole_batches_and_warning_when_data_run_out():
    model = nn.Sequential(nn.BatchNorm1d(2))
    report = bd.recalibrate(model, [torch.randn(10, 2)] * 5, num_samples=25, progress=False)
    assert report.samples == 30 and report.batches == 3
    with pytest.warns(bd.BNDoctorWarning, match="ran out after 20 samples"):
        bd.recalibrate(model, [torch.randn(10, 2)] * 2, num_samples=100, progress=False)


def test_bad_input_errors():
    model = nn.Sequential(nn.BatchNorm1d(2))
    with pytest.raises(bd.BNDoctorError, match="got no batches"):
        bd.recalibrate(model, [], progress=False)
    with pytest.raises(bd.BNDoctorError, match="iterable of batches"):
        bd.recalibrate(model, torch.randn(4, 2), progress=False)
    with pytest.raises(bd.BNDoctorError, match="num_samples"):
        bd.recalibrate(model, [torch.randn(4, 2)], num_samples=0, progress=False)
    with pytest.raises(bd.errors.NotAModuleError):
        bd.recalibrate({"a": 1}, [torch.randn(4, 2)])
    with pytest.raises(bd.errors.MissingRunningStatsError, match="recalibrate needs running statistics"):
        bd.recalibrate(
            nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)),
            [torch.randn(4, 2)],
            modules="0",
            progress=False,
        )


def test_track_running_stats_false_skipped_by_default_and_callable_progress():
    model = nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False), nn.BatchNorm1d(2))
    seen = []
    report = bd.recalibrate(model, [torch.randn(4, 2)] * 2, progress=lambda done, total: seen.append(done))
    assert report.skipped == ["0 (track_running_stats=False)"] and seen == [4, 8]
    assert [la.name for la in report.layers] == ["1"]


def test_report_json_and_text():
    model = nn.Sequential(nn.BatchNorm1d(2))
    report = bd.recalibrate(model, [torch.randn(6, 2) + 3], progress=False)
    data = report.to_json()
    assert data["global_samples"] == 6 and data["layers"][0]["count"] == 6
    assert data["layers"][0]["mean_change"] > 0
    assert "recalibrated 1 BN layer(s) on 6 samples" in str(report)


def test_half_precision_buffers_use_the_exact_path():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    model[1].half()
    capture = Capture(model)
    x = torch.randn(32, 3, dtype=torch.float64)

    def forward(m, batch):
        return m[1](m[0](batch).half())

    bd.recalibrate(model, [x], forward=forward, progress=False)
    capture.close()
    mean, var = capture.oracle("1")
    torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(model[1].running_var.double(), var, rtol=2e-3, atol=1e-3)


def test_swa_update_bn_underestimates_where_bndoctor_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    batches = [torch.randn(8, 3) + 5 * (i % 4) for i in range(8)]  # class-correlated batches
    swa = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, swa)
    capture = Capture(model)
    bd.recalibrate(model, batches, progress=False)
    capture.close()
    _, var = capture.oracle("1")
    swa_error = ((swa[1].running_var.double() - var) / var).abs().max().item()
    ours_error = ((model[1].running_var.double() - var) / var).abs().max().item()
    assert swa_error > 0.5 and ours_error < 1e-6


class SharedTwice(nn.Module):
    """One BN applied at two depths in each forward, and one reached only for some batches."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.sometimes = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.bn(self.conv(x))
        h = self.bn(torch.tanh(h) * 3 + 1)
        if x.shape[0] % 2:  # odd batches only
            h = self.sometimes(h)
        return h


@pytest.mark.parametrize("exact", [False, True])
def test_layer_called_twice_per_forward_and_layer_reached_by_some_batches(exact):
    model = SharedTwice()
    capture = Capture(model)
    batches = [torch.randn(n, 2, 3, 3) + n for n in (4, 5, 6, 7)]
    report = bd.recalibrate(model, batches, exact=exact, progress=False)
    capture.close()
    _assert_matches_oracle(model, capture)
    calls = {layer.name: layer.batches for layer in report.layers}
    assert calls == {"bn": 8, "sometimes": 2}
    assert "forward" not in model.bn.__dict__ and "forward" not in model.sometimes.__dict__


@pytest.mark.parametrize("exact", [False, True])
def test_a_nan_batch_is_refused_by_default_and_skipped_on_request(exact):
    torch.manual_seed(0)
    model = tiny_resnet()
    batches = [torch.randn(8, 1, 8, 8) for _ in range(4)]
    poisoned = [b.clone() for b in batches]
    poisoned[2][3, 0, 1, 1] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(bd.BNDoctorError, match=r"batch 2 gives NaN or Inf statistics at 'stem\.1'") as info:
        bd.recalibrate(model, poisoned, progress=False, exact=exact)
    assert "nonfinite='skip'" in info.value.hint
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing written
    with pytest.warns(bd.BNDoctorWarning, match="skipped 1 batch"):
        bd.recalibrate(model, poisoned, progress=False, exact=exact, nonfinite="skip")
    reference = tiny_resnet()
    reference.load_state_dict(before)
    bd.recalibrate(reference, [b for i, b in enumerate(batches) if i != 2], progress=False, exact=exact)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.testing.assert_close(module.running_var, reference.get_submodule(name).running_var)
    with pytest.raises(bd.BNDoctorError, match="nonfinite='raise' or 'skip'"):
        bd.recalibrate(model, batches, nonfinite="ignore")


def test_progress_is_a_tqdm_bar_with_the_real_total_or_a_callable(capsys):
    model = tiny_resnet()
    batches = [torch.randn(4, 1, 8, 8) for _ in range(3)]
    bd.recalibrate(model, batches)  # a bar on stderr (tqdm.auto), counting batches against len(data)
    err = capsys.readouterr().err
    assert "recalibrating" in err and "3/3" in err and "batch" in err
    seen = []
    bd.recalibrate(model, iter(batches), num_samples=8, progress=lambda done, limit: seen.append((done, limit)))
    assert seen == [(4, 8), (8, 8)]
    bd.recalibrate(model, batches, progress=False)
    assert capsys.readouterr().err == ""

"""Every built-in check: a model that triggers it and one that does not; realistic architectures."""

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from bndoctor.models import resnet18, tiny_resnet
from tests._fakes import BatchNormAct2d, MMStyleSyncBN, ThirdPartyFrozenBN2d

S = bd.TrainingSetup


def codes(model, setup=None, **kwargs):
    return bd.check(model, setup, **kwargs).codes()


def conv_bn(bias=False, bn=None):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=bias), bn or nn.BatchNorm2d(8), nn.ReLU())


# --------------------------------------------------------------------------- realistic architectures


class MobileNetLike(nn.Module):
    """Inverted residual blocks with depthwise convolutions (MobileNetV2-style), BN1d in the head."""

    def __init__(self, bn=nn.BatchNorm2d):
        super().__init__()

        def block(cin, cout, stride):
            hidden = cin * 4
            return nn.Sequential(
                nn.Conv2d(cin, hidden, 1, bias=False),
                bn(hidden),
                nn.ReLU6(),
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                bn(hidden),
                nn.ReLU6(),
                nn.Conv2d(hidden, cout, 1, bias=False),
                bn(cout),
            )

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), bn(16), nn.ReLU6())
        self.blocks = nn.Sequential(block(16, 24, 2), block(24, 32, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.BatchNorm1d(64))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class ConvNeXtLike(nn.Module):
    """Depthwise 7x7 conv, LayerNorm over channels (channels last), MLP: no BatchNorm anywhere."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 4, 4)
        self.dw = nn.Conv2d(32, 32, 7, padding=3, groups=32)
        self.norm = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        x = x + self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


def test_resnet_at_micro_batch_2_gets_the_error_and_the_ranked_remedies():
    report = bd.check(resnet18(), S(micro_batch=2, accum_steps=32), input_shape=(3, 64, 64))
    assert report.codes() == ["BN101", "BN103"]
    (finding,) = report.by_code("BN101")
    assert finding.severity == "error" and finding.evidence["normalisation_batch"] == 2
    assert len(finding.evidence["layers"]) == 20 and finding.evidence["logical_batch"] == 64
    assert finding.evidence["values_per_channel"]["stem.1"] == 2 * 32 * 32  # micro-batch x spatial positions
    assert finding.evidence["values_per_channel"]["layers.3.1.bn2"] == 2 * 4 * 4
    assert "(32-2048 values per channel)" in finding.message
    assert finding.fix.index("to_accum_bn") < finding.fix.index("convert_bn")  # accumulation first
    assert finding.action.name == "to_accum_bn"
    assert not report.ok and report.traced and report.layer_shapes["stem.1"] == (2, 64, 32, 32)


def test_resnet_at_a_healthy_batch_has_no_findings():
    assert codes(resnet18(), S(micro_batch=32), input_shape=(3, 32, 32)) == []


def test_mobilenet_like_depthwise_model():
    model = MobileNetLike()
    report = bd.check(model, S(micro_batch=4, world_size=8), input_shape=(3, 32, 32))
    assert report.codes() == ["BN101", "BN104", "BN201"]
    assert report.by_code("BN101")[0].action.name == "to_sync_bn"
    assert [f.module for f in report.by_code("BN201")] == ["head.2"]  # the Linear's bias before BatchNorm1d
    assert report.layer_shapes["head.3"] == (4, 64)  # the BN1d head sees 4 values per channel
    assert codes(model, S(micro_batch=32), input_shape=(3, 32, 32)) == ["BN201"]


def test_timm_style_bn_act_subclass_counts_as_batchnorm():
    model = MobileNetLike(bn=BatchNormAct2d)
    report = bd.check(model, S(micro_batch=2), input_shape=(3, 32, 32))
    (finding,) = report.by_code("BN101")
    assert "stem.1" in finding.evidence["layers"]  # a BatchNormAct2d
    assert finding.action.name == "convert_bn"  # one process, no accumulation: GroupNorm


def test_frozen_bn_classes_are_recognised_as_frozen():
    torchvision_style = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), ThirdPartyFrozenBN2d(8), nn.ReLU())
    assert codes(torchvision_style, S(micro_batch=1, accum_steps=256, finetune=True)) == ["BN106"]
    assert codes(torchvision_style, S(micro_batch=1, accum_steps=64, finetune=True)) == []
    frozen = bd.freeze_bn(resnet18())
    report = bd.check(frozen, S(micro_batch=2, finetune=True), input_shape=(3, 32, 32))
    assert report.codes() == ["BN106"]  # only the logical-batch note: frozen BN is fine at any batch


def test_convnext_like_layernorm_model_raises_no_false_alarm():
    for setup in (None, S(micro_batch=1), S(micro_batch=2, accum_steps=64, world_size=8, finetune=False)):
        assert codes(ConvNeXtLike(), setup, input_shape=(3, 32, 32)) == []


# --------------------------------------------------------------------------- one test per check


def test_bn101_thresholds():
    model = conv_bn()
    assert bd.check(model, S(micro_batch=4)).by_code("BN101")[0].severity == "error"
    assert bd.check(model, S(micro_batch=8)).by_code("BN101")[0].severity == "warning"
    assert "BN101" not in codes(model, S(micro_batch=16))
    assert "BN101" not in codes(model)  # no setup: no batch-size checks
    assert "BN101" not in codes(model, S(micro_batch=4, world_size=4, sync_bn=True))  # 16 samples synced


def test_bn101_counts_the_window_of_accumulation_aware_bn():
    model = bd.to_accum_bn(conv_bn())
    assert codes(model, S(micro_batch=2, accum_steps=32)) == []
    assert "BN101" in codes(conv_bn(), S(micro_batch=2, accum_steps=32))


def test_bn102_one_value_per_channel():
    head = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5))
    report = bd.check(head, S(micro_batch=1), input_shape=(3, 2, 2))
    (finding,) = report.by_code("BN102")
    assert finding.module == "2" and finding.evidence["values_per_channel"] == 1
    assert "BN102" not in codes(head, S(micro_batch=2), input_shape=(3, 2, 2))
    assert "BN102" not in codes(conv_bn(), S(micro_batch=1), input_shape=(3, 4, 4))  # 16 positions


def test_bn103_accumulation_with_learning_bn():
    assert "BN103" in codes(conv_bn(), S(micro_batch=16, accum_steps=4))
    assert "BN103" not in codes(conv_bn(), S(micro_batch=16))
    assert "BN103" not in codes(bd.freeze_bn(conv_bn()), S(micro_batch=16, accum_steps=4))


def test_bn104_ddp_without_sync():
    assert "BN104" in codes(conv_bn(), S(micro_batch=4, world_size=4))
    assert "BN104" not in codes(conv_bn(), S(micro_batch=4, world_size=4, sync_bn=True))
    assert "BN104" not in codes(bd.to_sync_bn(conv_bn()), S(micro_batch=4, world_size=4))
    assert "BN104" not in codes(conv_bn(), S(micro_batch=4))


def test_bn105_finetuning_with_bn_training():
    finding = bd.check(conv_bn(), S(micro_batch=4, finetune=True)).by_code("BN105")[0]
    assert finding.severity == "warning" and finding.action.name == "freeze_bn" and "recalibrate" in finding.fix
    assert bd.check(conv_bn(), S(micro_batch=64, finetune=True)).by_code("BN105")[0].severity == "info"
    assert "BN105" not in codes(conv_bn(), S(micro_batch=4))
    assert "BN105" not in codes(bd.freeze_bn(conv_bn()), S(micro_batch=4, finetune=True))


def test_bn106_finetuning_logical_batch_range():
    frozen = bd.freeze_bn(conv_bn())
    assert "BN106" in codes(frozen, S(micro_batch=4, finetune=True))
    assert "BN106" in codes(frozen, S(micro_batch=64, accum_steps=4, finetune=True))
    assert "BN106" not in codes(frozen, S(micro_batch=8, accum_steps=8, finetune=True))
    assert "BN106" not in codes(frozen, S(micro_batch=4))


def test_bn201_bias_before_bn_found_by_fx_by_trace_and_in_sequentials():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = conv_bn(bias=True)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.body(x)
            return self.body(-x)

    for model in (conv_bn(bias=True), Untraceable()):
        (finding,) = bd.check(model).by_code("BN201")
        assert finding.severity == "info" and finding.module.endswith("0") and finding.action.name == "drop_bias"
    assert bd.check(conv_bn(bias=True), input_shape=(3, 8, 8)).by_code("BN201")
    assert "BN201" not in codes(conv_bn(bias=False), input_shape=(3, 8, 8))
    # a conv whose output also feeds something else is still redundant before BN, but is not a direct pair here
    assert "BN201" not in codes(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.BatchNorm2d(8)))


@pytest.mark.parametrize(
    ("producer", "bn", "shape"),
    [
        (nn.ConvTranspose2d(3, 8, 2), nn.BatchNorm2d(8), (3, 4, 4)),
        (nn.Conv1d(3, 8, 1), nn.BatchNorm1d(8), (3, 5)),
        (nn.Linear(3, 8), nn.BatchNorm1d(8), (3,)),
    ],
)
def test_bn201_traced_and_untraced_agree_on_every_producer(producer, bn, shape):
    # one definition of producer -> BN pairs (bndoctor._pairs) serves fold, the fx path and the meta trace
    model = nn.Sequential(producer, bn)
    untraced = bd.check(model).by_code("BN201")
    traced = bd.check(model, input_shape=shape).by_code("BN201")
    assert [f.module for f in untraced] == [f.module for f in traced] == ["0"]


def test_bn202_no_running_stats():
    assert "BN202" in codes(conv_bn(bn=nn.BatchNorm2d(8, track_running_stats=False)))
    assert "BN202" not in codes(conv_bn())


def test_bn203_eval_bn_in_a_training_model_intentional_or_accidental():
    model = resnet18().train()
    model.layers[0][0].bn1.eval()
    finding = bd.check(model).by_code("BN203")[0]
    assert not finding.evidence["intentional"] and "accidental" in finding.message and finding.action is None
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    finding = bd.check(model).by_code("BN203")[0]
    assert finding.evidence["intentional"] and "undoes" in finding.message and finding.action.name == "freeze_bn"
    assert "BN203" not in codes(resnet18().train())
    assert "BN203" not in codes(resnet18().eval())  # an evaluated model: nothing to say
    assert "BN203" not in codes(bd.freeze_bn(resnet18()).train())


def test_bn204_affine_frozen_but_statistics_learning():
    model = conv_bn()
    model[1].requires_grad_(False)
    assert "BN204" in codes(model)
    assert "BN204" not in codes(conv_bn())
    assert "BN204" not in codes(bd.freeze_bn(model))


def test_bn205_momentum():
    assert bd.check(conv_bn(bn=nn.BatchNorm2d(8, momentum=0.9))).by_code("BN205")[0].severity == "warning"
    assert bd.check(conv_bn(bn=nn.BatchNorm2d(8, momentum=None))).by_code("BN205")[0].severity == "info"
    assert "BN205" not in codes(conv_bn(bn=nn.BatchNorm2d(8, momentum=0.01)))


def test_bn206_eps():
    assert "BN206" in codes(conv_bn(bn=nn.BatchNorm2d(8, eps=1e-12)))
    assert "BN206" in codes(conv_bn(bn=nn.BatchNorm2d(8, eps=0.5)))
    assert "BN206" not in codes(conv_bn(bn=nn.BatchNorm2d(8, eps=1e-3)))


def test_bn207_half_precision_statistics():
    assert "BN207" in codes(conv_bn().half())
    assert "BN207" in codes(conv_bn().to(torch.bfloat16))
    assert "BN207" not in codes(conv_bn(), S(micro_batch=32, precision="bf16"))  # autocast keeps BN in fp32


def test_bn208_never_reached():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = conv_bn(), conv_bn()

        def forward(self, x):
            return self.used(x)

    (finding,) = bd.check(Branchy(), input_shape=(3, 8, 8)).by_code("BN208")
    assert finding.evidence["layers"] == ["unused.1"]
    assert "BN208" not in codes(Branchy())  # without an input shape nothing is traced
    assert "BN208" not in codes(conv_bn(), input_shape=(3, 8, 8))


def test_bn301_syncbn_under_data_parallel():
    assert "BN301" in codes(nn.DataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(conv_bn())))
    assert "BN301" not in codes(nn.DataParallel(conv_bn()))


def test_bn302_torch_syncbn_in_one_process():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(conv_bn())
    assert "BN302" in codes(model, S(micro_batch=32))
    assert "BN302" not in codes(model, S(micro_batch=32, world_size=2, sync_bn=True))
    assert "BN302" not in codes(bd.to_sync_bn(conv_bn()), S(micro_batch=32))  # bndoctor's runs anywhere


def test_gn101_and_gn102_groupnorm_groups():
    gn = nn.GroupNorm(4, 8)
    gn.num_groups = 3  # nn.GroupNorm checks this in __init__; models built elsewhere may not
    assert "GN101" in codes(nn.Sequential(gn))
    assert "GN102" in codes(nn.Sequential(nn.GroupNorm(8, 8)))
    assert codes(nn.Sequential(nn.GroupNorm(4, 8), nn.GroupNorm(1, 8))) == []


def test_bn901_unsupported_bn_like_layer():
    assert "BN901" in codes(nn.Sequential(nn.Conv2d(3, 4, 1), MMStyleSyncBN(4)))
    assert "BN901" not in codes(conv_bn())


# --------------------------------------------------------------------------- report, strict, trace


def test_strict_raises_one_error_listing_every_error_finding():
    with pytest.raises(bd.diagnose.CheckFailedError, match="BN101") as info:
        bd.check(conv_bn(), S(micro_batch=2), strict=True)
    assert "bndoctor.fix" in info.value.hint
    bd.check(conv_bn(), S(micro_batch=32), strict=True)  # warnings and infos do not raise


def test_report_json_and_text():
    report = bd.check(conv_bn(bias=True), S(micro_batch=2), input_shape=(3, 8, 8))
    data = report.as_dict()
    assert data["summary"] == {"error": 1, "warning": 0, "info": 1}
    assert data["setup"]["logical_batch"] == 2 and data["layer_shapes"]["1"] == [2, 8, 8, 8]
    assert [f["code"] for f in data["findings"]] == ["BN101", "BN201"]  # errors first
    text = str(report)
    assert text.index("ERRORS") < text.index("INFOS") and "FIXES" in text and "BN201" in text


def test_trace_leaves_the_model_untouched_and_failures_are_reported_not_raised():
    model = tiny_resnet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bd.check(model, S(micro_batch=2), input_shape=(1, 8, 8))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all("forward" not in m.__dict__ for m in model.modules())

    class NeedsData(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = conv_bn()

        def forward(self, x):
            return self.body(x) * float(x.sum())  # meta tensors have no values

    report = bd.check(NeedsData(), S(micro_batch=2), input_shape=(3, 8, 8))
    assert not report.traced and "NeedsData" not in report.trace_error and report.trace_error
    assert "BN101" in report.codes()


def test_bad_input_is_refused_with_a_hint():
    with pytest.raises(bd.BNDoctorError, match="positive integer"):
        S(micro_batch=0)
    with pytest.raises(bd.BNDoctorError, match="precision"):
        S(micro_batch=2, precision="fp8")
    with pytest.raises(bd.BNDoctorError, match="input_shape"):
        bd.check(conv_bn(), input_shape=(3, 0))
    with pytest.raises(bd.BNDoctorError, match="TrainingSetup"):
        bd.check(conv_bn(), {"micro_batch": 2})
    with pytest.raises(bd.errors.NotAModuleError):
        bd.check(conv_bn().state_dict())


# --------------------------------------------------------------------------- registry


def test_user_checks_are_looked_up_along_the_class_hierarchy():
    seen = []

    @bd.register_check("TEST001", "every BN subclass", applies_to=nn.BatchNorm2d)
    def every_bn(ctx, name, module):
        seen.append(name)
        return bd.Finding("TEST001", "info", name, "seen", fix="nothing")

    try:
        model = nn.Sequential(nn.BatchNorm2d(3), BatchNormAct2d(3), nn.BatchNorm1d(3))
        assert bd.check(model).codes() == ["TEST001"] and seen == ["0", "1"]
        with pytest.raises(bd.BNDoctorError, match="already registered"):
            bd.register_check("TEST001", "again")(every_bn)
    finally:
        from bndoctor.diagnose import CHECKS

        CHECKS.pop("TEST001")


def test_a_user_check_returning_garbage_is_named():
    from bndoctor.diagnose import CHECKS

    bd.register_check("TEST002", "broken")(lambda ctx: ["not a finding"])
    try:
        with pytest.raises(bd.BNDoctorError, match="TEST002 returned str"):
            bd.check(conv_bn())
    finally:
        CHECKS.pop("TEST002")
    with pytest.raises(bd.BNDoctorError, match="severity"):
        bd.Finding("X", "fatal", None, "bad")


def test_trace_restores_shared_and_tied_tensors_as_the_same_objects():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = self.second = nn.BatchNorm2d(3)
            self.fc = nn.Linear(75, 75)
            self.head = nn.Linear(75, 75)
            self.head.weight = self.fc.weight  # tied

        def forward(self, x):
            x = self.second(torch.tanh(self.first(x)))
            if x.device.type == "meta" and getattr(self, "fail", False):
                raise RuntimeError("breaks while traced")
            return self.head(self.fc(x.flatten(1)))

    model = Twice()
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    report = bd.check(model, S(micro_batch=2), input_shape=(3, 5, 5))
    assert report.traced and report.layer_shapes == {"first": (2, 3, 5, 5)}
    model.fail = True
    assert not bd.check(model, S(micro_batch=2), input_shape=(3, 5, 5)).traced
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is tensors[k] and after[k].device.type == "cpu" for k in tensors)
    assert model.head.weight is model.fc.weight


def test_an_input_shape_that_does_not_fit_is_an_error_naming_the_layer():
    model = resnet18()
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    with pytest.raises(bd.BNDoctorError, match=r"input_shape \(1, 32, 32\) does not fit ResNet: 'stem.0' raised"):
        bd.check(model, S(micro_batch=2), input_shape=(1, 32, 32))
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is tensors[k] and after[k].device.type == "cpu" for k in tensors)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_a_check_that_needs_a_setup_is_listed_unchecked_without_one_and_selectors_must_exist():
    from bndoctor.diagnose import CHECKS

    @bd.register_check("TST901", "needs the micro-batch", needs_setup=True)
    def needs_micro_batch(ctx):
        return bd.Finding("TST901", "warning", None, f"micro-batch {ctx.setup.micro_batch}")

    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
        report = bd.check(model)
        assert "TST901" in report.unchecked and "TST901" not in report.codes()
        assert "healthy" not in report.to_text() and "TST901" in report.to_text()
        assert "TST901" in bd.check(model, bd.TrainingSetup(micro_batch=64)).codes()
        assert bd.check(model, bd.TrainingSetup(micro_batch=64)).unchecked == []
        with pytest.raises(bd.BNDoctorError, match="unknown finding code 'TST9X' in ignore"):
            report.filtered(ignore=["TST9X"])
        assert report.filtered(select=["TST"]).findings == []  # a prefix of a registered code is fine
    finally:
        CHECKS.pop("TST901")


def test_a_lazy_model_is_checked_without_shapes_and_stays_lazy():
    """`check(model, input_shape=...)` on a model whose lazy layers have not run: no trace, a note, no error."""
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.ReLU())
    report = bd.check(model, bd.TrainingSetup(micro_batch=2), input_shape=(3, 8, 8))
    assert not report.traced and "lazy layer(s) '0', '1' have not run yet" in report.trace_error
    assert "BN901" in report.codes()  # the lazy BN is named as not analysable yet
    assert isinstance(model[0].weight, nn.parameter.UninitializedParameter)  # nothing materialised
    model(torch.randn(2, 3, 8, 8))  # once it has run, the trace works
    assert bd.check(model, bd.TrainingSetup(micro_batch=2), input_shape=(3, 8, 8)).traced

"""Every operation on real third-party models (random init, offline): the representative subset of the matrix.

``benchmarks/compat_matrix.py`` runs the same operations (:mod:`bndoctor.bench.compat`) on every
architecture it can build and writes docs/compatibility.md.
"""

from __future__ import annotations

import pytest
import torch

from bndoctor.bench.compat import OPERATIONS, run_operations
from tests import _thirdparty

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _timm(name, **kwargs):
    def build():
        return _thirdparty.timm().create_model(name, pretrained=False, **kwargs)

    return build


def _timm_frozen():
    timm = _thirdparty.timm()
    return timm.layers.freeze_batch_norm_2d(timm.create_model("efficientnet_b0", pretrained=False))


def _timm_synced():
    timm = _thirdparty.timm()
    return timm.layers.convert_sync_batchnorm(timm.create_model("mobilenetv3_small_050", pretrained=False))


def _tv(name, **kwargs):
    def build():
        return _thirdparty.torchvision().models.get_model(name, weights=None, **kwargs)

    return build


def _tv_frozen():
    tv = _thirdparty.torchvision()
    return tv.models.resnet18(weights=None, norm_layer=tv.ops.FrozenBatchNorm2d)


def _hf(config, model="AutoModel", **kwargs):
    def build():
        tr = _thirdparty.transformers()
        cfg = getattr(tr, config)(**kwargs)
        return getattr(tr, model).from_config(cfg) if model == "AutoModel" else getattr(tr, model)(cfg)

    return build


def _detr_backbone():
    tr = _thirdparty.transformers()
    # an explicit transformers ResNet backbone: the default depends on whether transformers finds timm
    config = tr.DetrConfig(backbone_config=tr.ResNetConfig(out_features=["stage4"]), use_pretrained_backbone=False)
    return tr.DetrModel(config).backbone.model  # transformers' ResNet backbone with DETR's own frozen BN


SMALL_RESNET = dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])

MODELS = {
    "timm:efficientnet_b0": _timm("efficientnet_b0"),
    "timm:mobilenetv3_small_050": _timm("mobilenetv3_small_050"),
    "timm:regnetx_002": _timm("regnetx_002"),
    "timm:ghostnet_100": _timm("ghostnet_100"),  # constant channels at small spatial size
    "timm:resnet18": _timm("resnet18"),
    "timm:efficientnet_b0 (timm-frozen)": _timm_frozen,
    "timm:mobilenetv3_small_050 (timm SyncBatchNormAct)": _timm_synced,
    "torchvision:resnet18": _tv("resnet18"),
    "torchvision:mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "torchvision:shufflenet_v2_x0_5": _tv("shufflenet_v2_x0_5"),
    "torchvision:efficientnet_b0": _tv("efficientnet_b0"),
    "torchvision:resnet18 (FrozenBatchNorm2d)": _tv_frozen,
    "transformers:ResNetModel": _hf("ResNetConfig", **SMALL_RESNET),
    "transformers:EfficientNetModel": _hf("EfficientNetConfig", image_size=64, width_coefficient=0.5, hidden_dim=640),
    "transformers:MobileNetV2Model": _hf("MobileNetV2Config", image_size=64, depth_multiplier=0.5),
    "transformers:RegNetModel": _hf("RegNetConfig", hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1]),
    "transformers:DETR backbone (frozen BN)": _detr_backbone,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_every_operation_works_on_real_models(name):
    results = run_operations(MODELS[name], X)
    assert [r.operation for r in results] == list(OPERATIONS)
    failures = [f"{r.operation}: {r.detail}" for r in results if r.status == "fail"]
    assert not failures, f"{name}: " + "; ".join(failures)
    # frozen-only models have nothing that learns statistics: the operations that change learning are n/a
    frozen_only = "frozen" in name.lower()
    assert {r.operation for r in results if r.status == "n/a"} == (
        {"sync", "accumulate", "recalibrate", "monitor"} if frozen_only else set()
    )


def test_operations_say_why_they_do_not_apply():
    import torch.nn as nn

    def convmixer_like():  # BN after the activation: no conv output reaches a BN directly
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.GELU())

    results = {r.operation: r for r in run_operations(convmixer_like, X)}
    assert results["fold"].status == "n/a" and "no BN directly after a conv" in results["fold"].detail
    assert all(r.status == "pass" for name, r in results.items() if name != "fold")


def test_a_failing_operation_is_reported_with_its_reason_not_raised():
    import torch.nn as nn

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            if self.training:
                raise RuntimeError("this model cannot train")
            return self.bn(x)

    results = {r.operation: r for r in run_operations(Broken, X)}
    assert results["inventory"].status == "pass"
    assert results["accumulate"].status == "fail" and "this model cannot train" in results["accumulate"].detail

"""torch.compile on real third-party models converted by bndoctor: eager's numbers, one graph, no break.

tests/layers/test_compile.py checks every layer on a small network of ours;
here the layers sit where users put them. timm's RegNet has ``BatchNormAct2d``
layers (the activation applied inside the converted layer); transformers'
ResNet is a model torch.fx cannot trace and returns a ``ModelOutput``. Float64,
so that the comparison is tight (1e-6 relative to the largest gradient) even
where micro-batches of 2 leave a BN layer only 8 values per channel, and any
real mistake (Batch Renorm's wrongly recomputed r and d were off by 10 % and
more) fails loudly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bndoctor as bd
from tests import _thirdparty
from tests.layers.test_compile import assert_same_buffers, assert_same_gradients_then_step, eager_and_compiled

pytestmark = pytest.mark.slow


def _regnet():
    return _thirdparty.timm().create_model("regnetx_002", pretrained=False, num_classes=10)


def _hf_resnet():
    tr = _thirdparty.transformers()
    config = tr.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)
    return tr.ResNetForImageClassification(config)


CASES = {
    "timm regnetx_002, Batch Renorm": (_regnet, lambda m: bd.to_batch_renorm(m, warmup_steps=3)),
    "transformers ResNet, accumulation-aware BN": (_hf_resnet, bd.to_accum_bn),
}


def _logits(model, x):
    out = model(x)
    return out if torch.is_tensor(out) else out.logits


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_third_party_model_equals_eager(case):
    build, convert = CASES[case]
    torch.manual_seed(0)
    base = convert(build().double())
    assert any(isinstance(m, (bd.AccumBatchNorm, bd.BatchRenorm)) for m in base.modules())
    eager, compiled_model, compiled, optimizers = eager_and_compiled(base)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # two windows of 4 micro-batches; Batch Renorm's warm-up ends in the second
        for _ in range(4):
            x = torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 10, (2,), generator=gen)
            loss_e, loss_c = F.cross_entropy(_logits(eager, x), y), F.cross_entropy(_logits(compiled, x), y)
            torch.testing.assert_close(loss_c, loss_e, rtol=1e-9, atol=1e-9)
            (loss_e / 4).backward()
            (loss_c / 4).backward()
        scale = max(p.grad.abs().max() for p in eager.parameters() if p.grad is not None)
        assert_same_gradients_then_step(eager, compiled_model, optimizers, rtol=0, atol=1e-6 * float(scale))
    assert_same_buffers(eager, compiled_model, rtol=1e-7, atol=1e-9)
    explanation = torch._dynamo.explain(compiled_model)(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    assert explanation.graph_break_count == 0, explanation.break_reasons

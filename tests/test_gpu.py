"""Conversions on CUDA tensors keep the device (skipped without a GPU)."""

import pytest
import torch

import bndoctor as bd
from bndoctor.models import tiny_resnet
from tests._fakes import randomize_bn

pytestmark = pytest.mark.gpu


def test_conversions_keep_cuda_device_and_outputs():
    model = randomize_bn(tiny_resnet()).cuda().eval()
    x = torch.randn(4, 1, 8, 8, device="cuda")
    folded = bd.fold_bn(model)
    frozen = bd.freeze_bn(model).train()
    grouped = bd.convert_bn(model)
    for converted in (folded, frozen, grouped):
        assert all(p.device.type == "cuda" for p in converted.parameters())
    torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(frozen(x), model(x))
    assert grouped(x).device.type == "cuda"


def test_recalibrate_moves_cpu_batches_to_the_model_device():
    torch.manual_seed(0)
    model = tiny_resnet().cuda()
    cpu_batches = [torch.randn(16, 1, 8, 8) + 1 for _ in range(3)]
    report = bd.recalibrate(model, cpu_batches, progress=False)
    assert report.samples == 48 and model.stem[1].running_mean.device.type == "cuda"
    torch.manual_seed(0)
    reference = tiny_resnet()
    bd.recalibrate(reference, cpu_batches, progress=False, exact=True)
    torch.testing.assert_close(model.stem[1].running_var.cpu(), reference.stem[1].running_var, rtol=1e-4, atol=1e-5)

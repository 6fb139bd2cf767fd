"""Accumulation-aware BN under real training loops: DDP with no_sync (gloo) and Hugging Face Accelerate."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bndoctor as bd
from tests._dist import run_ranks

ACCUM = 3


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def _micro(rank, step):
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(2, 1, 4, 4, generator=gen) + rank, torch.randint(0, 3, (2,), generator=gen)


def _window_reference(rank):
    """Single process: the same local window, accumulate_bn attached; gradients and statistics."""
    model = bd.to_accum_bn(_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    bd.accumulate_bn(model, opt)
    for step in range(ACCUM):
        x, y = _micro(rank, step)
        (F.cross_entropy(model(x), y) / ACCUM).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return grads, model[1].running_mean.clone(), int(model[1].num_batches_tracked)


def _ddp_rank(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(bd.to_accum_bn(_net()))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    bd.accumulate_bn(model.module, opt)
    for step in range(ACCUM):
        x, y = _micro(rank, step)
        context = model.no_sync() if step < ACCUM - 1 else torch.enable_grad()
        with context:
            (F.cross_entropy(model(x), y) / ACCUM).backward()
    grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
    opt.step()
    bn = model.module[1]
    return grads, bn.running_mean.clone(), int(bn.num_batches_tracked)


def test_ddp_no_sync_loop_works_unchanged():
    results = run_ranks(_ddp_rank, 2)
    for r in results:
        assert not isinstance(r, BaseException), r
    references = [_window_reference(rank) for rank in range(2)]
    for name in references[0][0]:
        expected = (references[0][0][name] + references[1][0][name]) / 2  # DDP averages the ranks
        for grads, _, _ in results:
            torch.testing.assert_close(grads[name], expected, rtol=1e-5, atol=1e-6)
    for (_, mean, tracked), (_, ref_mean, ref_tracked) in zip(results, references):
        torch.testing.assert_close(mean, ref_mean)  # each rank commits its own window once
        assert tracked == ref_tracked == 1


def test_accelerate_gradient_accumulation_closes_one_window_per_real_step():
    accelerate = pytest.importorskip("accelerate")
    model = bd.to_accum_bn(_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    handle = bd.accumulate_bn(model, opt)  # on the raw optimizer, before prepare()
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=ACCUM, cpu=True)
    model, opt = accelerator.prepare(model, opt)
    for step in range(2 * ACCUM):
        x, y = _micro(0, step)
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
    assert handle.steps == 2
    assert int(model[1].num_batches_tracked) == 2 and not model[1].window_open


def test_lightning_accumulate_grad_batches_closes_one_window_per_real_step(tmp_path):
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = bd.to_accum_bn(_net())

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
            self.handle = bd.accumulate_bn(self.net, optimizer)
            return optimizer

    pairs = [_micro(0, step) for step in range(2 * ACCUM)]
    dataset = torch.utils.data.TensorDataset(torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs]))
    data = torch.utils.data.DataLoader(dataset, batch_size=2)
    module = Module()
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=ACCUM,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, train_dataloaders=data)
    assert module.handle.steps == 2
    assert int(module.net[1].num_batches_tracked) == 2 and not module.net[1].window_open

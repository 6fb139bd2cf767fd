"""The Lightning and Hugging Face callbacks run the monitor inside real CPU training."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bndoctor as bd
from bndoctor.models import tiny_resnet


def _data(n=32):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_lightning_callback_monitors_recalibrates_and_checkpoints(tmp_path):
    lightning = pytest.importorskip("lightning")
    from bndoctor.integrations.lightning import BNMonitorCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_resnet()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    callback = BNMonitorCallback(every=2, recalibrate=True, noise_scale=True, warmup=0, window=2)
    module = Module()
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_epochs=2,
        accumulate_grad_batches=2,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, train_dataloaders=loader)
    lines = [json.loads(line) for line in (tmp_path / "bn_monitor.jsonl").read_text().splitlines()]
    samples = [r for r in lines if r["kind"] == "sample"]
    assert len(samples) == 8 and samples[-1]["step"] == 7  # 16 training forwards, 8 optimizer steps
    noise = [r for r in lines if r["kind"] == "noise"]
    assert len(noise) == 8 and noise[0]["logical_batch"] == 8 and callback.noise.b_big == 8
    assert all(r["g2_small"] > 0 for r in noise) and callback.noise.samples[-1].alpha is not None
    assert [e["recalibrated_samples"] for e in callback.epochs] == [32, 32]
    # the last epoch ended with a recalibration: the statistics are already exact for the final weights
    again = bd.recalibrate(module.net, loader, progress=False)
    assert max(max(c.mean_change, c.var_change) for c in again.layers) < 1e-6
    state = callback.state_dict()
    assert state["monitor"]["forwards"] == 16
    resumed = BNMonitorCallback(every=2)
    resumed.load_state_dict(state)
    resumed.setup(trainer, module, "fit")
    resumed.on_train_start(trainer, module)
    assert resumed.monitor.forwards == 16
    resumed.teardown(trainer, module, "fit")


@pytest.mark.parametrize("pattern", ["self.net(x)", "self.model(x)", "two submodules"])
def test_lightning_modules_that_call_their_parts_are_monitored(tmp_path, pattern):
    """training_step calls submodules, never self(x): the monitor samples the BN layers all the same."""
    lightning = pytest.importorskip("lightning")
    from bndoctor.integrations.lightning import BNMonitorCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            if pattern == "two submodules":
                self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
                self.head = nn.Sequential(nn.Linear(144, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))
            else:
                setattr(self, pattern[5:-3], tiny_resnet())

        def training_step(self, batch, _):
            x, y = batch
            if pattern == "two submodules":
                return F.cross_entropy(self.head(self.encoder(x)), y)
            return F.cross_entropy(getattr(self, pattern[5:-3])(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    callback = BNMonitorCallback(every=2, warmup=0)
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(Module(), train_dataloaders=loader)
    lines = [json.loads(line) for line in (tmp_path / "bn_monitor.jsonl").read_text().splitlines()]
    samples = [r for r in lines if r["kind"] == "sample"]
    assert [r["step"] for r in samples] == [0, 2, 4, 6]  # 8 training forwards, one per optimizer step
    layers = 2 if pattern == "two submodules" else 9
    assert all(len(r["layers"]) == layers for r in samples)
    assert not [r for r in lines if r["kind"] == "warning"]


def test_lightning_callback_checks_the_trainers_setup_and_writes_beside_the_logger(tmp_path, caplog):
    """A plain-BN run with accumulate_grad_batches=4 gets check's accumulation finding, with Lightning's fix."""
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger

    from bndoctor.integrations.lightning import BNMonitorCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_resnet()

        def training_step(self, batch, _):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    x, y = _data(16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    callback = BNMonitorCallback(every=4)
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=4,
        callbacks=[callback],
        logger=CSVLogger(str(tmp_path)),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    with caplog.at_level("WARNING", logger="bndoctor.integrations"):
        trainer.fit(Module(), train_dataloaders=loader)
    report = callback.check_report
    assert report.setup.micro_batch == 2 and report.setup.accum_steps == 4 and report.setup.trainer == "lightning"
    accumulation = [f for f in report.findings if f.code == "BN103"]
    assert accumulation and "BNMonitorCallback attaches the window control" in accumulation[0].fix
    assert "accumulate_bn(" not in " ".join(f.fix for f in report.findings)
    lines = [r.getMessage() for r in caplog.records if r.name == "bndoctor.integrations"]
    assert len(lines) == 1 and "lightning, micro-batch 2 x 4 accumulation steps" in lines[0] and "BN103" in lines[0]
    run_file = tmp_path / "lightning_logs" / "version_0" / "bn_monitor.jsonl"  # in the logger's folder
    assert run_file.exists() and str(run_file.parent) == trainer.log_dir
    assert not (tmp_path / "bn_monitor.jsonl").exists()
    assert [r["kind"] for r in map(json.loads, run_file.read_text().splitlines())][:2] == ["start", "check"]


def test_huggingface_trainer_callback(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from bndoctor.integrations.huggingface import BNMonitorTrainerCallback

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_resnet()

        def forward(self, pixel_values, labels=None):
            logits = self.net(pixel_values)
            loss = None if labels is None else F.cross_entropy(logits, labels)
            return {"loss": loss, "logits": logits}

    class Dataset(torch.utils.data.Dataset):
        def __init__(self):
            self.x, self.y = _data()

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"pixel_values": self.x[i], "labels": self.y[i]}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callback = BNMonitorTrainerCallback(every=2, recalibrate=True, noise_scale=True, warmup=0, window=2)
    trainer = Trainer(model=Model(), args=args, train_dataset=Dataset(), callbacks=[callback])
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "bn_monitor.jsonl").read_text().splitlines()]
    assert len([r for r in lines if r["kind"] == "sample"]) == 8
    noise = [r for r in lines if r["kind"] == "noise"]
    assert len(noise) == 8 and callback.noise.b_big == 8 and all(r["g2_small"] > 0 for r in noise)
    assert [e["recalibrated_samples"] for e in callback.epochs] == [32, 32]
    exported = callback.state()
    assert exported["attributes"]["monitor_state"]["forwards"] == 16
    restored = BNMonitorTrainerCallback(**exported["args"])
    restored.monitor_state = exported["attributes"]["monitor_state"]  # what the Trainer does on resume
    restored.on_train_begin(args, trainer.state, trainer.control, model=trainer.model)
    assert restored.monitor.forwards == 16
    restored.on_train_end(args, trainer.state, trainer.control)
    # check ran at the start with the Trainer's setup, and its fix names the callback's step, not a manual call
    report = callback.check_report
    assert report.setup.micro_batch == 4 and report.setup.accum_steps == 2 and report.setup.trainer == "huggingface"
    fixes = " ".join(f.fix for f in report.errors + report.warnings)
    assert "BNMonitorTrainerCallback attaches the window control" in fixes and "accumulate_bn(" not in fixes
    checked = [r for r in lines if r["kind"] == "check"]
    assert len(checked) == 1 and {f["code"] for f in checked[0]["findings"]} == {
        f.code for f in report.findings if f.severity != "info"
    }


def test_huggingface_trainer_attaches_windows_and_reports_metrics_to_tensorboard(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import Trainer, TrainingArguments

    from bndoctor.integrations.huggingface import BNMonitorTrainerCallback

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = bd.to_accum_bn(tiny_resnet())

        def forward(self, pixel_values, labels=None):
            logits = self.net(pixel_values)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    x, y = _data()
    dataset = [{"pixel_values": a, "labels": b} for a, b in zip(x, y)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=1,
        logging_steps=1,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    callback = BNMonitorTrainerCallback(every=2, warmup=0, window=2, sink=None)
    model = Model()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    # no accumulate_bn call: the callback attaches the window control (an unattached layer would warn: an error here)
    trainer.train()
    assert len(callback.attached) == 1 and callback.attached[0].steps == 4  # 8 micro-batches, 4 optimizer steps
    assert not any(m.controlled for m in model.modules() if hasattr(m, "controlled"))  # detached at the end
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/bn/effective_batch_min" in tags and "train/bn/alerts" in tags, tags
    assert len(events.Scalars("train/bn/effective_batch_min")) >= 2


def test_noise_records_are_written_once_per_measured_step(tmp_path):
    from bndoctor.integrations._epoch import MonitorCallbackCore

    core = MonitorCallbackCore(sink=tmp_path / "run.jsonl", noise_scale=True, every=1000)
    model = tiny_resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    core._start(model, str(tmp_path), None)
    core._start_noise(model, optimizer, 2, 2, 1)
    assert core.noise.optimizer is optimizer
    for _ in range(2):
        (model(torch.randn(2, 1, 8, 8)).sum() / 2).backward()
    optimizer.step()
    optimizer.zero_grad()
    optimizer.step()  # no micro-batch since the last step: no new sample, no record
    core._stop()
    lines = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert len([r for r in lines if r["kind"] == "noise"]) == 1  # labelled with the monitor's step


def test_callback_options_are_validated_when_the_callback_is_built():
    from bndoctor.integrations._epoch import MonitorCallbackCore

    with pytest.raises(bd.BNDoctorError, match="unknown option\\(s\\) evry") as info:
        MonitorCallbackCore(evry=10)
    assert "every" in info.value.hint
    with pytest.raises(bd.BNDoctorError, match="recalibrate_samples to be a positive integer or None"):
        MonitorCallbackCore(recalibrate_samples=0)
    with pytest.raises(bd.BNDoctorError, match="recalibrate_forward to be callable"):
        MonitorCallbackCore(recalibrate_forward="model")


def test_accelerate_loop_with_accumulate_bn_equals_the_plain_loop():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    x, y = _data(32)
    reference = bd.to_accum_bn(tiny_resnet())
    model = bd.to_accum_bn(tiny_resnet())
    model.load_state_dict(reference.state_dict())

    # the plain loop: 2 micro-batches of 4 per optimizer step
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    handle = bd.accumulate_bn(reference, optimizer)
    for i in range(0, 32, 4):
        (F.cross_entropy(reference(x[i : i + 4]), y[i : i + 4]) / 2).backward()
        if i % 8 == 4:
            optimizer.step()
            optimizer.zero_grad()
    handle.remove()

    # Accelerate's loop: its optimizer wrapper skips the inner step on accumulation micro-steps
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05), loader)
    handle = bd.accumulate_bn(model, optimizer)  # the AcceleratedOptimizer, unwrapped
    for xb, yb in loader:
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(xb), yb))
            optimizer.step()
            optimizer.zero_grad()
    assert handle.steps == 4
    handle.remove()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name, rtol=1e-5, atol=1e-6)

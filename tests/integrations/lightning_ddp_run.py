"""A Lightning run for tests/integrations/test_lightning_ddp.py (not a test itself).

    python lightning_ddp_run.py OUT_DIR STRATEGY DEVICES [--sync] [--accum]

Trains tiny_resnet for one epoch with BNMonitorCallback (and BNDoctorSync with
--sync; accumulation-aware BN with --accum) and writes OUT_DIR/result.json on
rank zero: what the layers were during training, what the monitor counted.
"""

import json
import sys

import lightning
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

import bndoctor as bd
from bndoctor.integrations.lightning import BNDoctorSync, BNMonitorCallback
from bndoctor.models import tiny_resnet


class Module(lightning.LightningModule):
    def __init__(self, accum: bool) -> None:
        super().__init__()
        self.net = bd.to_accum_bn(tiny_resnet()) if accum else tiny_resnet()
        self.seen: dict = {}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == 0:  # what the layers are while training (the plugin reverts them at teardown)
            self.seen = {
                "classes": sorted({type(m).__name__ for m in self.net.modules() if "Norm" in type(m).__name__}),
                "synced": sorted({bool(getattr(m, "sync", False)) for m in self.net.modules() if hasattr(m, "sync")}),
                "controlled": sorted({m.controlled for m in self.net.modules() if hasattr(m, "controlled")}),
            }
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Report(lightning.Callback):
    """Writes OUT/result.json on rank zero at the end of fit, inside the training process (ddp_spawn too)."""

    def __init__(self, out: str, monitor: BNMonitorCallback) -> None:
        self.out, self.monitor = out, monitor

    def teardown(self, trainer, pl_module, stage):
        if trainer.is_global_zero:
            result = {
                "forwards": self.monitor.monitor.forwards,
                "samples": self.monitor.monitor.samples,
                "alerts": sorted({f.code for f in self.monitor.alerts}),
                "seen": pl_module.seen,
                "after": sorted({type(m).__name__ for m in pl_module.net.modules() if "Norm" in type(m).__name__}),
                "after_synced": sorted({bool(m.sync) for m in pl_module.net.modules() if hasattr(m, "sync")}),
            }
            with open(f"{self.out}/result.json", "w") as f:
                json.dump(result, f)


def main() -> None:
    out, strategy, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sync, accum = "--sync" in sys.argv, "--accum" in sys.argv
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    callback = BNMonitorCallback(every=2, warmup=0, window=2, divergence_every=1, sink=f"{out}/bn_monitor.jsonl")
    module = Module(accum)
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=1,
        accumulate_grad_batches=2,
        callbacks=[callback, Report(out, callback)],
        plugins=[BNDoctorSync()] if sync else None,
        logger=CSVLogger(out, name="logs", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        default_root_dir=out,
    )
    trainer.fit(module, train_dataloaders=loader)


if __name__ == "__main__":
    main()

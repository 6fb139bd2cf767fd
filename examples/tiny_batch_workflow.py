"""The whole bndoctor workflow for training at a tiny physical batch, on the digits data.

Needs the demo extra for the digits data: pip install 'bndoctor[demo]' (scikit-learn).

1. ``bndoctor.check`` diagnoses the model for the setup (micro-batch 2, 32 accumulation steps).
2. ``bndoctor.fix`` applies the prescription (here: accumulation-aware BN).
3. Training runs an unchanged accumulation loop with ``BNMonitor`` and ``GradientNoiseScale`` attached.
4. ``bndoctor.recalibrate`` computes exact statistics for the final weights; ``bndoctor report`` renders the run.

    python examples/tiny_batch_workflow.py --epochs 3 --out bndoctor-out/workflow
    bndoctor report bndoctor-out/workflow/bn_monitor.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import bndoctor
from bndoctor.bench.data import load_digits
from bndoctor.bench.samplers import schedule
from bndoctor.models import tiny_resnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accum", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bndoctor-out/workflow"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = load_digits()

    setup = bndoctor.TrainingSetup(micro_batch=args.micro_batch, accum_steps=args.accum)
    report = bndoctor.check(tiny_resnet(), setup, input_shape=(1, 8, 8))
    print(report, end="\n\n")
    model, changes = bndoctor.fix(tiny_resnet(), report)
    print("fix:", "; ".join(c.strip() for c in changes), end="\n\n")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if any(isinstance(m, bndoctor.AccumBatchNorm) for m in model.modules()):
        bndoctor.accumulate_bn(model, optimizer)  # the optimizer step closes each accumulation window
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bn_monitor.jsonl").unlink(missing_ok=True)
    monitor = bndoctor.BNMonitor(model, every=50, sink=args.out / "bn_monitor.jsonl", log=False)
    noise = bndoctor.GradientNoiseScale(model, micro_batch=args.micro_batch, accum_steps=args.accum)
    noise.attach(optimizer)

    rng = np.random.default_rng(0)
    for epoch in range(args.epochs):
        model.train()
        for window in schedule(data.y_train, args.micro_batch, args.accum, "correlated", rng):
            for idx in window:
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                (loss / len(window)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            accuracy = (model.eval()(data.x_val).argmax(1) == data.y_val).float().mean().item()
        print(f"epoch {epoch + 1}: val accuracy {accuracy:.3f}, B_simple {noise.b_simple:.0f}")
    monitor.close()
    noise.detach()

    batches = [data.x_train[i : i + 64] for i in range(0, len(data.x_train), 64)]
    bndoctor.recalibrate(model, batches, progress=False)
    with torch.no_grad():
        accuracy = (model.eval()(data.x_val).argmax(1) == data.y_val).float().mean().item()
    print(f"after recalibration: val accuracy {accuracy:.3f}")
    alerts = ", ".join(sorted({f"{f.code} {f.module}" for f in monitor.alerts})) or "none"
    print(f"monitor alerts: {alerts}")
    for finding in bndoctor.advise(args.micro_batch * args.accum, noise.b_simple, alpha=noise.alpha):
        print(finding)
    exported = bndoctor.from_accum_bn(model) if changes else model
    torch.save(exported.state_dict(), args.out / "model.pt")
    print(f"wrote {args.out / 'bn_monitor.jsonl'} and {args.out / 'model.pt'} (plain BatchNorm2d)")


if __name__ == "__main__":
    main()

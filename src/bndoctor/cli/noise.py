"""``bndoctor noise``: train the harness model briefly; print B_simple and the tail index, with advice."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from .. import _table
from ..findings import Finding
from ._command import Command, positive_int


@dataclass
class NoiseResult:
    run: Any
    advice: list[Finding]

    def to_json(self) -> dict[str, Any]:
        return {
            "micro_batch": self.run.micro_batch,
            "accum_steps": self.run.accum_steps,
            "logical_batch": self.run.logical_batch,
            "b_simple": self.run.b_simple,
            "alpha": self.run.alpha,
            "epochs": self.run.epochs,
            "seconds": self.run.seconds,
            "advice": [f.as_dict() for f in self.advice],
        }

    def to_text(self) -> str:
        run = self.run
        rows = [
            [
                e["epoch"],
                f"{e['train_loss']:.3f}",
                f"{e['b_simple']:.0f}",
                "-" if e["alpha"] is None else f"{e['alpha']:.2f}",
            ]
            for e in run.epochs
        ]
        lines = [
            f"harness model (digits, tiny ResNet), micro-batch {run.micro_batch} x {run.accum_steps} accumulation = "
            f"logical batch {run.logical_batch}; {run.seconds:.0f} s",
            "",
            _table.render(["epoch", "train loss", "B_simple", "tail index alpha"], rows),
            "",
            "B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018) from the micro-batch and accumulated gradients; "
            "alpha from the micro-batch gradient noise (2 = Gaussian, < 2 heavy-tailed).",
        ]
        if self.advice:
            lines += ["", "ADVICE"] + [f"{f.code} {f.severity}: {f.message}\n  fix: {f.fix}" for f in self.advice]
        else:
            lines += ["", f"The logical batch {run.logical_batch} is within a factor 4 of B_simple: a good trade-off."]
        return "\n".join(lines)


def run(args: argparse.Namespace) -> NoiseResult:
    from ..bench.noise import measure_noise
    from ..noise import advise

    result = measure_noise(
        micro_batch=args.micro_batch,
        accum_steps=args.accum,
        epochs=args.epochs,
        lr=args.lr,
        norm=args.norm,
        seed=args.seed,
    )
    advice = advise(result.logical_batch, result.b_simple, alpha=result.alpha, finetune=args.finetune)
    return NoiseResult(result, advice)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--micro-batch", type=positive_int, default=4, help="samples per micro-batch (default 4)")
    parser.add_argument("--accum", type=positive_int, default=16, help="micro-batches per optimizer step (default 16)")
    parser.add_argument("--epochs", type=positive_int, default=4, help="training epochs (default 4)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    parser.add_argument("--norm", choices=("batch", "group"), default="batch", help="norm layers of the model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation and the sampler")
    parser.add_argument("--finetune", action="store_true", help="advise for fine-tuning (logical batch 32-128)")


COMMAND = Command(
    "noise",
    "measure the gradient noise scale and tail index on the harness model, with batch-size advice",
    add_arguments,
    run,
)

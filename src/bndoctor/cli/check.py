"""``bndoctor check MODEL --micro-batch 2 ...``: diagnose a model for a training setup; a CI gate.

Exit codes: 0 no error-level finding, 1 at least one, 2 bad input.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..diagnose import Report, TrainingSetup, check
from ._command import Command, positive_int
from ._config import load_settings
from ._errors import EXIT_FINDINGS, EXIT_OK
from ._model import ModelSpecError, add_model_arguments, load_model, load_weights


@dataclass
class CheckResult:
    report: Report
    config: Path | None = None  # the pyproject.toml whose [tool.bndoctor] settings were used

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.report.ok else EXIT_FINDINGS

    def to_json(self) -> dict[str, Any]:
        return {**self.report.as_dict(), "config": None if self.config is None else str(self.config)}

    def to_text(self) -> str:
        text = self.report.to_text()
        return text if self.config is None else f"{text}\n(settings from [tool.bndoctor] in {self.config})"

    def to_github(self) -> str:
        return self.report.to_github()


#: option -> default when neither the command line nor [tool.bndoctor] sets it
DEFAULTS: dict[str, Any] = {
    "micro-batch": None,
    "accum": 1,
    "world-size": 1,
    "sync-bn": False,
    "finetune": False,
    "precision": "fp32",
    "input-shape": None,
    "select": None,
    "ignore": None,
}


def _codes(text: str) -> list[str]:
    return [part.strip().upper() for part in text.split(",") if part.strip()]


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"expected sizes like 3,224,224 (got {text!r})")
    return shape


def _settle(args: argparse.Namespace) -> Path | None:
    """Fill the options not given on the command line from [tool.bndoctor], then from the defaults."""
    settings, path = load_settings(args.config, isolated=args.isolated)
    for key, default in DEFAULTS.items():
        attribute = key.replace("-", "_")
        if getattr(args, attribute) is None:
            setattr(args, attribute, settings.get(key, default))
    if isinstance(args.input_shape, list):
        args.input_shape = tuple(args.input_shape)
    return path if settings else None


def run(args: argparse.Namespace) -> CheckResult:
    config = _settle(args)
    loaded = load_model(args.model, trust_pickle=args.trust_pickle, model_kwargs=args.model_kwargs)
    if not isinstance(loaded, nn.Module):
        raise ModelSpecError(
            "check needs the model's modules, but MODEL is a state_dict file",
            hint="pass the architecture as MODEL (package.module:callable) and the file as --weights",
        )
    if args.weights:
        load_weights(loaded, args.weights)
    setup = None
    if args.micro_batch is not None:
        setup = TrainingSetup(
            micro_batch=args.micro_batch,
            accum_steps=args.accum,
            world_size=args.world_size,
            sync_bn=args.sync_bn,
            finetune=args.finetune,
            precision=args.precision,
        )
    report = check(loaded, setup, input_shape=args.input_shape, name=args.model)
    return CheckResult(report.filtered(args.select, args.ignore), config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--micro-batch", type=positive_int, help="samples per device per forward pass (enables the batch-size checks)"
    )
    parser.add_argument("--accum", type=positive_int, help="gradient accumulation steps (default 1)")
    parser.add_argument("--world-size", type=positive_int, help="data-parallel processes (default 1)")
    parser.add_argument(
        "--sync-bn", action="store_true", default=None, help="BN statistics are synchronised across processes"
    )
    parser.add_argument("--finetune", action="store_true", default=None, help="training starts from pretrained weights")
    parser.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16"),
        help="training precision: fp16/bf16 mean autocast or a model cast to that type (default fp32)",
    )
    parser.add_argument(
        "--select", type=_codes, metavar="CODES", help="report only these codes or prefixes, e.g. BN1,BN201"
    )
    parser.add_argument("--ignore", type=_codes, metavar="CODES", help="leave out these codes or prefixes, e.g. BN106")
    parser.add_argument(
        "--input-shape",
        type=_shape,
        metavar="C,H,W",
        help="one sample's shape without the batch dimension, e.g. 3,224,224 (traced on meta tensors, no compute)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="read [tool.bndoctor] from this pyproject.toml (default: the nearest one from the working folder up)",
    )
    parser.add_argument(
        "--isolated", action="store_true", help="ignore [tool.bndoctor] settings; use the command line only"
    )


COMMAND = Command(
    "check",
    "diagnose a model's BatchNorm for a training setup (exit 1 on error-level findings)",
    add_arguments,
    run,
    formats=("text", "json", "github"),
)

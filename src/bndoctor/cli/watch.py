"""``bndoctor watch [--every N] [--out RUN.jsonl] -- COMMAND ...``: BN monitoring for an unmodified training script.

COMMAND runs as it is (``python train.py ARGS``, ``python -m pkg.train``,
``torchrun --nproc-per-node 2 train.py``, a shell script that starts Python);
``bndoctor watch -- train.py`` and ``-- -m pkg.train`` are run with this
Python. Every Python process it starts that imports torch is watched (see
:mod:`bndoctor.integrations.watch`): alerts are printed as they happen (rank
zero), the run file is written, and a summary follows the command's own
output. The exit code is the command's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BNDoctorError
from ._command import Command, positive_int
from ._paths import is_run_file, require_folder


@dataclass
class WatchResult:
    command: list[str]
    exit_code: int
    out: Path
    model: str | None = None
    layers: int = 0
    forwards: int = 0
    samples: int = 0
    steps: int | None = None
    world_size: int = 1
    alerts: list[dict[str, Any]] = field(default_factory=list)
    noise: dict[str, Any] | None = None
    divergence_max: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "exit_code": self.exit_code,
            "run": str(self.out),
            "model": self.model,
            "layers": self.layers,
            "samples": self.samples,
            "last_step": self.steps,
            "world_size": self.world_size,
            "alerts": [a["finding"] for a in self.alerts],
            "noise": self.noise,
            "rank_divergence_max": self.divergence_max,
        }

    def to_text(self) -> str:
        from ..findings import Finding

        if self.model is None:
            return (
                f"bndoctor watch: nothing was monitored (exit code {self.exit_code}): no training forward of a model "
                "with BatchNorm running statistics was seen\n"
                "hint: the model must be called in train mode; python -I/-E ignore PYTHONPATH, which watch needs"
            )
        ranks = f" on {self.world_size} ranks" if self.world_size > 1 else ""
        lines = [
            f"bndoctor watch: {self.model}, {self.layers} BN layer(s){ranks}: {self.samples} sample(s)"
            + (f" up to step {self.steps}" if self.steps is not None else "")
            + f"; command exit code {self.exit_code}"
        ]
        if self.alerts:
            findings = [Finding.from_dict(a["finding"]) for a in self.alerts]
            from ..monitor import group_alerts

            lines.append(f"{len(findings)} alert(s):")
            lines.extend(f"  {line}" for line in group_alerts(findings))
        else:
            lines.append("no alerts")
        if self.divergence_max is not None:
            lines.append(f"running statistics across ranks differed by up to {self.divergence_max:.3g}")
        if self.noise and self.noise["b_simple"] is not None:
            lines.append(
                f"gradient noise scale B_simple ~ {self.noise['b_simple']:.3g} (median of the last "
                f"{self.noise['samples']} steps) at a logical batch of {self.noise['logical_batch']}; "
                "bndoctor noise explains what it means"
            )
        elif self.noise:
            lines.append(
                f"gradient noise scale: not measurable over the last {self.noise['samples']} steps (the mean "
                "gradient is lost in the noise at this batch; train longer or with a larger logical batch)"
            )
        lines.append(f"run file: {self.out} (render it with: bndoctor report {self.out})")
        return "\n".join(lines)


def _command(args: list[str]) -> list[str]:
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise BNDoctorError(
            "watch needs a command to run", hint="bndoctor watch -- python train.py ARGS (everything after -- is run)"
        )
    if args[0] == "-m" or args[0].endswith(".py"):
        return [sys.executable, *args]
    return args


def _environment(options: dict[str, Any]) -> dict[str, str]:
    boot = Path(__file__).resolve().parent.parent / "integrations" / "_boot"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(boot), env.get("PYTHONPATH", "")) if p)
    env["BNDOCTOR_WATCH"] = json.dumps(options)
    return env


def _summarise(result: WatchResult) -> WatchResult:
    from ..monitor.report import load_run

    if not result.out.is_file() or result.out.stat().st_size == 0:
        return result
    run = load_run(result.out)
    result.model = run.start.get("model")
    result.layers = len(run.layers)
    result.samples = len(run.samples)
    result.world_size = int(run.start.get("world_size", 1))
    result.steps = run.samples[-1]["step"] if run.samples else None
    result.alerts = run.alerts
    if run.divergence:
        result.divergence_max = max(float(d["max"]) for d in run.divergence)
    if run.noise:
        from ..monitor.report import RECENT_STEPS, recent_b_simple

        result.noise = {
            "b_simple": recent_b_simple([r["b_simple"] for r in run.noise]),
            "samples": len(run.noise[-RECENT_STEPS:]),
            "logical_batch": run.noise[-1]["logical_batch"],
        }
    return result


def run(args: argparse.Namespace) -> WatchResult:
    command = _command(list(args.cmd))
    out = Path(args.out).resolve()
    if out.is_dir():
        raise BNDoctorError(f"--out {args.out} is a folder", hint="pass a file path, e.g. --out run.jsonl")
    require_folder(out.parent, "the run file")
    if out.exists() and not args.overwrite and not is_run_file(out):
        raise BNDoctorError(
            f"--out {args.out} exists and is not a bndoctor run file; it is left as it is",
            hint="pass another --out (e.g. run.jsonl), or --overwrite to replace that file",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")  # this run's records only
    options = {
        "out": str(out),
        "every": args.every,
        "warmup": args.warmup,
        "divergence_every": args.divergence_every,
        "noise": not args.no_noise,
    }
    try:
        child = subprocess.Popen(command, env=_environment(options))
    except FileNotFoundError:
        raise BNDoctorError(
            f"cannot run {command[0]!r}: no such program", hint="check the command after --, e.g. python train.py"
        ) from None
    try:
        code = child.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C: let it finish its own way
        code = child.wait()
    if code < 0:  # killed by a signal: report it as a shell does
        code = 128 + abs(code) if abs(code) in signal.valid_signals() else 1
    sys.stdout.flush()
    return _summarise(WatchResult(command, code, out))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--every", type=positive_int, default=100, help="sample one training forward in N (default 100)"
    )
    parser.add_argument(
        "--out", default="bndoctor-watch.jsonl", help="the run file (JSONL; default bndoctor-watch.jsonl)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out even when it is not a bndoctor run file (default: refuse; a run file is replaced)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=200,
        help="training forwards before the effective-batch alert may fire (default 200)",
    )
    parser.add_argument(
        "--divergence-every",
        type=int,
        default=10,
        help="samples between cross-rank checks under torch.distributed (0: never; default 10)",
    )
    parser.add_argument("--no-noise", action="store_true", help="do not track the gradient noise scale")
    parser.add_argument(
        "cmd",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="the training command, after -- (python train.py ARGS; torchrun ...; train.py; -m pkg.train)",
    )


COMMAND = Command(
    "watch",
    "run a training command with BN monitoring (no change to the script); exit code kept",
    add_arguments,
    run,
)

"""``bndoctor bench`` and ``bndoctor demo``: run harness scenarios and write the report."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._progress import ProgressBar
from ..errors import BNDoctorError
from ._command import Command, positive_int


@dataclass
class BenchResult:
    suite: Any
    paths: dict[str, Any]
    intro: str = ""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**self.suite.to_json(), "files": self.paths}

    def to_text(self) -> str:
        from ..bench.report import markdown_table

        parts = [self.intro] if self.intro else []
        parts.append(markdown_table(self.suite))
        if self.notes:
            parts.append("What it shows:\n" + "\n".join(f"- {n}" for n in self.notes))
        files = [self.paths["report"], *self.paths.get("plots", [])]
        parts.append("Wrote " + ", ".join(files) + f" (raw results: {self.paths['results']})")
        return "\n\n".join(parts)


def _default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _common(parser: argparse.ArgumentParser, default_out: str, default_seeds: int) -> None:
    parser.add_argument(
        "--seeds", type=positive_int, default=default_seeds, help=f"seeds 0..N-1 (default {default_seeds})"
    )
    parser.add_argument("--out", type=Path, default=Path(default_out), help=f"output folder (default {default_out})")
    parser.add_argument(
        "--jobs", type=positive_int, default=_default_jobs(), help="parallel processes (default: 2 or #cores)"
    )
    parser.add_argument("--epochs", type=positive_int, help="override every scenario's epoch count (quick runs)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the results of an earlier run in --out (default: refuse)"
    )


def _run(args: argparse.Namespace, names: list[str] | None, intro: str) -> BenchResult:
    from ..bench import resolve, run_suite
    from ..bench.report import findings, write_report

    if names is not None:  # "a,b c" works as well as "a b c"
        names = [part for name in names for part in name.split(",") if part]
    scenarios = resolve(names)
    if not scenarios:
        raise BNDoctorError("no scenarios selected", hint="see `bndoctor bench --list`")
    if (args.out / "results.json").exists() and not args.overwrite:  # checked before hours of training
        raise BNDoctorError(
            f"{str(args.out)!r} already holds the results of a run",
            hint="pass --overwrite to replace them, or --out with another folder",
        )
    progress = None if args.quiet else ProgressBar()
    suite = run_suite(scenarios, list(range(args.seeds)), jobs=args.jobs, epochs=args.epochs, progress=progress)
    suite.command = "bndoctor " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    paths = write_report(suite, args.out, plots=not args.no_plots)
    return BenchResult(suite, paths, intro, findings(suite))


@dataclass
class ScenarioList:
    rows: list[dict[str, Any]]

    def to_json(self) -> list[dict[str, Any]]:
        return self.rows

    def to_text(self) -> str:
        from .. import _table

        return _table.render(
            ["scenario", "group", "setup", "epochs", "description"],
            [[r["name"], r["group"], r["label"], r["epochs"], r["description"]] for r in self.rows],
        )


def run_bench(args: argparse.Namespace) -> BenchResult | ScenarioList:
    if args.list:
        from ..bench import SCENARIOS

        return ScenarioList(
            [
                {"name": s.name, "group": s.group, "label": s.label(), "epochs": s.epochs, "description": s.description}
                for s in SCENARIOS.values()
            ]
        )
    if args.render:
        from ..bench.report import findings, write_report
        from ..bench.runner import load_suite

        results = args.render / "results.json"
        if not results.exists():
            raise BNDoctorError(f"no results.json in {str(args.render)!r}", hint="pass the --out folder of a bench run")
        suite = load_suite(results)
        return BenchResult(suite, write_report(suite, args.render, plots=not args.no_plots), "", findings(suite))
    if args.data is not None:
        from ..bench.scenarios import data_scenarios

        names = [s.name for s in data_scenarios(str(args.data), epochs=args.epochs or 15)]
        chosen = args.scenarios or names
        return _run(args, chosen, f"bndoctor bench on {args.data}: the core scenarios on your data")
    return _run(args, args.scenarios, "")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenarios",
        nargs="+",
        metavar="NAME",
        help="scenario names, groups (core, sweep, finetune, accum, distributed, mnist1d, ...) or globs, separated "
        "by spaces or commas; default: all (with --data: the data-* scenarios)",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "--data",
        type=Path,
        metavar="PATH",
        help="run the core scenarios (data-*) on your data: a folder with one subfolder of images per class, or an "
        ".npz with arrays x and y",
    )
    parser.add_argument(
        "--render", type=Path, metavar="DIR", help="rewrite the report of an earlier run from DIR/results.json"
    )
    _common(parser, "bndoctor-out/bench", 3)


DEMO_INTRO = (
    "bndoctor demo: BatchNorm at a tiny physical batch, on scikit-learn's digits (real 8x8 images) and on\n"
    "MNIST-1D (Greydanus 2020, harder), against the batch-64 reference and the remedies. Gradient accumulation\n"
    "gives every run the same logical batch of 64; only the batch that BatchNorm normalises over changes."
)


def _demo_diagnosis() -> str:
    """What ``bndoctor check`` says about the harness setup before anything trains."""
    from ..diagnose import TrainingSetup, check
    from ..models import tiny_resnet

    report = check(tiny_resnet(), TrainingSetup(micro_batch=2, accum_steps=32), input_shape=(1, 8, 8))
    lines = [f"  {f.code} {f.severity}: {f.message}" for f in report.findings]
    return (
        "Before training, `bndoctor check tiny-resnet --micro-batch 2 --accum 32 --input-shape 1,8,8` predicts the "
        "problem:\n" + "\n".join(lines) + f"\n  prescribed first: {report.findings[0].action.name}"
        if report.findings and report.findings[0].action is not None
        else ""
    )


def _has_mnist1d() -> bool:
    import importlib.util

    return importlib.util.find_spec("mnist1d") is not None


def run_demo(args: argparse.Namespace) -> BenchResult:
    from ..bench import DEMO, DEMO_MNIST1D

    diagnosis = _demo_diagnosis()
    intro = DEMO_INTRO + ("\n\n" + diagnosis if diagnosis else "")
    names = list(DEMO)
    if _has_mnist1d():
        names += DEMO_MNIST1D
    else:
        intro += "\n\n(The MNIST-1D line needs the mnist1d package: pip install 'bndoctor[demo]'.)"
    return _run(args, names, intro)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser, "bndoctor-out/demo", 2)
    parser.set_defaults(overwrite=True)  # the demo is rerun as it is: it replaces its own earlier output


BENCH = Command(
    "bench",
    "run benchmark scenarios (digits, MNIST-1D, or --data on yours) and write a report",
    add_bench_arguments,
    run_bench,
)
DEMO_COMMAND = Command(
    "demo",
    "show BatchNorm failing at micro-batch 2 and the fixes (about two minutes on 2 cores)",
    add_demo_arguments,
    run_demo,
)

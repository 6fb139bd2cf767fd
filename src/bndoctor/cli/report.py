"""``bndoctor report RUN.jsonl [--out DIR]``: render a BNMonitor run as Markdown + HTML with plots."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._command import Command


@dataclass
class ReportResult:
    path: Path
    samples: int
    layers: int
    alerts: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "report": str(self.path),
            "html": str(self.path.with_suffix(".html")),
            "samples": self.samples,
            "layers": self.layers,
            "alerts": self.alerts,
        }

    def to_text(self) -> str:
        from ..findings import Finding
        from ..monitor import group_alerts

        lines = [f"{self.samples} samples of {self.layers} BN layer(s); {len(self.alerts)} alert(s)"]
        findings = [Finding.from_dict(a["finding"]) for a in self.alerts]
        lines += [f"  {line}" for line in group_alerts(findings)]  # one line per code; every layer in the report
        lines.append(f"wrote {self.path} and {self.path.with_suffix('.html')} (images embedded)")
        return "\n".join(lines)


def run(args: argparse.Namespace) -> ReportResult:
    from ..monitor.report import load_run, write_run_report
    from ._paths import require_folder

    monitor_run = load_run(args.run)
    source = Path(args.run)
    out = args.out if args.out is not None else source.with_suffix("") if source.suffix else Path(f"{source}-report")
    require_folder(out, "the report")
    path = write_run_report(monitor_run, out, plots=not args.no_plots)
    return ReportResult(path, len(monitor_run.samples), len(monitor_run.layers), monitor_run.alerts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN.jsonl", help="a file written by bndoctor.BNMonitor(sink=...)")
    parser.add_argument("--out", type=Path, help="output folder (default: next to RUN, named after it)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")


COMMAND = Command("report", "render a BNMonitor run (JSONL) as a report with plots", add_arguments, run)

"""The monitor's alerts on labelled runs: which runs each alert flags, and how often it is right.

The harness's runs have known outcomes. A run is *harmed* when its final validation accuracy ends more than
1 pp below its reference (the mean over seeds of the batch-64 run of its data set and group, or of the
synchronised run for DDP scenarios), *healthy* when it ends at most 0.3 pp below, and *unclear* in between
(left out of the rates). Every BN run of the harness is monitored; this script replays each run's sample
records through the monitor's own rules (:class:`bndoctor.monitor.alerts.Rules`), so the table shows what
the shipped thresholds raise, and reports per alert code its sensitivity (harmed runs flagged), its
specificity (healthy runs not flagged) and the optimizer step of its first alert.

    # label the runs of earlier suites and store their records (compact, gzip) for the test that rebuilds the table
    python benchmarks/alert_calibration.py bndoctor-out/digits bndoctor-out/m1d \
        --store benchmarks/records/alert_runs.json.gz --update BENCHMARKS.md
    # rebuild the table from the stored records
    python benchmarks/alert_calibration.py --stored benchmarks/records/alert_runs.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
from pathlib import Path
from typing import Any

from _publish import publish
from bndoctor.monitor.alerts import LayerSample, Rules, normalisation_batch

HARMED_BELOW = 1.0  # pp below the reference
HEALTHY_WITHIN = 0.3
#: group -> reference scenario (without the data set's prefix); scenarios of 5 epochs use the 5-epoch reference
REFERENCES = {"sweep": "sweep-bn-32", "finetune": "ft-bn-64", "distributed": "syncbn-2x8x4-corr"}
#: the figures of a layer a run file keeps for the rules, in this order
_FIELDS = ("n", "frozen", "nonfinite", "window", "shift", "within", "images", "batch", "norm")


def _reference(name: str, group: str, dataset: str) -> str:
    prefix = "m1d-" if dataset == "mnist1d" else ("data-" if dataset.startswith(("path:", "folder:")) else "")
    kind = group.replace("mnist1d-", "").replace("mnist1d", "core")
    if name.endswith("-5ep"):
        return prefix + "bn-64-5ep"
    return prefix + REFERENCES.get(kind, "bn-64")


def _dataset(name: str) -> str:
    """``digits``, ``mnist1d``, or ``folder:<name>`` for ``bench --data`` (no local path in the stored records)."""
    return "folder:" + Path(name[5:]).name if name.startswith("path:") else name


def _round(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return float(f"{value:.4g}")
    return value


def _layer(data: dict[str, Any], spec: dict[str, Any]) -> list[Any]:
    """A layer's figures for the rules; run files written before the monitor recorded ``images``, ``batch`` and
    ``norm`` get them from the scenario (micro-batch, world size, the layers' family)."""
    images = data.get("images") or spec["micro_batch"]
    norm = data.get("norm")
    if norm is None:
        if data.get("frozen") or spec.get("bn_eval"):
            norm = "running"
        elif data.get("window") is not None:
            norm = "window"
        elif spec.get("batch_renorm"):
            norm = "running"
        elif spec.get("sync_bn") and spec.get("world_size", 1) > 1:
            norm = "ranks"
        else:
            norm = "batch"
    batch = data.get("batch")
    if batch is None:
        world = spec.get("world_size", 1)
        batch = normalisation_batch(norm, images, world_size=world, window=data.get("window"), n=data.get("n") or 0)
    values = {**data, "images": images, "norm": norm, "batch": batch}
    return [_round(values.get(k)) for k in _FIELDS]


def collect(out_dir: Path) -> list[dict[str, Any]]:
    """The runs of one ``bndoctor bench --out`` folder: outcome and compact sample records."""
    results = json.loads((out_dir / "results.json").read_text())
    specs = {s["name"]: s for s in results["scenarios"]}
    runs = []
    for run in results["runs"]:
        spec = specs[run["scenario"]]
        monitor = (run.get("extra") or {}).get("monitor") or {}
        samples = []
        if monitor.get("file"):
            for line in (out_dir / monitor["file"]).read_text().splitlines():
                record = json.loads(line)
                if record.get("kind") == "sample":
                    layers = {k: _layer(v, spec) for k, v in record["layers"].items()}
                    samples.append([record["step"], record["forward"], layers])
        runs.append(
            {
                "scenario": run["scenario"],
                "seed": run["seed"],
                "dataset": _dataset(spec["dataset"]),
                "group": spec["group"],
                "epochs": len(run["val_acc"]),
                "final": round(100 * run["final_acc"], 2),
                "samples": samples,
            }
        )
    return runs


def replay(run: dict[str, Any]) -> dict[str, int]:
    """Alert code -> optimizer step of its first alert, as the monitor's rules raise them over the run."""
    rules = Rules()
    first: dict[str, int] = {}
    for step, forward, layers in run["samples"]:
        samples = {name: LayerSample.from_json(dict(zip(_FIELDS, values))) for name, values in layers.items()}
        for finding in rules.sample(step, forward, samples):
            first.setdefault(finding.code, step)
    return first


def label(runs: list[dict[str, Any]]) -> None:
    """Add ``reference``, ``diff`` (pp) and ``outcome`` (harmed, healthy, unclear, or no reference) to each run."""
    finals: dict[str, list[float]] = {}
    for run in runs:
        finals.setdefault(run["scenario"], []).append(run["final"])
    for run in runs:
        ref = _reference(run["scenario"], run["group"], run["dataset"])
        run["reference"] = ref
        if ref not in finals:
            run["diff"], run["outcome"] = math.nan, "no reference"
            continue
        run["diff"] = run["final"] - statistics.fmean(finals[ref])
        run["outcome"] = (
            "harmed" if run["diff"] < -HARMED_BELOW else "healthy" if run["diff"] >= -HEALTHY_WITHIN else "unclear"
        )


def _steps_per_epoch(run: dict[str, Any]) -> float:
    last = run["samples"][-1][0] if run["samples"] else 0
    return max(last, 1) / max(run["epochs"], 1)


def table(runs: list[dict[str, Any]]) -> str:
    """The labelled table and the rates per alert code, as Markdown."""
    label(runs)
    monitored = [r for r in runs if r["samples"]]
    for run in monitored:
        run["alerts"] = replay(run)
    codes = sorted({c for r in monitored for c in r["alerts"]})
    lines = [
        f"{len(monitored)} monitored runs ({len(runs) - len(monitored)} without BN layers to monitor left out); "
        f"harmed: final accuracy more than {HARMED_BELOW:g} pp below the reference, healthy: at most "
        f"{HEALTHY_WITHIN:g} pp below. First alert: optimizer step (epoch 1 ends at about the step in brackets).",
        "",
        "| data set | scenario | seed | final % | vs reference (pp) | outcome | alerts (first step) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in monitored:
        fired = ", ".join(f"{c} ({s})" for c, s in sorted(run["alerts"].items())) or "none"
        diff = "-" if math.isnan(run["diff"]) else f"{run['diff']:+.1f}"
        lines.append(
            f"| {run['dataset']} | {run['scenario']} | {run['seed']} | {run['final']:.1f} | {diff} vs "
            f"{run['reference']} | {run['outcome']} | {fired} [{_steps_per_epoch(run):.0f}] |"
        )
    harmed = [r for r in monitored if r["outcome"] == "harmed"]
    healthy = [r for r in monitored if r["outcome"] == "healthy"]
    lines += ["", "| alert | harmed runs flagged (sensitivity) | healthy runs silent (specificity) | "
              "flagged harmed runs alerted in epoch 1 |", "|---|---|---|---|"]  # fmt: skip
    for code in [*codes, "any"]:

        def fires(run: dict[str, Any], code: str = code) -> bool:
            return bool(run["alerts"]) if code == "any" else code in run["alerts"]

        def early(run: dict[str, Any], code: str = code) -> bool:
            steps = list(run["alerts"].values()) if code == "any" else [run["alerts"][code]]
            return min(steps) <= _steps_per_epoch(run)

        flagged = [r for r in harmed if fires(r)]
        silent = [r for r in healthy if not fires(r)]
        lines.append(
            f"| {code} | {len(flagged)}/{len(harmed)} ({_pct(len(flagged), len(harmed))}) | {len(silent)}/"
            f"{len(healthy)} ({_pct(len(silent), len(healthy))}) | {sum(early(r) for r in flagged)}/{len(flagged)} |"
        )
    return "\n".join(lines)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f} %" if whole else "-"


def store(runs: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump([{k: v for k, v in r.items() if k in _STORED} for r in runs], f, separators=(",", ":"))


_STORED = ("scenario", "seed", "dataset", "group", "epochs", "final", "samples")


def load(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt") as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="bndoctor bench --out folders")
    parser.add_argument("--stored", type=Path, help="rebuild from records stored by --store")
    parser.add_argument("--store", type=Path, help="write the runs' compact records here (json.gz)")
    parser.add_argument("--update", type=Path)
    args = parser.parse_args()
    runs = load(args.stored) if args.stored else [r for folder in args.runs for r in collect(folder)]
    if args.store:
        store(runs, args.store)
    text = table(runs)
    source = args.stored or args.store or "the runs given"
    publish(text, args.update, f"python benchmarks/alert_calibration.py --stored {source}", key="alert_calibration",
            title="Monitor alerts on labelled runs")  # fmt: skip


if __name__ == "__main__":
    main()

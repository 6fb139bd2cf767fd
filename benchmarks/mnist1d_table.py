"""The MNIST-1D evidence table from a ``bndoctor bench`` results.json: seeds, spreads and paired differences.

    bndoctor bench --scenarios <MNIST-1D scenarios> --seeds 5 --jobs 2 --out bndoctor-out/mnist1d
    python benchmarks/mnist1d_table.py bndoctor-out/mnist1d/results.json --update BENCHMARKS.md

For every scenario: the final-epoch validation accuracy (``--metric last5``:
the mean of the last 5 epochs), mean, sd, min-max over the seeds; then each
remedy against plain BN at the same micro-batch and sampler and against BN
at batch 64, as per-seed (paired: same seed, same initial weights and data
order) differences: mean, sd and on how many seeds
the sign holds. A difference counts as larger than the seed spread when
|mean| exceeds the sd of the paired differences and the sign holds on every
seed. The paper's baselines (Greydanus 2020, test accuracy) are listed
beside the reference model.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _publish import publish

PAPER = "logistic regression 32 %, MLP 68 %, CNN 94 %, GRU 91 %, human 96 % (Greydanus 2020, test accuracy)"


def _pct(values: list[float]) -> list[float]:
    return [100.0 * v for v in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="results.json files (runs of the same seeds merge)")
    parser.add_argument("--update", type=Path)
    parser.add_argument(
        "--metric",
        choices=("final", "last5"),
        default="final",
        help="final-epoch accuracy (default; short runs) or the mean of the last 5 epochs",
    )
    parser.add_argument("--scenarios", nargs="+", metavar="NAME", help="keep only these scenarios (default: all)")
    parser.add_argument(
        "--key", default="mnist1d_table", help="the BENCHMARKS.md section to write (one per results file)"
    )
    args = parser.parse_args()
    data: dict = {"runs": [], "scenarios": [], "seeds": []}
    for path in args.results:
        part = json.loads(path.read_text())
        known = {s["name"] for s in data["scenarios"]}
        data["scenarios"] += [s for s in part["scenarios"] if s["name"] not in known]
        data["runs"] += [r for r in part["runs"] if r["scenario"] not in known]
        data["seeds"] = sorted(set(data["seeds"]) | set(part["seeds"]))
    if args.scenarios:
        data["scenarios"] = [s for s in data["scenarios"] if s["name"] in args.scenarios]
    kept = {s["name"] for s in data["scenarios"] if s.get("dataset", "mnist1d") == "mnist1d"}
    runs: dict[str, dict[int, float]] = {}
    start: list[float] = []  # fine-tuning: the pretrained model's accuracy on the target before any update
    for run in data["runs"]:
        if run["scenario"] not in kept:
            continue
        value = run["final_acc"] if args.metric == "final" else run["last5_mean"]
        runs.setdefault(run["scenario"], {})[run["seed"]] = 100.0 * value
        if run["scenario"] == "m1d-ft-bn-64" and "start_acc" in run.get("extra", {}):
            start.append(100.0 * run["extra"]["start_acc"])
    labels = {
        s["name"]: s["label"] + (", shifted data" if s.get("domain") == "shifted" else "") for s in data["scenarios"]
    }
    lines = [
        f"{len(data['seeds'])} seeds; {'final-epoch' if args.metric == 'final' else 'last-5-epoch'} validation "
        f"accuracy (%) on the 1,000 held-out sequences. Paper baselines: {PAPER}.",
        "",
        "| scenario | setup | mean | sd | min–max |",
        "|---|---|---|---|---|",
    ]
    for name, by_seed in runs.items():
        values = list(by_seed.values())
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(
            f"| {name} | {labels.get(name, '')} | {statistics.fmean(values):.1f} | {sd:.1f} | "
            f"{min(values):.1f}–{max(values):.1f} |"
        )

    if len(start) > 1:
        lines.append(
            f"| (before fine-tuning) | the batch-64 model on the shifted data, no update | "
            f"{statistics.fmean(start):.1f} | {statistics.stdev(start):.1f} | {min(start):.1f}–{max(start):.1f} |"
        )

    def paired(a: str, b: str) -> str:
        if a not in runs or b not in runs:
            return "–"
        seeds = sorted(set(runs[a]) & set(runs[b]))
        diffs = [runs[a][s] - runs[b][s] for s in seeds]
        mean = statistics.fmean(diffs)
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        same_sign = sum((d > 0) == (mean > 0) for d in diffs)
        beyond = len(diffs) >= 3 and abs(mean) > sd and same_sign == len(diffs)
        return f"{mean:+.1f} ± {sd:.1f} ({same_sign}/{len(diffs)}){' **beyond spread**' if beyond else ''}"

    lines += [
        "",
        "Paired differences (percentage points, mean ± sd over seeds, seeds with the same sign):",
        "",
        "| remedy | vs plain BN, same micro-batch and sampler | vs BN at batch 64 |",
        "|---|---|---|",
    ]
    for name in runs:
        if name.startswith("m1d-ft-"):
            # fine-tuning: against BN left in training mode at the same micro-batch, and the batch-64 fine-tune
            if name not in ("m1d-ft-bn-64", "m1d-ft-bn-train-2x32-corr"):
                lines.append(
                    f"| {name} | {paired(name, 'm1d-ft-bn-train-2x32-corr')} | {paired(name, 'm1d-ft-bn-64')} |"
                )
            continue
        if "-2x8x4-" in name:  # DDP: against local BN on the same ranks and micro-batches
            if name != "m1d-bn-2x8x4-corr":
                lines.append(f"| {name} | {paired(name, 'm1d-bn-2x8x4-corr')} | {paired(name, 'm1d-bn-64')} |")
            continue
        if "-2x32-" not in name or (name.startswith("m1d-bn-2x32-") and "recal" not in name):
            continue
        sampler = "corr" if "-corr" in name else "iid"
        lines.append(f"| {name} | {paired(name, f'm1d-bn-2x32-{sampler}')} | {paired(name, 'm1d-bn-64')} |")
    if "m1d-ft-bn-train-2x32-corr" in runs:
        no_remedy = paired("m1d-ft-bn-train-2x32-corr", "m1d-ft-bn-64")
        lines.append(f"| m1d-ft-bn-train-2x32-corr (no remedy) | – | {no_remedy} |")
    if "m1d-bn-2x8x4-corr" in runs:
        lines.append(f"| m1d-bn-2x8x4-corr (no remedy) | – | {paired('m1d-bn-2x8x4-corr', 'm1d-bn-64')} |")
    if "m1d-bn-2x32-iid" in runs:
        lines.append(f"| m1d-bn-2x32-iid (no remedy) | – | {paired('m1d-bn-2x32-iid', 'm1d-bn-64')} |")
    for tag in ("corr", "iid"):
        ours = f"m1d-accbn-renorm-2x32-{tag}"
        others = [f"m1d-gn-2x32-{tag}", f"m1d-brn-2x32-{tag}"]
        others += [f"m1d-accbn-{mode}-2x32-{tag}" for mode in ("progressive", "blend", "2pass")]
        for other in others:
            if ours in runs and other in runs:
                lines.append(f"| {other} against {ours} | {paired(other, ours)} | – |")
        # the exact mode against the one-pass mode and the remedies it must beat
        for passes in ("1", "2", ""):
            exact = f"m1d-accbn-exact{passes}-2x32-{tag}"
            for other in (ours, f"m1d-gn-2x32-{tag}", f"m1d-brn-2x32-{tag}"):
                if exact in runs and other in runs:
                    lines.append(f"| {exact} against {other} | {paired(exact, other)} | – |")
    ours = "m1d-ft-accbn-renorm-2x32-corr"  # fine-tuning: the other remedies against accumulation-aware BN
    others = ["m1d-ft-gn-2x32-corr", "m1d-ft-brn-2x32-corr", "m1d-ft-bn-frozen-2x32-corr"]
    others += ["m1d-ft-accbn-exact1-2x32-corr", "m1d-ft-accbn-exact-2x32-corr"]
    for other in others:
        if ours in runs and other in runs:
            lines.append(f"| {other} against {ours} | {paired(other, ours)} | – |")
    exact = "m1d-ft-accbn-exact-2x32-corr"  # fine-tuning: the exact mode against the remedies that keep up
    for other in ("m1d-ft-gn-2x32-corr", "m1d-ft-bn-frozen-2x32-corr"):
        if exact in runs and other in runs:
            lines.append(f"| {exact} against {other} | {paired(exact, other)} | – |")
    if "m1d-bn-2x32-corr" in runs:
        lines.append(f"| m1d-bn-2x32-corr (no remedy) | – | {paired('m1d-bn-2x32-corr', 'm1d-bn-64')} |")
    publish(
        "\n".join(lines),
        args.update,
        f"python benchmarks/mnist1d_table.py {' '.join(map(str, args.results))} --metric {args.metric} "
        + (f"--scenarios {' '.join(args.scenarios)} " if args.scenarios else "")
        + f"--key {args.key}",
        key=args.key,
        title=f"MNIST-1D: seeds, spreads and paired differences ({args.key})",
    )


if __name__ == "__main__":
    main()

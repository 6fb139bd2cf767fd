"""Time of ``bndoctor.check`` with an input shape on a ResNet-50-sized model (target < 2 s).

Cold: a fresh Python process that imports bndoctor, builds the model and runs
one check (the time of the check call only; the first forward on meta
tensors imports parts of torch once per process). Warm: median of later
calls in the same process.

    python benchmarks/bench_check.py --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from _publish import publish

SETUP = "bndoctor.TrainingSetup(micro_batch=2, accum_steps=32, world_size=4)"
SNIPPET = f"""
import json, time, torch, bndoctor
from bndoctor.models import resnet50
torch.set_num_threads(1)
model = resnet50()
times = []
for _ in range({{calls}}):
    start = time.perf_counter()
    report = bndoctor.check(model, {SETUP}, input_shape=(3, 224, 224))
    times.append(time.perf_counter() - start)
print(json.dumps({{{{"times": times, "params": sum(p.numel() for p in model.parameters()),
                   "codes": report.codes(), "layers": report.bn_layers}}}}))
"""


def _run(calls: int) -> dict:
    out = subprocess.run([sys.executable, "-c", SNIPPET.format(calls=calls)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=5, help="fresh processes for the cold time")
    parser.add_argument("--update", type=Path)
    args = parser.parse_args()
    runs = [_run(calls=6) for _ in range(args.processes)]
    cold = [r["times"][0] for r in runs]
    warm = [t for r in runs for t in r["times"][1:]]
    info = runs[0]
    lines = [
        f"torch {torch.__version__}, {platform.machine()}, 1 thread. `bndoctor.check(resnet50(), {SETUP}, "
        f"input_shape=(3, 224, 224))`: {info['params'] / 1e6:.1f}M parameters, {info['layers']} BN layers, "
        f"findings {', '.join(info['codes'])}; {args.processes} fresh processes.",
        "",
        "| call | median s | max s | target |",
        "|---|---|---|---|",
        f"| first in a fresh process (cold) | {statistics.median(cold):.2f} | {max(cold):.2f} | < 2 s |",
        f"| later calls (warm) | {statistics.median(warm):.3f} | {max(warm):.3f} | < 2 s |",
    ]
    text = "\n".join(lines)
    publish(
        text,
        args.update,
        f"python benchmarks/bench_check.py --processes {args.processes}",
        key="bench_check",
        title="bndoctor check: time on a ResNet-50-sized model",
    )


if __name__ == "__main__":
    main()

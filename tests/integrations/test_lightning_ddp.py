"""Lightning under DDP on gloo (2 processes): the monitor samples, the layer-sync plugin syncs, metrics are logged.

Each case runs tests/integrations/lightning_ddp_run.py in a fresh interpreter (the
``ddp`` strategy re-launches the script it runs), with a timeout so that a
hang fails fast.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

SCRIPT = Path(__file__).with_name("lightning_ddp_run.py")


def _run(tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "bn_monitor.jsonl").read_text().splitlines()]
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        logged = list(csv.DictReader(f))
    return result, records, logged, done.stderr


def test_monitor_samples_once_per_batch_under_ddp_and_reports_rank_divergence(tmp_path):
    result, records, logged, stderr = _run(tmp_path, "ddp", "2")
    # 64 samples / 2 ranks / batch 4 = 8 batches per rank; training_step calls self(x) inside the DDP call
    assert result["forwards"] == 8 and result["samples"] == 4
    kinds = [r["kind"] for r in records]
    assert kinds.count("start") == 1 and kinds.count("sample") == 4  # rank zero writes
    divergence = [r["max"] for r in records if r["kind"] == "divergence"]
    assert len(divergence) == 4 and all(d > 0 for d in divergence)  # local BN: the ranks drift apart
    assert result["seen"]["classes"] == ["BatchNorm2d"]
    # metrics reached the user's logger (CSVLogger), not only the run file
    effective = [row["bn/effective_batch_min"] for row in logged if row.get("bn/effective_batch_min")]
    assert len(effective) == 4 and any(row.get("bn/rank_divergence") for row in logged)
    # alerts are grouped: one line for the code, not one per layer
    lines = [line for line in stderr.splitlines() if "BN101" in line and "bndoctor check" not in line]
    assert len(lines) == 1 and "BN101 error (model)" in lines[0]  # one line, on rank zero
    # check ran once (rank zero logs) with the setup the trainer knows
    checked = [line for line in stderr.splitlines() if "bndoctor check (lightning, micro-batch 4" in line]
    assert len(checked) == 1 and "x 2 ranks" in checked[0] and "BN104" in checked[0]


def test_layer_sync_plugin_keeps_accumulation_aware_bn_and_pools_ranks(tmp_path):
    result, records, _, _ = _run(tmp_path, "ddp", "2", "--sync", "--accum")
    # while training: still accumulation-aware, pooled across ranks, windows closed by the trainer's optimizer
    assert result["seen"] == {"classes": ["AccumBatchNorm"], "synced": [True], "controlled": [True]}
    divergence = [r["max"] for r in records if r["kind"] == "divergence"]
    assert len(divergence) == 4 and max(divergence) < 1e-6  # synced statistics: every rank holds the same
    assert result["after"] == ["AccumBatchNorm"] and result["after_synced"] == [False]  # reverted at teardown


def test_layer_sync_plugin_under_ddp_spawn_and_reverted_after_fit(tmp_path):
    result, records, _, _ = _run(tmp_path, "ddp_spawn", "2", "--sync")
    assert result["forwards"] == 8 and result["samples"] == 4
    assert result["seen"]["classes"] == ["SyncBatchNorm"] and result["after"] == ["BatchNorm2d"]
    assert max(r["max"] for r in records if r["kind"] == "divergence") < 1e-6

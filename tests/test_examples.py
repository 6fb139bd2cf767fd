"""The DDP + SyncBatchNorm example runs under torchrun (2 gloo ranks)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ddp_syncbn_example_under_torchrun():
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(ROOT / "examples" / "ddp_syncbn.py"),
        "--steps",
        "2",
        "--accum",
        "2",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "world 2: val accuracy" in out.stdout and "divergence 0.00e+00" in out.stdout


def test_tiny_batch_workflow_example(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "tiny_batch_workflow.py"),
        "--epochs",
        "1",
        "--accum",
        "8",
        "--out",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BN101" in out.stdout and "fix: to_accum_bn" in out.stdout and "after recalibration" in out.stdout
    assert (tmp_path / "bn_monitor.jsonl").exists() and (tmp_path / "model.pt").exists()
    import torch

    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "stem.1.running_mean" in state

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

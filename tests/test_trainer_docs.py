"""The complete examples in docs/trainers/ run as written (Lightning DDP, HF Trainer, Accelerate, torchrun)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TRAINERS = Path(__file__).resolve().parents[1] / "docs" / "trainers"


def _example(page):
    blocks = re.findall(r"```python\n(.*?)```", (TRAINERS / page).read_text(), flags=re.S)
    assert len(blocks) == 1, f"{page} should hold one complete example"
    return blocks[0]


# Appended to each example: every process says that the page's code ran to its last line.
_FINISHED = "\nimport os as _os\nprint('page finished on rank', _os.environ.get('RANK', '0'), flush=True)\n"
# torch's own tear-down after DDP on gloo: at interpreter exit a process can abort with this message after the
# script's last line. Measured here: 3 of 55 runs of the torchrun page, and 3 of 33 runs of a plain DDP + gloo
# script without bndoctor (torch 2.13; DDP keeps the group's gloo threads alive past destroy_process_group)
_TEARDOWN_ABORT = "terminate called without an active exception"


def _run(tmp_path, page, *launcher, ranks=1, timeout=240):
    """Run the page's example; it passes if it exits cleanly, or if every rank finished the page's code and
    only torch's process tear-down aborted afterwards (the same rule as tests/_dist.run_ranks)."""
    script = tmp_path / "train.py"
    script.write_text(_example(page) + _FINISHED)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # torchrun, unactivated
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PATH": path}
    done = subprocess.run(
        [*launcher, str(script)], capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env
    )
    finished = {f"page finished on rank {r}" for r in range(ranks)}
    torn_down = _TEARDOWN_ABORT in done.stderr and finished <= set(done.stdout.splitlines())
    assert done.returncode == 0 or torn_down, done.stderr[-3000:]
    return done


def _samples(path):
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r["kind"] == "sample"]


def test_lightning_page_trains_on_two_processes_with_the_plugin_and_the_callback(tmp_path):
    pytest.importorskip("lightning")
    _run(tmp_path, "lightning.md", sys.executable)
    # 256 samples / 2 ranks / batch 2 = 64 batches per rank, one in 8 sampled; the run file is in the logger's folder
    assert len(_samples(tmp_path / "lightning_logs" / "version_0" / "bn_monitor.jsonl")) == 8
    # the metrics reached Lightning's default logger (TensorBoard when installed, else CSV)
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        accumulator = EventAccumulator(str(events[0].parent))
        accumulator.Reload()
        assert "bn/effective_batch_min" in accumulator.Tags()["scalars"]
    else:
        (metrics,) = tmp_path.rglob("metrics.csv")
        assert "bn/effective_batch_min" in metrics.read_text().splitlines()[0]


def test_huggingface_page_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.chdir(tmp_path)
    env: dict = {}
    try:
        exec(compile(_example("huggingface.md"), "huggingface.md", "exec"), env)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert env["callback"].attached[0].steps == 4
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_accelerate_page_runs(tmp_path):
    pytest.importorskip("accelerate")
    done = _run(tmp_path, "accelerate.md", sys.executable)
    assert "16 optimizer steps" in done.stdout


def test_torchrun_page_runs_on_two_processes(tmp_path):
    done = _run(tmp_path, "torchrun.md", sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", ranks=2)  # fmt: skip
    assert "8 steps; running statistics differ across ranks by 0.0e+00" in done.stdout
    assert _samples(tmp_path / "bn_monitor.jsonl")


def test_torchrun_page_runs_under_watch(tmp_path):
    """The page's shell block: the same script, unchanged, under ``bndoctor watch -- torchrun ...``."""
    done = _run(tmp_path, "torchrun.md", sys.executable, "-m", "bndoctor", "watch", "--", "torchrun", "--standalone",
                "--nproc-per-node", "2", ranks=2)  # fmt: skip
    assert "bndoctor watch: ResNet" in done.stdout and "on 2 ranks" in done.stdout
    assert (tmp_path / "bndoctor-watch.jsonl").stat().st_size > 0

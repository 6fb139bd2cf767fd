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


def _run(tmp_path, page, *launcher, timeout=240):
    script = tmp_path / "train.py"
    script.write_text(_example(page))
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # torchrun, unactivated
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PATH": path}
    done = subprocess.run(
        [*launcher, str(script)], capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _samples(path):
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r["kind"] == "sample"]


def test_lightning_page_trains_on_two_processes_with_the_plugin_and_the_callback(tmp_path):
    pytest.importorskip("lightning")
    _run(tmp_path, "lightning.md", sys.executable)
    # 256 samples / 2 ranks / batch 2 = 64 batches per rank, one in 8 sampled
    assert len(_samples(tmp_path / "bn_monitor.jsonl")) == 8
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
                "--nproc-per-node", "2")  # fmt: skip
    assert "8 steps; running statistics differ across ranks by 0.0e+00" in done.stdout
    assert _samples(tmp_path / "bn_monitor.jsonl")


def test_torchrun_page_runs_under_watch(tmp_path):
    """The page's shell block: the same script, unchanged, under ``bndoctor watch -- torchrun ...``."""
    done = _run(tmp_path, "torchrun.md", sys.executable, "-m", "bndoctor", "watch", "--", "torchrun", "--standalone",
                "--nproc-per-node", "2")  # fmt: skip
    assert "bndoctor watch: ResNet" in done.stdout and "on 2 ranks" in done.stdout
    assert (tmp_path / "bndoctor-watch.jsonl").stat().st_size > 0

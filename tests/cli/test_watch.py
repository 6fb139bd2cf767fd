"""``bndoctor watch``: an unmodified training script (plain, and torchrun DDP) monitored through global hooks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

from bndoctor.cli import main
from bndoctor.integrations.watch import Watcher

SCRIPTS = Path(__file__).with_name("watch_scripts")


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _watch(tmp_path, *args, env=None, timeout=180):
    command = [sys.executable, "-m", "bndoctor", "watch", *args]
    # the venv's scripts (torchrun) on PATH, as in an activated venv; CI runs .venv/bin/python without activating
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    merged = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path, **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=merged)


def test_watch_monitors_a_plain_script_and_keeps_its_exit_code(tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    code = main(
        ["watch", "--every", "4", "--warmup", "0", "--out", str(out), "--", str(SCRIPTS / "plain_train.py"), "3"]
    )
    assert code == 3  # the script's own exit code
    text = capsys.readouterr().out
    assert "bndoctor watch: Sequential, 2 BN layer(s): 30 sample(s)" in text and "exit code 3" in text
    assert "BN101 error (model): the samples of each micro-batch share" in text  # warmup 0: lagging statistics
    records = _records(out)
    start = records[0]
    assert start["kind"] == "start" and start["layers"] == ["1", "4"] and start["world_size"] == 1
    samples = [r for r in records if r["kind"] == "sample"]
    # 30 steps x 4 micro-batches = 120 training forwards, one in 4 sampled; the final eval forward is not counted
    assert len(samples) == 30 and samples[-1]["forward"] == 117 and samples[-1]["step"] == 29
    noise = [r for r in records if r["kind"] == "noise"]
    # the accumulation (4 forwards per step) is found after 3 steps; micro-batch 2 x 4 = 8
    assert len(noise) == 27 and {r["logical_batch"] for r in noise} == {8}
    assert all(r["g2_small"] > r["g2_big"] > 0 for r in noise)  # small-batch gradients are noisier


def test_watch_runs_torchrun_ddp_with_every_rank_monitoring(tmp_path):
    script = SCRIPTS / "ddp_train.py"
    done = _watch(
        tmp_path,
        "--every", "2", "--warmup", "0", "--divergence-every", "2", "--format", "json",
        "--", "torchrun", "--standalone", "--nproc-per-node", "2", str(script),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    assert summary["world_size"] == 2 and summary["samples"] == 20 and summary["exit_code"] == 0
    records = _records(tmp_path / "bndoctor-watch.jsonl")
    assert sum(r["kind"] == "start" for r in records) == 1  # rank zero writes; the other rank monitors too
    divergence = [r["max"] for r in records if r["kind"] == "divergence"]
    assert len(divergence) == 10 and min(divergence) > 0  # each rank sees its own data: local BN drifts
    noise = [r for r in records if r["kind"] == "noise"]
    assert noise and {r["logical_batch"] for r in noise} == {8}  # 2 per micro-batch x 2 steps x 2 ranks


def test_watch_runs_a_module_and_reports_when_nothing_was_monitored(tmp_path):
    (tmp_path / "no_bn.py").write_text("import torch\nprint(torch.nn.Linear(2, 2)(torch.ones(1, 2)).shape)\n")
    done = _watch(tmp_path, "--", "-m", "no_bn", env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "torch.Size([1, 2])" in done.stdout and "nothing was monitored" in done.stdout


def test_watch_errors_are_one_line_with_a_hint(tmp_path):
    done = _watch(tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("bndoctor: error: watch needs a command")
    assert "Traceback" not in done.stderr
    done = _watch(tmp_path, "--", "no-such-program-here")
    assert done.returncode != 0 and "no such program" in done.stderr and "Traceback" not in done.stderr


def test_watch_never_replaces_a_file_that_is_not_a_run_file(tmp_path, capsys):
    """`watch --out train.py -- python train.py` used to truncate the script; a run file is replaced as before."""
    script = tmp_path / "train.py"
    script.write_text("print('training')\n")
    for out in (script, tmp_path / "notes.txt"):
        if out != script:
            out.write_text('{"kind": "sample"}\nnot a run\n')
        before = out.read_bytes()
        code = main(["watch", "--out", str(out), "--", sys.executable, str(script)])
        err = capsys.readouterr().err
        assert code == 2 and out.read_bytes() == before
        assert "is not a bndoctor run file" in err and "--overwrite" in err and len(err.strip().splitlines()) == 2
    (tmp_path / "f").write_text("a file")
    assert main(["watch", "--out", str(tmp_path / "f" / "run.jsonl"), "--", sys.executable, str(script)]) == 2
    assert "is a file" in capsys.readouterr().err
    run = tmp_path / "run.jsonl"
    run.write_text(json.dumps({"kind": "start", "bndoctor": "0"}) + "\n")  # an earlier run: replaced
    assert main(["watch", "--out", str(run), "--", sys.executable, str(script)]) == 0
    assert main(["watch", "--out", str(script), "--overwrite", "--", sys.executable, "-c", "pass"]) == 0
    assert script.read_text() == ""  # asked for: replaced by this run's (empty) records


def test_watcher_adopts_models_with_bn_only_and_removes_its_hooks(tmp_path):
    from torch.nn.modules import module as torch_module

    before = (len(torch_module._global_forward_pre_hooks), len(torch_module._global_forward_hooks))
    watcher = Watcher({"out": str(tmp_path / "run.jsonl"), "every": 1, "warmup": 0}).install()
    try:
        net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        head = nn.Linear(4, 2)  # no BN: not monitored
        for _ in range(3):
            head(net(torch.randn(8, 4)))
        assert len(watcher.cores) == 1 and watcher.cores[0][1].monitor.forwards == 3
        assert watcher.cores[0][1].monitor.samples == 3  # the inner Linear/BN calls are not outer forwards
    finally:
        watcher.close()
    assert (len(torch_module._global_forward_pre_hooks), len(torch_module._global_forward_hooks)) == before
    assert sum(r["kind"] == "sample" for r in _records(tmp_path / "run.jsonl")) == 3

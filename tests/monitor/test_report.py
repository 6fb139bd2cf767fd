"""The monitor report: from a JSONL run to Markdown, HTML and plots; `bndoctor report`."""

import json

import pytest
import torch

import bndoctor as bd
from bndoctor.cli import main
from bndoctor.models import tiny_resnet
from bndoctor.monitor import BNMonitor
from bndoctor.monitor.report import load_run, write_run_report


def _run(path, steps=12):
    torch.manual_seed(0)
    model = tiny_resnet()
    with BNMonitor(model, every=2, sink=path, warmup=0, window=2):
        for i in range(steps):
            x = torch.randn(2, 1, 8, 8) + (i % 10)  # two alike samples, far apart between steps
            model(x)
    return path


def test_report_files_tables_and_plots(tmp_path):
    run = load_run(_run(tmp_path / "run.jsonl"))
    assert len(run.samples) == 6 and len(run.layers) == 9 and run.alerts
    md = write_run_report(run, tmp_path / "out")
    text = md.read_text()
    assert "## Alerts" in text and "BN101" in text and "| stem.1 |" in text
    assert "![effective normalisation batch" in text
    for name in ("report.html", "monitor-neff.png", "monitor-drift.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000
    assert "<table>" in (tmp_path / "out" / "report.html").read_text()


def test_bad_files_are_refused_with_a_hint(tmp_path):
    with pytest.raises(bd.BNDoctorError, match="no monitor file"):
        load_run(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "start"}\nnot json\n')
    with pytest.raises(bd.BNDoctorError, match="line 2 is not JSON"):
        load_run(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(bd.BNDoctorError, match="no monitor records"):
        load_run(empty)


def test_cli_report(tmp_path, capsys):
    path = _run(tmp_path / "run.jsonl")
    assert main(["report", str(path), "--out", str(tmp_path / "r"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "6 samples of 9 BN layer(s)" in out and "BN101" in out and (tmp_path / "r" / "report.md").exists()
    assert main(["report", str(path), "--format", "json", "--no-plots"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["samples"] == 6 and (tmp_path / "run" / "report.md").exists()  # default: next to the run
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 2
    assert "no monitor file" in capsys.readouterr().err


def test_divergence_records_are_plotted(tmp_path):
    path = tmp_path / "run.jsonl"
    lines = [
        {"kind": "start", "layers": ["bn"], "every": 1, "world_size": 2, "model": "M"},
        {"kind": "sample", "step": 1, "layers": {"bn": {"n_eff": 3.0, "drift_mean": None, "collapsed": 0.0}}},
        {"kind": "divergence", "step": 1, "max": 0.4, "layers": {"bn": {"mean_max": 0.4, "var_max": 0.1}}},
    ]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    write_run_report(load_run(path), tmp_path / "out")
    assert (tmp_path / "out" / "monitor-divergence.png").exists()
    assert "world size 2" in (tmp_path / "out" / "report.md").read_text()


def test_harness_monitor_alerts_on_correlated_micro_batches_not_at_batch_64(tmp_path):
    import dataclasses

    from bndoctor.bench import SCENARIOS, run_scenario

    corr, _ = run_scenario(dataclasses.replace(SCENARIOS["bn-2x32-corr"], epochs=1), 0)
    assert "BN101" in corr.extra["monitor"]["alerts"]
    ref, _ = run_scenario(SCENARIOS["bn-64"], 0)
    assert ref.extra["monitor"]["alerts"] == []
    gn, _ = run_scenario(dataclasses.replace(SCENARIOS["gn-64"], epochs=1), 0)
    assert "monitor" not in gn.extra


def test_noise_records_are_reported(tmp_path):
    path = tmp_path / "run.jsonl"
    lines = [{"kind": "start", "layers": ["bn"], "every": 1, "model": "M"}]
    lines += [{"kind": "noise", "step": i, "b_simple": 40.0 + i, "alpha": 1.6, "logical_batch": 8} for i in range(5)]
    lines += [{"kind": "sample", "step": 1, "layers": {"bn": {"n_eff": 30.0, "drift_mean": None, "collapsed": 0}}}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    write_run_report(load_run(path), tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "last B_simple 44 for a logical batch of 8, tail index 1.60" in text
    assert (tmp_path / "out" / "monitor-noise.png").exists()

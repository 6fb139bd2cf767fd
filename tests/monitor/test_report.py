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

    corr, _ = run_scenario(dataclasses.replace(SCENARIOS["bn-2x32-corr"], epochs=2), 0)
    assert "BN101" in corr.extra["monitor"]["alerts"]
    first = [r["step"] for r in corr.extra["monitor"]["records"] if r["kind"] == "alert"]
    assert first and first[0] <= 1438 // 64  # within the first epoch's optimizer steps
    for healthy in ("bn-2x32-iid", "accbn-renorm-2x32-corr"):  # shuffled micro-batches of 2; the prescribed fix
        run, _ = run_scenario(dataclasses.replace(SCENARIOS[healthy], epochs=2), 0)
        assert run.extra["monitor"]["alerts"] == [], healthy
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
    assert "B_simple over the last steps 42 for a logical batch of 8, tail index 1.60" in text  # median of 40-44
    assert (tmp_path / "out" / "monitor-noise.png").exists()


def test_a_noise_scale_that_is_not_measurable_reads_the_same_in_watch_report_and_plot(tmp_path, monkeypatch):
    """Mostly unresolved estimates (inf) with a few huge finite ones: every output says 'not measurable'."""
    from bndoctor.cli.watch import WatchResult, _summarise
    from bndoctor.monitor import report

    path = tmp_path / "run.jsonl"
    values = [float("inf"), 3e7, float("inf"), float("inf"), 2e5, float("inf"), float("inf")]
    lines = [{"kind": "start", "layers": ["bn"], "every": 1, "model": "M"}]
    lines += [{"kind": "noise", "step": i, "b_simple": v, "logical_batch": 64} for i, v in enumerate(values)]
    lines += [{"kind": "sample", "step": 1, "layers": {"bn": {"n_eff": 3.0, "drift_mean": None, "collapsed": 0}}}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    titles = []
    real_finish = report._finish
    monkeypatch.setattr(report, "_finish", lambda fig, ax, out, name, x, y, title, legend: (
        titles.append(title), real_finish(fig, ax, out, name, x, y, title, legend)))  # fmt: skip
    write_run_report(load_run(path), tmp_path / "out")
    assert "B_simple over the last steps not measurable" in (tmp_path / "out" / "report.md").read_text()
    assert any("B_simple: not measurable" in t and "5 of 7 steps had no estimate" in t for t in titles)
    summary = _summarise(WatchResult(command=["train.py"], exit_code=0, out=path))
    assert summary.noise["b_simple"] is None and "gradient noise scale: not measurable" in summary.to_text()


def _write(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


START = {"kind": "start", "layers": ["bn"], "every": 1, "model": "Net"}


def test_the_files_bndoctor_writes_with_non_finite_values_render(tmp_path, capsys):
    from bndoctor.cli import main

    run = _write(tmp_path / "r.jsonl", START, {"kind": "noise", "step": 1, "b_simple": "inf", "logical_batch": 64})
    assert main(["report", str(run), "--no-plots"]) == 0
    assert "B_simple over the last steps not measurable" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"kind": "sample", "layers": {}}, "a 'sample' record needs 'step'"),
        ({"kind": "noise", "step": 1, "b_simple": None, "logical_batch": 8}, "needs 'b_simple'"),
        ({"kind": "alert", "step": 3, "finding": {"code": "BN101"}}, "needs a string 'severity'"),
    ],
)
def test_records_with_missing_or_null_fields_are_one_line_errors(tmp_path, capsys, record, message):
    from bndoctor.cli import main

    run = _write(tmp_path / "r.jsonl", START, record)
    assert main(["report", str(run), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert message in err and "line 2" in err and "Traceback" not in err


def test_out_at_a_file_or_a_run_without_suffix(tmp_path, capsys):
    from bndoctor.cli import main

    run = _write(tmp_path / "RUN", START)
    assert main(["report", str(run), "--no-plots"]) == 0 and (tmp_path / "RUN-report" / "report.md").is_file()
    for out in (run, run / "sub"):
        assert main(["report", str(run), "--out", str(out), "--no-plots"]) == 2
        assert "is a file" in capsys.readouterr().err


def test_a_reused_sink_path_reports_the_last_run_and_says_so(tmp_path):
    sample = {"kind": "sample", "step": 1, "layers": {"bn": {"n_eff": 3.0}}}
    run = load_run(_write(tmp_path / "r.jsonl", START, sample, sample, {**START, "model": "Second"}, sample))
    assert run.runs_in_file == 2 and run.start["model"] == "Second" and len(run.samples) == 1
    text = write_run_report(run, tmp_path / "out", plots=False).read_text()
    assert "holds 2 runs" in text


def test_layer_names_are_escaped_in_the_markdown_report(tmp_path):
    start = {**START, "layers": ["<img src=x onerror=alert(1)>"]}
    sample = {"kind": "sample", "step": 1, "layers": {"<img src=x onerror=alert(1)>": {"n_eff": 3.0}}}
    text = write_run_report(load_run(_write(tmp_path / "r.jsonl", start, sample)), tmp_path / "o", plots=False)
    assert "<img" not in text.read_text() and "&lt;img" in text.read_text()


def test_html_report_embeds_valid_images_and_stands_alone(tmp_path):
    import base64
    import io
    import re

    import matplotlib.image

    write_run_report(load_run(_run(tmp_path / "run.jsonl")), tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    for source in sources:  # each decodes to a real PNG (a broken image would not)
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(source.split(",", 1)[1])), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    # moved alone, the page still shows its images: nothing refers to a file beside it
    moved = tmp_path / "elsewhere" / "report.html"
    moved.parent.mkdir()
    moved.write_text(page)
    assert '.png"' not in page and 'src="monitor-' not in page


def test_many_layers_are_plotted_as_at_most_eight_stages():
    from bndoctor.models import resnet50
    from bndoctor.monitor.report import MAX_LINES, rolling_median, stages

    names = [r.name for r in bd.find_bn(resnet50())]
    groups = stages(names)
    assert len(names) == 53 and 2 <= len(groups) <= MAX_LINES
    assert sorted(n for members in groups.values() for n in members) == sorted(names)  # every layer in one stage
    assert {len(m) for k, m in groups.items() if k.startswith("layers.")} == {10, 13, 19}
    assert stages(["a.bn", "b.bn"]) == {"a.bn": ["a.bn"], "b.bn": ["b.bn"]}  # few layers: one line each
    # the plotted statistic is the alert's: the median of the last `window` samples
    assert rolling_median([1.0, 9.0, 2.0, 8.0, 3.0], 3) == [1.0, 5.0, 2.0, 8.0, 3.0]

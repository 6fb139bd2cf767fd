import json

from bndoctor.cli import main


def test_list(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "bn-2x32-corr" in out and "sweep-gn-2" in out


def _quick_bench(out, *extra):
    """One scenario, one seed, one epoch: a bench run that takes a few seconds."""
    argv = ["bench", "--scenarios", "bn-64", "--seeds", "1", "--epochs", "1", "--jobs", "1", "--out", str(out)]
    return main([*argv, "--quiet", "--no-plots", *extra])


def test_bench_json_and_files(capsys, tmp_path):
    assert _quick_bench(tmp_path, "--format", "json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in data["scenarios"]] == ["bn-64"]
    assert (tmp_path / "results.json").exists() and (tmp_path / "report.md").exists()
    assert data["files"]["plots"] == []


def test_demo_end_to_end(capsys, tmp_path):
    assert main(["demo", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "bndoctor demo" in captured.out and "What it shows" in captured.out
    assert "predicts the problem" in captured.out and "BN101 error" in captured.out  # check before training
    assert "ft-bn-frozen-2x32-corr" in captured.out
    assert "m1d-demo-accbn-2x32-corr" in captured.out  # the MNIST-1D line (mnist1d is a dev dependency)
    assert "MNIST-1D (harder than digits; the paper's CNN reaches 94%), 1 epoch," in captured.out
    assert "100%" in captured.err  # progress bar
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_demo_without_mnist1d_says_how_to_get_its_line(capsys, tmp_path, monkeypatch):
    import bndoctor.cli.bench as bench_cli

    monkeypatch.setattr(bench_cli, "_has_mnist1d", lambda: False)
    monkeypatch.setattr(bench_cli, "DEMO_INTRO", "demo")
    from bndoctor import bench

    monkeypatch.setattr(bench, "DEMO", ("bn-64",))
    assert main(["demo", "--epochs", "1", "--seeds", "1", "--no-plots", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pip install 'bndoctor[demo]'" in out and "m1d-demo" not in out


def test_bad_input_is_one_line(capsys):
    assert main(["bench", "--scenarios", "nope", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown scenario 'nope'" in err and "hint:" in err and "Traceback" not in err
    try:
        main(["bench", "--seeds", "0"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_render_rewrites_report_from_results(capsys, tmp_path):
    assert _quick_bench(tmp_path) == 0
    (tmp_path / "report.md").unlink()
    assert main(["bench", "--render", str(tmp_path), "--no-plots"]) == 0
    assert "| bn-64 |" in (tmp_path / "report.md").read_text()
    capsys.readouterr()
    assert main(["bench", "--render", str(tmp_path / "nowhere")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_an_earlier_run_is_not_overwritten_silently(capsys, tmp_path):
    assert _quick_bench(tmp_path) == 0
    before = (tmp_path / "results.json").read_text()
    assert _quick_bench(tmp_path) == 2
    err = capsys.readouterr().err
    assert "already holds the results of a run" in err and "--overwrite" in err
    assert (tmp_path / "results.json").read_text() == before
    assert _quick_bench(tmp_path, "--overwrite") == 0


def test_a_corrupt_results_file_is_a_one_line_error(capsys, tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    assert main(["bench", "--render", str(tmp_path), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "is not JSON" in err and "internal error" not in err
    (tmp_path / "results.json").write_text('{"scenarios": [{"nam": 1}]}')
    assert main(["bench", "--render", str(tmp_path), "--no-plots"]) == 2
    assert "is not a results.json written by bndoctor bench" in capsys.readouterr().err

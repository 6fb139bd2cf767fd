"""``[tool.bndoctor]`` in pyproject.toml: settings for ``bndoctor check``, overridden by the command line."""

import json

import pytest

from bndoctor.cli import main


def _project(tmp_path, table):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "demo"\n\n[tool.bndoctor]\n' + table)
    sub = tmp_path / "src" / "pkg"
    sub.mkdir(parents=True)
    return sub


def _check(capsys, *args):
    code = main(["check", "tiny-resnet", "--format", "json", *args])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out else None), out.err


def test_settings_come_from_the_nearest_pyproject(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_project(tmp_path, 'micro-batch = 2\naccum = 32\nselect = ["bn101"]\n'))
    code, report, _ = _check(capsys)
    assert code == 1 and report["config"] == str(tmp_path / "pyproject.toml")
    assert report["setup"]["micro_batch"] == 2 and report["setup"]["accum_steps"] == 32
    assert [f["code"] for f in report["findings"]] == ["BN101"]  # BN103 left out (select is case-insensitive)


def test_the_command_line_wins_and_isolated_reads_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_project(tmp_path, "micro-batch = 2\naccum = 32\n"))
    code, report, _ = _check(capsys, "--micro-batch", "64", "--accum", "1")
    assert code == 0 and report["setup"]["micro_batch"] == 64
    code, report, _ = _check(capsys, "--isolated")
    assert code == 0 and report["setup"] is None and report["config"] is None


def test_explicit_config_file(tmp_path, monkeypatch, capsys):
    config = tmp_path / "elsewhere.toml"
    config.write_text("[tool.bndoctor]\nmicro_batch = 4\nfinetune = true\n")  # underscores work too
    monkeypatch.chdir(tmp_path)
    _, report, _ = _check(capsys, "--config", str(config))
    assert report["setup"]["micro_batch"] == 4 and report["setup"]["finetune"] is True


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("micro-batch = 0\n", "micro-batch must be a positive integer (got 0)"),
        ("precision = 'fp8'\n", "precision must be 'fp32' or 'fp16' or 'bf16'"),
        ("selct = ['BN1']\n", "unknown key 'selct'"),
        ("input-shape = '3,8,8'\n", "input-shape must be a list of positive integers"),
        ("micro-batch = \n", "is not valid TOML"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_file_and_key(tmp_path, monkeypatch, capsys, table, message):
    monkeypatch.chdir(_project(tmp_path, table))
    code, _, err = _check(capsys)
    assert code == 2 and message in err and "pyproject.toml" in err and "Traceback" not in err
    assert "hint:" in err


def test_missing_config_file_is_an_error(tmp_path, capsys):
    code, _, err = _check(capsys, "--config", str(tmp_path / "nope.toml"))
    assert code == 2 and "no configuration file" in err


def test_an_unknown_code_in_the_config_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_project(tmp_path, 'micro-batch = 2\nselect = ["XX9"]\n'))
    code, report, err = _check(capsys)
    assert code == 2 and report is None and "unknown finding code 'XX9' in select" in err


def test_a_config_file_that_is_not_utf8_is_a_usage_error(tmp_path, monkeypatch, capsys):
    sub = _project(tmp_path, "micro-batch = 2\n")
    with (tmp_path / "pyproject.toml").open("ab") as handle:
        handle.write(b"# \xff\xfe latin-1 bytes\n")
    monkeypatch.chdir(sub)
    code, report, err = _check(capsys)
    assert code == 2 and report is None and "is not UTF-8 text" in err and "--isolated" in err

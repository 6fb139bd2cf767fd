"""`bndoctor check`: table and JSON output, exit codes 0 / 1 / 2."""

import json
import subprocess
import sys

import pytest
import torch

from bndoctor.cli import main
from bndoctor.models import tiny_resnet


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_error_findings_exit_1_with_a_table_grouped_by_severity(capsys):
    code, out, err = run(capsys, "check", "resnet18", "--micro-batch", "2", "--accum", "32", "--input-shape", "3,64,64")
    assert code == 1 and not err
    assert "logical batch 64" in out and out.index("ERRORS (1)") < out.index("WARNINGS (1)")
    assert "BN101" in out and "BN103" in out and "FIXES" in out and "to_accum_bn" in out


def test_healthy_setup_exits_0(capsys):
    code, out, _ = run(capsys, "check", "tiny-resnet", "--micro-batch", "64", "--input-shape", "1,8,8")
    assert code == 0 and "no findings" in out


def test_json_output(capsys):
    code, out, _ = run(
        capsys, "check", "resnet18", "--micro-batch", "4", "--world-size", "8", "--finetune", "--format", "json"
    )
    data = json.loads(out)
    assert code == 1 and data["setup"]["logical_batch"] == 32 and data["setup"]["finetune"]
    assert {f["code"] for f in data["findings"]} == {"BN101", "BN105"}
    assert data["findings"][0]["action"]["name"] == "freeze_bn"


def test_warnings_only_exit_0(capsys):
    code, out, _ = run(capsys, "check", "tiny-resnet", "--micro-batch", "8", "--precision", "bf16")
    assert code == 0 and "WARNINGS (1)" in out and "ERRORS" not in out


def test_bad_input_exits_2_with_one_line_and_a_hint(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "tiny-resnet", "--input-shape", "3,a"])
    assert exit_info.value.code == 2 and "expected sizes like 3,224,224" in capsys.readouterr().err
    code, _, err = run(capsys, "check", "no-such-model")
    assert code == 2 and err.startswith("bndoctor: error:") and "hint:" in err
    path = tmp_path / "weights.pt"
    torch.save(tiny_resnet().state_dict(), path)
    code, _, err = run(capsys, "check", str(path))
    assert code == 2 and "state_dict" in err and "--weights" in err


def test_weights_are_loaded(capsys, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_resnet().state_dict(), path)
    code, out, _ = run(capsys, "check", "tiny-resnet", "--weights", str(path), "--micro-batch", "64")
    assert code == 0 and "no findings" in out


def test_the_installed_command_is_a_ci_gate():
    done = subprocess.run(
        [sys.executable, "-m", "bndoctor", "check", "tiny-resnet", "--micro-batch", "2"], capture_output=True, text=True
    )
    assert done.returncode == 1 and "BN101" in done.stdout and "Traceback" not in done.stderr


def test_an_input_shape_that_does_not_fit_exits_2_with_the_layer(capsys):
    code, out, err = run(capsys, "check", "resnet18", "--micro-batch", "2", "--input-shape", "1,64,64")
    assert code == 2 and not out
    assert "does not fit ResNet: 'stem.0'" in err and "channels first" in err and "Traceback" not in err


def test_select_and_ignore_codes_or_prefixes_as_a_linter(capsys):
    argv = ["check", "resnet18", "--micro-batch", "2", "--accum", "4", "--format", "json"]
    code, out, _ = run(capsys, *argv, "--select", "bn103")
    data = json.loads(out)
    assert code == 0 and [f["code"] for f in data["findings"]] == ["BN103"] and data["left_out"] == 1
    assert data["schema_version"] == 1
    code, out, _ = run(capsys, *argv[:-2], "--ignore", "BN1")
    assert code == 0 and "no findings left after --select/--ignore (2 left out)" in out


def test_github_annotations_for_ci(capsys):
    code, out, _ = run(capsys, "check", "resnet18", "--micro-batch", "2", "--accum", "4", "--format", "github")
    lines = out.strip().splitlines()
    assert code == 1 and lines[0].startswith("::error title=bndoctor BN101::(model): 20 BN layer(s)")
    assert lines[1].startswith("::warning title=bndoctor BN103::")
    with pytest.raises(SystemExit) as exit_code:  # only check offers github: other commands refuse it as argparse
        main(["inspect", "resnet18", "--format", "github"])
    err = capsys.readouterr().err
    assert exit_code.value.code == 2 and "invalid choice: 'github'" in err and "Traceback" not in err


def test_without_a_setup_check_names_what_it_did_not_check_and_never_says_healthy(capsys):
    code, out, _ = run(capsys, "check", "tiny-resnet", "--isolated")
    assert code == 0 and "healthy" not in out
    assert "not checked without a training setup: BN101, BN102, BN103, BN104, BN105, BN106" in out
    code, out, _ = run(capsys, "check", "tiny-resnet", "--isolated", "--format", "json")
    assert json.loads(out)["unchecked"] == ["BN101", "BN102", "BN103", "BN104", "BN105", "BN106"]
    code, out, _ = run(capsys, "check", "tiny-resnet", "--isolated", "--micro-batch", "64")
    assert code == 0 and "healthy" in out and "not checked" not in out  # a setup: every check ran


@pytest.mark.parametrize(("option", "value"), [("--select", "XX9"), ("--ignore", "BN99"), ("--select", "BN1,bn10x")])
def test_an_unknown_code_in_select_or_ignore_is_a_usage_error_with_a_suggestion(capsys, option, value):
    code, out, err = run(capsys, "check", "tiny-resnet", "--isolated", "--micro-batch", "2", option, value)
    assert code == 2 and not out and len(err.strip().splitlines()) == 2 and "Traceback" not in err
    assert "unknown finding code" in err and option.lstrip("-") in err and "BN101" in err
    if value.endswith("10x"):
        assert "did you mean BN10" in err


@pytest.mark.parametrize("spec", ["missing.pt", "weights/model.pth", "MODEL.CKPT"])
def test_a_missing_checkpoint_is_no_such_file_not_an_unknown_model(capsys, tmp_path, spec):
    code, out, err = run(capsys, "check", str(tmp_path / spec) if "/" in spec else spec, "--isolated")
    assert code == 2 and not out and "no such file" in err and "unknown MODEL" not in err

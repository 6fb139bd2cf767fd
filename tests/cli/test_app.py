import json
import subprocess
import sys

import pytest

import bndoctor
from bndoctor.cli import main
from bndoctor.cli._errors import EXIT_INTERNAL, EXIT_USAGE, describe


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"bndoctor {bndoctor.__version__}"


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "inspect" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == EXIT_USAGE
    assert "COMMAND" in capsys.readouterr().out


def test_bad_option_is_one_line_plus_hint(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "tiny-resnet", "--format", "yaml"])
    assert e.value.code == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("bndoctor: error:") and err[1].startswith("hint:")


def test_error_map():
    user = describe(bndoctor.errors.GroupCountError("bad groups", hint="pick 4"))
    assert (user.message, user.hint, user.code) == ("bad groups", "pick 4", EXIT_USAGE)
    assert describe(FileNotFoundError(2, "nope", "x.pt")).code == EXIT_USAGE
    internal = describe(RuntimeError("boom\nsecond line"))
    assert internal.code == EXIT_INTERNAL and "\n" not in internal.message and "--debug" in internal.hint


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "bndoctor", "inspect", "tiny-resnet", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["summary"]["bn_layers"] == 9


def test_control_characters_in_layer_names_reach_the_terminal_escaped(capsys, tmp_path, monkeypatch):
    """A layer named with a terminal escape sequence cannot clear the screen or recolour the output."""
    (tmp_path / "hostile_model.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    model = nn.Sequential(nn.Conv2d(3, 4, 3))\n"
        "    model.add_module('\\x1b[2Jred\\r', nn.BatchNorm2d(4))\n"
        "    return model\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for command in (["inspect"], ["check", "--isolated", "--micro-batch", "2"]):
        main([*command[:1], "hostile_model:build", *command[1:]])
        captured = capsys.readouterr()
        assert "\x1b" not in captured.out + captured.err and "\r" not in captured.out
        assert "\\x1b[2Jred" in captured.out  # escaped, visible

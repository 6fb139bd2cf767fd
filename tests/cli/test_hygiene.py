"""CLI habits users expect: a closed pipe is not an error, -V, every option explained, extras named."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from bndoctor.cli import main
from bndoctor.cli._app import build_parser
from bndoctor.cli._errors import EXIT_USAGE, describe


def test_a_closed_pipe_exits_quietly():
    proc = subprocess.run(
        f"{sys.executable} -m bndoctor inspect resnet50 | head -2", shell=True, capture_output=True, text=True
    )
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2
    assert "error" not in proc.stderr and "Broken pipe" not in proc.stderr


def test_short_version_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["-V"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("bndoctor ")


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from ((f"{name} {a}", h) for a, h in _actions(child))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield "/".join(action.option_strings) or action.dest, action.help


def test_every_option_has_help_text():
    missing = [name for name, text in _actions(build_parser()) if not text]
    assert not missing, f"options without help: {missing}"


@pytest.mark.parametrize(
    ("module", "expected"),
    [("matplotlib", "--no-plots"), ("sklearn", "bndoctor[demo]"), ("tensorboard", "bndoctor[tensorboard]")],
)
def test_a_missing_extra_names_the_extra_and_the_way_around_it(module, expected):
    failure = describe(ModuleNotFoundError(f"No module named '{module}'", name=module))
    assert failure.code == EXIT_USAGE and expected in failure.hint and "not installed" in failure.message

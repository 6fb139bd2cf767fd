"""Argument parsing and dispatch for the ``bndoctor`` command.

Each command is a :class:`~._command.Command` (a plain function ``run(args) -> Result``), listed in
:func:`_commands`; a result knows how to print itself as text and as JSON. Exceptions are turned into one
line plus a hint by :mod:`._errors`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from .._version import __version__
from ._command import Command
from ._errors import EXIT_OK, EXIT_USAGE, describe


def _commands() -> list[Command]:
    from . import bench, check, explain, inspect, noise, report, watch

    return [
        bench.DEMO_COMMAND,
        bench.BENCH,
        check.COMMAND,
        explain.COMMAND,
        inspect.COMMAND,
        noise.COMMAND,
        report.COMMAND,
        watch.COMMAND,
    ]


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line plus a hint, exit code 2."""

    def error(self, message: str) -> Any:
        sys.stderr.write(f"bndoctor: error: {message}\nhint: run `{self.prog} --help`\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bndoctor",
        description="Diagnose and repair BatchNorm when the physical batch is tiny.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"bndoctor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in _commands():
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        words = {"text": "for people (text, default)", "json": "for programs (json)", "github": "as GitHub Actions "
                 "annotations (github)"}  # fmt: skip
        child.add_argument(
            "--format",
            choices=command.formats,
            default="text",
            help="output " + ", or ".join(words[f] for f in command.formats),
        )
        child.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
        command.add_arguments(child)
        child.set_defaults(_run=command.run)
    return parser


#: control characters a terminal would act on (escape sequences, carriage returns, bells); newlines and tabs stay
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters written as escapes (``\\x1b``): names from a model or a file (a layer
    called ``"\\x1b[2J"``) reach the terminal as text, never as commands."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _quiet_on_closed_pipe() -> int:
    """`bndoctor inspect resnet50 | head -3`: the reader left; exit quietly, as a Unix tool does."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit must not fail again
    except (OSError, ValueError):
        pass
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        result = args._run(args)
        if args.format == "json":
            print(json.dumps(result.to_json(), indent=2))  # escapes control characters itself
        elif args.format == "github":
            print(printable(result.to_github()))  # type: ignore[attr-defined]
        else:
            print(printable(result.to_text()))
        sys.stdout.flush()
        return int(getattr(result, "exit_code", EXIT_OK))
    except BrokenPipeError:
        return _quiet_on_closed_pipe()
    except (Exception, KeyboardInterrupt) as exc:
        failure = describe(exc)
        if args.debug and failure.code != EXIT_USAGE:
            traceback.print_exc()
        sys.stderr.write(f"bndoctor: error: {printable(failure.message)}\n")
        if failure.hint:
            sys.stderr.write(f"hint: {printable(failure.hint)}\n")
        return failure.code

"""What a ``bndoctor`` command is: a name, its help, how it adds its arguments, and a function to a Result.

Each command module defines one (or a few) :class:`Command`; :mod:`._app` lists them, builds the parser
and turns a result into text, JSON or GitHub annotations.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Command", "Result", "positive_int"]


class Result(Protocol):
    """What a command returns: it prints itself for people and for programs."""

    def to_json(self) -> Any: ...

    def to_text(self) -> str: ...


@dataclass(frozen=True)
class Command:
    """One subcommand: ``bndoctor <name>``."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Result]
    formats: tuple[str, ...] = ("text", "json")  # "github": its result also has to_github()


def positive_int(text: str) -> int:
    """argparse type for counts (seeds, epochs, batch sizes): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer (got {text!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (got {value})")
    return value

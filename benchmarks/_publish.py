"""Print a benchmark's table and, with ``--update FILE``, put it between its markers in BENCHMARKS.md."""

from __future__ import annotations

import re
from pathlib import Path


def update(path: Path, text: str, command: str, *, key: str, title: str) -> None:
    """Replace (or append) the section between this benchmark's markers in a Markdown file."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\nReproduce: `{command}`\n\n{text}\n{end}"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in current:
        current = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, current, flags=re.S)
    else:
        current = current.rstrip() + f"\n\n## {title}\n\n" + block + "\n"
    path.write_text(current)


def publish(text: str, target: Path | None, command: str, *, key: str, title: str) -> None:
    """Print ``text``; with a ``target`` file, record it there with the command that reproduces it."""
    print(text)
    if target is not None:
        update(target, text, f"{command} --update {target}", key=key, title=title)

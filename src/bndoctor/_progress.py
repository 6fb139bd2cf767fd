"""A progress bar on stderr, without a terminal library."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``bar(done, total, label)``; redraws in place on a terminal, prints every 10% otherwise."""

    def __init__(self, stream: TextIO | None = None, width: int = 28) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_decile = -1

    def __call__(self, done: int, total: int, label: str) -> None:
        fraction = done / total if total else 1.0
        elapsed = time.perf_counter() - self.start
        eta = elapsed / fraction * (1 - fraction) if fraction > 0 else 0.0
        filled = int(self.width * fraction)
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {100 * fraction:3.0f}% "
            f"{elapsed:4.0f}s elapsed, ~{eta:3.0f}s left  {label}"
        )
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
            if done >= total:
                self.stream.write("\n")
        else:
            decile = int(fraction * 10)
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(line + "\n")
        self.stream.flush()

"""The progress bar of the harness (``bench``, ``demo``): tqdm, as ``recalibrate`` uses it."""

from __future__ import annotations

from typing import Any, TextIO


class ProgressBar:
    """``bar(done, total, label)``: a ``tqdm.auto`` bar on stderr (terminal, notebook or log file).

    The bar starts at the first report, so the time before it (worker processes starting, data loading)
    does not enter the rate: the estimate of the time left shows once a second report has come, from the
    work done since the first. ``label`` says what runs now.
    """

    def __init__(self, stream: TextIO | None = None, unit: str = "step") -> None:
        self.stream = stream
        self.unit = unit
        self.bar: Any = None

    def __call__(self, done: int, total: int, label: str) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=done, unit=self.unit, file=self.stream, dynamic_ncols=True, postfix=label
            )
        else:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

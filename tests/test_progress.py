"""The harness's progress bar: tqdm, whose rate starts at the first report (no wild first estimate)."""

import io
import time

from bndoctor._progress import ProgressBar


def test_the_first_report_shows_no_estimate_and_later_ones_a_rate_from_the_work_since():
    stream = io.StringIO()
    bar = ProgressBar(stream)
    time.sleep(0.05)  # start-up before the first report (worker processes, data) is not part of the rate
    bar(22, 5099, "bn-64 seed 0 epoch 1")
    first = stream.getvalue()
    assert "22/5099" in first and "<?" in first and "bn-64 seed 0 epoch 1" in first
    time.sleep(0.02)
    bar(2000, 5099, "bn-2x32-corr seed 0 epoch 1")
    bar(5099, 5099, "done")
    lines = stream.getvalue().replace("\r", "\n")
    assert "100%" in lines and "5099/5099" in lines and bar.bar is None  # closed at the end

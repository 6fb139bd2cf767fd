"""``bndoctor explain CODE``: what a finding code means, why it matters, how to fix it.

Codes of ``bndoctor check`` are explained from their registered check (its title and docstring, so a
check you register yourself is explained too); the codes only a running model shows (the monitor's
BN5xx, the noise advice's BS1xx) from the table below.
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass

from ..errors import BNDoctorError
from ._command import Command

RUNTIME_CODES = {
    "BN501": (
        "NaN or Inf in a BN layer's input or running statistics (monitor)",
        "Why: the statistics are lost for every later step. Fix: lower the learning rate, clip gradients, "
        "check the data, keep BN in float32; recalibrate(model, loader) rebuilds the statistics afterwards.",
    ),
    "BN502": (
        "running variance below eps in a quarter of a layer's channels or more (monitor)",
        "Why: those channels carry almost no signal (dead units before the layer). Fix: look at the "
        "activation, the learning rate and the weight decay before this layer.",
    ),
    "BN503": (
        "running statistics differ across DDP ranks (monitor)",
        "Why: each rank evaluates differently. Fix: to_sync_bn for training, or merge_running_stats(model) "
        "(the exact pooled merge, not an average of variances) before evaluating and checkpointing.",
    ),
    "BS101": (
        "logical batch far below the gradient noise scale (noise advice)",
        "Why: McCandlish et al. (2018): steps S = S_min (1 + B_noise / B); far below B_noise a larger batch "
        "cuts steps almost for free. Fix: more accumulation steps or ranks, learning rate scaled with it.",
    ),
    "BS102": (
        "logical batch far above the gradient noise scale (noise advice)",
        "Why: samples E = E_min (1 + B / B_noise); far above B_noise each sample helps little. Fix: a logical "
        "batch near B_simple reaches the same loss with fewer samples.",
    ),
    "BS103": (
        "fine-tuning with a logical batch outside 32-128 (noise advice)",
        "Why: the range usually chosen for fine-tuning pretrained encoders. Fix: adjust the accumulation "
        "steps to reach it, or retune the learning rate.",
    ),
    "BS104": (
        "a very large logical batch (noise advice)",
        "Why: first-order optimizers with one global learning rate degrade there. Fix: a layer-wise adaptive "
        "optimizer (LARS/LAMB) with warm-up.",
    ),
    "BS105": (
        "heavy-tailed gradient noise (noise advice)",
        "Why: a tail index alpha well below 2 (Simsekli et al. 2019) means rare large gradient jumps. Fix: "
        "gradient clipping, a larger batch.",
    ),
}


@dataclass
class Explanation:
    code: str
    title: str
    text: str
    source: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "title": self.title, "text": self.text, "source": self.source}

    def to_text(self) -> str:
        return f"{self.code}: {self.title}\n\n{self.text}\n\n({self.source})"


def run(args: argparse.Namespace) -> Explanation:
    from ..diagnose import CHECKS

    code = args.code.strip().upper()
    if code in CHECKS:
        check = CHECKS[code]
        text = inspect.getdoc(check.fn) or "(this check has no docstring)"
        return Explanation(code, check.title, text, "bndoctor check")
    if code in RUNTIME_CODES:
        title, text = RUNTIME_CODES[code]
        return Explanation(code, title, text, "found while a model trains")
    known = ", ".join(sorted({*CHECKS, *RUNTIME_CODES}))
    raise BNDoctorError(f"unknown finding code {args.code!r}", hint=f"codes: {known}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("code", metavar="CODE", help="a finding code, e.g. BN101")


COMMAND = Command("explain", "what a finding code means, why it matters and how to fix it", add_arguments, run)

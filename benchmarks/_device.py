"""Where a benchmark runs: ``--device`` and ``--key`` (and the usual options), a clock that waits for the device."""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser, key: str) -> None:
    """``--device`` (cpu or cuda) and ``--key``, the BENCHMARKS.md section a run updates (one per device)."""
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--key", default=None, help=f"BENCHMARKS.md section to update (default {key}, {key}_cuda)")


def section(args: argparse.Namespace, key: str) -> str:
    return args.key or (key if torch.device(args.device).type == "cpu" else f"{key}_{args.device.split(':')[0]}")


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished what was queued (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def where(device: torch.device) -> str:
    """The hardware a table was measured on, for its caption."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return f"{platform.machine()}, 1 thread"


def command_suffix(args: argparse.Namespace) -> str:
    """What to add to a table's reproduce command so that it names the device and section it was run with."""
    out = "" if torch.device(args.device).type == "cpu" else f" --device {args.device}"
    return out + (f" --key {args.key}" if args.key else "")


def timing_run(doc: str | None, key: str, *, rounds: int = 7) -> tuple[argparse.Namespace, torch.device, str]:
    """The usual options (``--rounds``, ``--update``, ``--device``, ``--key``), one thread and oneDNN off.

    Returns the parsed arguments, the device, and the caption's note on oneDNN (empty on a GPU).
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--update", type=Path)
    add_arguments(parser, key)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    return args, device, ", oneDNN off" if device.type == "cpu" else ""

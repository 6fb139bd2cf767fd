"""Real third-party model libraries for the tests: timm, torchvision (and transformers), random init, offline.

timm and torchvision are installed by the Makefile with ``--no-deps`` into
``.venv/thirdparty`` (kept off ``sys.path`` so that Lightning's torchmetrics
does not pick torchvision up in every process). The registry's torchvision
wheel is a CUDA build whose compiled ops do not load beside the CPU torch, so
its ``torchvision::*`` fake-op registrations are skipped here — a test-only
shim; the pure-Python model definitions then import and run on the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.library

THIRDPARTY = Path(sys.prefix) / "thirdparty"
_original_register_fake = torch.library.register_fake


def _register_fake_skipping_torchvision(op, *args, **kwargs):
    if isinstance(op, str) and op.startswith("torchvision::"):
        func = args[0] if args and callable(args[0]) else kwargs.get("func")
        return func if func is not None else (lambda fn: fn)
    return _original_register_fake(op, *args, **kwargs)


def _vision(name: str) -> ModuleType:
    if THIRDPARTY.is_dir() and str(THIRDPARTY) not in sys.path:
        sys.path.append(str(THIRDPARTY))
    torch.library.register_fake = _register_fake_skipping_torchvision
    try:
        return pytest.importorskip(name, reason=f"{name} is installed by `make setup` (.venv/thirdparty)")
    finally:
        torch.library.register_fake = _original_register_fake


def torchvision() -> ModuleType:
    return _vision("torchvision")


def timm() -> ModuleType:
    _vision("torchvision")  # timm imports it
    return _vision("timm")


def transformers() -> ModuleType:
    return pytest.importorskip("transformers")

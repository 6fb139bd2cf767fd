"""Where commands write: refuse paths that would fail half-way or replace a file the user did not mean."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BNDoctorError

__all__ = ["is_run_file", "require_folder"]


def require_folder(folder: Path, what: str) -> None:
    """Refuse ``folder`` when it, or a folder above it, is a file (it could not be created)."""
    blocked = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise BNDoctorError(
            f"cannot write {what} into {str(folder)!r}: {str(blocked)!r} is a file",
            hint="pass a path whose folders are folders (missing ones are created)",
        )


def is_run_file(path: Path) -> bool:
    """Whether ``path`` is empty or a run file bndoctor's monitor wrote (its first record is a ``start``)."""
    try:
        with path.open("rb") as handle:
            first = handle.readline(65536)
    except OSError:
        return False
    if not first.strip():
        return path.stat().st_size == 0
    try:
        record = json.loads(first)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and record.get("kind") == "start" and "bndoctor" in record

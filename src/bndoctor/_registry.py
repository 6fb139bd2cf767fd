"""The rule every bndoctor registry (layer families, remedies, checks, scenarios) follows to take an entry.

A key is registered once; registering it again is an error that names the registry and the key, unless
the caller passes ``replace=True`` to redefine the entry.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TypeVar

from .errors import BNDoctorError

__all__ = ["register_entry", "require_new"]

T = TypeVar("T")


def require_new(exists: bool, what: str, key: str, *, replace: bool, noun: str = "name") -> None:
    """Refuse a key that is registered already (``what``: ``"a remedy named"``) unless ``replace``."""
    if exists and not replace:
        raise BNDoctorError(f"{what} {key!r} is already registered", hint=f"choose another {noun} or pass replace=True")


def register_entry(
    registry: MutableMapping[str, T], key: str, entry: T, *, replace: bool, what: str, noun: str = "name"
) -> T:
    """``registry[key] = entry`` after :func:`require_new`; returns the entry."""
    require_new(key in registry, what, key, replace=replace, noun=noun)
    registry[key] = entry
    return entry

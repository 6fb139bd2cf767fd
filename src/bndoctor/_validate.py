"""Small argument checks shared by every public function (one wording for one mistake)."""

from __future__ import annotations

from typing import Any

from .errors import BNDoctorError

__all__ = ["positive_int"]


def positive_int(value: Any, name: str, *, minimum: int = 1, none_ok: bool = False, hint: str = "") -> Any:
    """Return ``value`` if it is an int >= ``minimum`` (or ``None`` when ``none_ok``); raise otherwise.

    ``bool`` is rejected although it subclasses ``int``: ``every=True`` is a mistake, not 1.

    >>> positive_int(3, "every")
    3
    """
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if none_ok:
            what += " or None"
        raise BNDoctorError(f"expected {name} to be {what} (got {value!r})", hint=hint or f"e.g. {name}=8")
    return value

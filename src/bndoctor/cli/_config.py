"""Settings for ``bndoctor check`` from ``[tool.bndoctor]`` in ``pyproject.toml``, as linters read theirs.

    [tool.bndoctor]
    micro-batch = 2
    accum = 32
    world-size = 1
    finetune = true
    precision = "bf16"
    input-shape = [3, 224, 224]
    select = ["BN1", "BN2"]
    ignore = ["BN106"]

The file is the nearest ``pyproject.toml`` from the working folder upwards
(``--config FILE`` names one, ``--isolated`` reads none). A command-line
option wins over the file. Keys take ``-`` or ``_``. An unknown key or a
wrong type is an error naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import BNDoctorError
from ..training import PRECISIONS

#: key -> (what it must be, a check)
KEYS: dict[str, tuple[str, Any]] = {
    "micro-batch": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "accum": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "world-size": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "sync-bn": ("true or false", lambda v: isinstance(v, bool)),
    "finetune": ("true or false", lambda v: isinstance(v, bool)),
    "precision": (" or ".join(repr(p) for p in PRECISIONS), lambda v: v in PRECISIONS),
    "input-shape": (
        "a list of positive integers, e.g. [3, 224, 224]",
        lambda v: (
            isinstance(v, list) and v and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in v)
        ),
    ),
    "select": (
        'a list of codes or prefixes, e.g. ["BN1"]',
        lambda v: isinstance(v, list) and all(isinstance(c, str) and c for c in v),
    ),
    "ignore": (
        'a list of codes or prefixes, e.g. ["BN106"]',
        lambda v: isinstance(v, list) and all(isinstance(c, str) and c for c in v),
    ),
}


def _toml() -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            return None
    return tomllib


def find_pyproject(start: Path) -> Path | None:
    """The nearest ``pyproject.toml`` in ``start`` or a folder above it."""
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_settings(
    config: Path | None = None, *, isolated: bool = False, start: Path | None = None
) -> tuple[dict[str, Any], Path | None]:
    """The ``[tool.bndoctor]`` table (keys with ``-``) and the file it came from; ``({}, None)`` when there is none."""
    if isolated:
        return {}, None
    if config is not None and not config.is_file():
        raise BNDoctorError(f"no configuration file at {str(config)!r}", hint="pass --config path/to/pyproject.toml")
    path = config if config is not None else find_pyproject(start or Path.cwd())
    if path is None:
        return {}, None
    toml = _toml()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BNDoctorError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); TOML files are UTF-8",
            hint="save the file as UTF-8, or pass --isolated to ignore it",
        ) from None
    if toml is None:
        if "[tool.bndoctor]" in text:
            raise BNDoctorError(
                f"{path} has a [tool.bndoctor] table, and this Python cannot read TOML",
                hint="pip install tomli (Python 3.10), or pass --isolated to ignore the file",
            )
        return {}, None
    try:
        data = toml.loads(text)
    except toml.TOMLDecodeError as exc:
        raise BNDoctorError(f"{path} is not valid TOML ({exc})", hint="fix the file, or pass --isolated") from None
    table = data.get("tool", {}).get("bndoctor")
    if table is None:
        return {}, None if config is None else path
    if not isinstance(table, dict):
        raise BNDoctorError(f"{path}: [tool.bndoctor] must be a table", hint="see docs/check.md")
    settings: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("_", "-")
        if key not in KEYS:
            raise BNDoctorError(
                f"{path}: unknown key {raw_key!r} in [tool.bndoctor]",
                hint=f"the keys are {', '.join(KEYS)}",
            )
        expected, valid = KEYS[key]
        if not valid(value):
            raise BNDoctorError(
                f"{path}: [tool.bndoctor] {raw_key} must be {expected} (got {value!r})",
                hint="fix the value, or pass --isolated to ignore the file",
            )
        settings[key] = [c.upper() for c in value] if key in ("select", "ignore") else value
    return settings, path

"""The package's floors (docs/architecture.md): every import goes down, never up or sideways.

Parses every module of ``src/bndoctor`` (imports inside functions included)
and checks each import of another bndoctor module against the floor table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bndoctor

PACKAGE = Path(bndoctor.__file__).parent

#: unit (a top-level module or subpackage of bndoctor) -> floor, as in docs/architecture.md
FLOORS = {
    "errors": 1,
    "findings": 1,
    "training": 1,
    "moments": 1,
    "_table": 1,
    "_validate": 1,
    "_batches": 1,
    "_state": 1,
    "_progress": 1,
    "_version": 1,
    "distributed": 2,
    "layers": 3,
    "_walk": 4,
    "families": 4,
    "_pairs": 4,
    "remedies": 5,
    "ranks": 5,
    "stats": 6,
    "diagnose": 6,
    "monitor": 6,
    "noise": 6,
    "models": 6,
    "bench": 7,
    "integrations": 8,
    "cli": 8,
    "__main__": 9,
}
#: floors whose units form one shared base and may import each other
SHARED_FLOORS = {1, 4}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every bndoctor import in ``path``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("bndoctor")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("bndoctor"):
                continue
            if node.module is None or target == "bndoctor":  # `from . import x`: x may be a module
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return found


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_unit_has_a_floor():
    units = {_unit(_module_name(p)) for p in _sources()} - {None}
    assert units <= set(FLOORS), f"add these to FLOORS and docs/architecture.md: {sorted(units - set(FLOORS))}"


def _violations(path: Path) -> list[str]:
    here = _unit(_module_name(path))
    out = []
    for line, target in _imports(path):
        there = _unit(target)
        if there is None or there not in FLOORS or here is None or there == here:
            continue
        up = FLOORS[there] > FLOORS[here]
        sideways = FLOORS[there] == FLOORS[here] and FLOORS[here] not in SHARED_FLOORS
        if up or sideways or (there == "cli" and here != "__main__"):
            out.append(f"{path.relative_to(PACKAGE)}:{line} {here} (floor {FLOORS[here]}) imports {target}")
    return out


def test_imports_only_go_down():
    violations = [v for p in _sources() for v in _violations(p)]
    assert not violations, "imports that run upward or sideways:\n" + "\n".join(violations)


def test_root_imports_no_optional_or_harness_code():
    imported = {_unit(t) for _, t in _imports(PACKAGE / "__init__.py")}
    assert not imported & {"integrations", "cli", "bench", "models"}


@pytest.mark.parametrize(
    ("source", "target"),
    [("noise", "diagnose"), ("layers", "stats"), ("diagnose", "cli"), ("noise", "bench")],
)
def test_the_rule_catches_what_the_old_tree_did(tmp_path, source, target):
    # the import-direction rule itself must fail on the imports the old tree had
    fake = tmp_path / "bndoctor" / source / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(f"from ..{target} import something\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "bndoctor"
    try:
        assert _violations(fake)
    finally:
        PACKAGE = saved

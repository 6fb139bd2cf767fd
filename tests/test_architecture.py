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
    "_registry": 1,
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


def _import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the bndoctor modules it imports (a name that is not a module resolves to its package)."""
    modules = {_module_name(p): p for p in sorted(package.rglob("*.py"))}

    def resolve(target: str) -> str:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target

    return {name: {r for _, t in _imports(path) if (r := resolve(t)) and r != name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import loop a depth-first walk meets, as the modules along it."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_no_import_loops_inside_or_between_packages():
    loops = _cycles(_import_graph(PACKAGE))
    assert not loops, "import loops (imports inside functions count):\n" + "\n".join(" -> ".join(c) for c in loops)


def test_the_loop_rule_catches_a_command_module_that_imports_its_dispatcher(tmp_path):
    # the shape the CLI once had: _app imports each command inside a function, each command imports _app
    cli = tmp_path / "bndoctor" / "cli"
    cli.mkdir(parents=True)
    (tmp_path / "bndoctor" / "__init__.py").write_text("")
    (cli / "__init__.py").write_text("")
    (cli / "_app.py").write_text("def commands():\n    from . import check\n    return [check.COMMAND]\n")
    (cli / "check.py").write_text("from ._app import Command\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "bndoctor"
    try:
        assert _cycles(_import_graph(PACKAGE)) == [["bndoctor.cli._app", "bndoctor.cli.check", "bndoctor.cli._app"]]
    finally:
        PACKAGE = saved

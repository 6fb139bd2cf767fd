"""Every public function and class documents each of its parameters (what the API reference shows)."""

import importlib
import inspect
import re

import pytest

import bndoctor

PUBLIC = [
    "bndoctor",
    "bndoctor.layers",
    "bndoctor.remedies",
    "bndoctor.stats",
    "bndoctor.diagnose",
    "bndoctor.monitor",
    "bndoctor.noise",
    "bndoctor.families",
    "bndoctor.distributed",
    "bndoctor.errors",
    "bndoctor.findings",
    "bndoctor.training",
    "bndoctor.models",
    "bndoctor.ranks",
    "bndoctor.integrations.watch",
]

#: parameters with one meaning everywhere, documented once in the package docstring
CONVENTIONS = (
    "model",
    "module",
    "modules",
    "inplace",
    "num_features",
    "eps",
    "momentum",
    "affine",
    "track_running_stats",
    "device",
    "dtype",
    "bias",
    "process_group",
    "group",
)


def _public_objects():
    seen, out = set(), []
    for name in PUBLIC:
        module = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if id(obj) in seen or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                continue
            seen.add(id(obj))
            out.append((f"{name}.{attr}", obj))
    return out


def _undocumented(obj):
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        doc += "\n" + (inspect.getdoc(obj.__init__) or "")
    names = [
        p.name
        for p in signature.parameters.values()
        if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return [n for n in names if n not in CONVENTIONS and not re.search(rf"\b{re.escape(n)}\b", doc)]


@pytest.mark.parametrize(("name", "obj"), _public_objects(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_parameter_is_documented(name, obj):
    assert inspect.getdoc(obj), f"{name} has no docstring"
    assert _undocumented(obj) == [], f"{name}: document {', '.join(_undocumented(obj))} in its docstring"


def test_the_conventions_are_documented_in_the_package_docstring():
    doc = bndoctor.__doc__
    assert all(f"``{name}``" in doc for name in CONVENTIONS)


def test_the_check_itself_catches_an_undocumented_parameter():
    def documented(a, b):
        """Uses ``a``."""

    assert _undocumented(documented) == ["b"]


def _root_verbs():
    return [(name, getattr(bndoctor, name)) for name in bndoctor.__all__ if inspect.isfunction(getattr(bndoctor, name))]


@pytest.mark.parametrize(("name", "verb"), _root_verbs(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_verb_of_the_root_has_args_and_returns_sections(name, verb):
    """As torch and fvcore document theirs: an ``Args:`` section, and ``Returns:`` unless it returns None."""
    doc = inspect.getdoc(getattr(verb, "__wrapped__", verb)) or ""
    returns_none = inspect.signature(verb).return_annotation in (None, "None")
    assert "\nArgs:\n" in doc, f"{name}: add an Args: section"
    assert returns_none or "\nReturns:\n" in doc, f"{name}: add a Returns: section"

"""The remedy registry: what ``fix`` dispatches to, what ``check`` may prescribe, what a training loop attaches.

A remedy is registered once, next to its converters (one module per remedy
in this package), as a :class:`Remedy`:

* ``fix``: the fixer :func:`bndoctor.fix` calls for findings whose
  :class:`~bndoctor.findings.Action` carries the remedy's ``name``. It gets a
  :class:`FixStep` (the model, the merged actions, the layers they name) and
  returns the model's root. Fixers run in ascending ``order``.
* ``prescribe``: given a :class:`~bndoctor.training.TrainingSetup`, a
  :class:`Prescription` for a normalisation batch that is too small, or
  ``None``. ``check``'s BN101 lists them in ascending ``order`` too, so that
  the remedy listed first is the one applied first (a remedy that builds on
  another, such as accumulation-aware BN pooling across ranks, applies what
  it builds on itself).
* ``layer`` / ``revert``: the layer class the remedy installs and the function
  that turns it back into BatchNorm.
* ``attach``: what a training loop must do once the optimizer exists (for
  accumulation-aware BN: close the window at each optimizer step), called by
  :func:`attach_all` for models that hold ``layer``.

Users register their own with :func:`register_remedy`, or only a fixer with
:func:`register_fix` (a sibling of :func:`bndoctor.register_check`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .._registry import register_entry, require_new
from ..errors import BNDoctorError, require_module
from ..families import family_of
from ..findings import Action
from ..training import TrainingSetup

__all__ = [
    "REMEDIES",
    "FixStep",
    "Prescription",
    "Remedy",
    "apply_actions",
    "attach_all",
    "prescriptions",
    "register_fix",
    "register_remedy",
]


@dataclass
class FixStep:
    """One remedy's share of a :func:`bndoctor.fix` call.

    ``actions``: the distinct actions with this remedy's name; ``layers``: the
    modules they name that exist in ``model`` (sorted; empty means the whole
    model); ``layer_shapes``: the input shape ``check`` traced for each layer;
    ``planned``: the names of every remedy this ``fix`` call applies. A fixer
    appends one line per change to ``changes`` (see :meth:`note`) and what it
    left alone to ``skipped``, and returns the model's root.
    """

    model: nn.Module
    actions: list[Action]
    layers: list[str]
    layer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    planned: frozenset[str] = frozenset()
    changes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def selection(self) -> list[str] | None:
        """``modules=`` for a converter: the named layers, or ``None`` (all)."""
        return self.layers or None

    def option(self, key: str, default: Any = None) -> Any:
        """An option of the first action that sets ``key``."""
        for action in self.actions:
            options = dict(action.options)
            if key in options:
                return options[key]
        return default

    def classes(self) -> dict[str, type]:
        """The class of each named layer now (take it before a class swap, pass it to :meth:`note`)."""
        wanted = set(self.layers)
        return {n: type(m) for n, m in self.model.named_modules() if n in wanted}

    def apply(self, name: str, convert: Callable[[nn.Module], nn.Module], *, suffix: str = "") -> nn.Module:
        """Run a class-swapping ``convert(model)`` on the model and :meth:`note` the layers it changed.

        Returns the new root (also stored in :attr:`model`)::

            return step.apply("to_my_bn", lambda m: to_my_bn(m, modules=step.selection, inplace=True))
        """
        before = self.classes()
        self.model = convert(self.model)
        self.note(name, before=before, suffix=suffix)
        return self.model

    def note(self, name: str, *, before: dict[str, type] | None = None, suffix: str = "") -> None:
        """Record ``"name: N layer(s)"``; with ``before``, count only the layers whose class changed."""
        if not self.layers:
            shown = "all layers"
        elif before is None:
            shown = f"{len(self.layers)} layer(s)"
        else:
            modules = {n: m for n, m in self.model.named_modules() if n in before}
            kept = [n for n in self.layers if type(modules.get(n)) is before.get(n)]
            for n in kept:
                family = family_of(modules[n]) if n in modules else None
                why = family.reason if family is not None and family.reason else "nothing to change"
                self.skipped.append(f"{n} (left as it is: {why})")
            changed = len(self.layers) - len(kept)
            shown = f"{changed} layer(s)" if not kept else f"{changed} of {len(self.layers)} layer(s)"
        self.changes.append(f"{name}: {shown}{suffix}")


Fixer = Callable[[FixStep], nn.Module]


@dataclass(frozen=True)
class Prescription:
    """A remedy for a too-small normalisation batch: the sentence ``check`` shows and the action ``fix`` applies.

    ``text`` is the sentence (with the code to write), ``action`` the :class:`~bndoctor.findings.Action`.
    """

    text: str
    action: Action


@dataclass(frozen=True)
class Remedy:
    """A registered remedy (the module docstring says how they are used).

    ``name``: the action name findings carry; ``fix``: its fixer
    (``FixStep -> model``), run in ascending ``order``; ``layer``: the class
    it installs, and ``revert``: the function that turns it back into
    BatchNorm; ``prescribe``: ``TrainingSetup -> Prescription | None`` for
    BN101, listed in ascending ``order`` too; ``attach``: ``(model, optimizer) ->
    handle`` for what a training loop needs (see :func:`attach_all`).
    """

    name: str
    fix: Fixer | None = None
    order: int = 100
    layer: type | None = None
    revert: Callable[..., nn.Module] | None = None
    prescribe: Callable[[TrainingSetup], Prescription | None] | None = None
    attach: Callable[[nn.Module, Any], Any] | None = None


#: Every registered remedy by name (built-in ones and yours).
REMEDIES: dict[str, Remedy] = {}


def register_remedy(remedy: Remedy, *, replace: bool = False) -> Remedy:
    """Register ``remedy`` under ``remedy.name`` (``replace=True`` to redefine one)."""
    if not isinstance(remedy, Remedy):
        raise BNDoctorError(
            f"expected a bndoctor.remedies.Remedy (got {type(remedy).__name__})",
            hint="Remedy(name='to_my_bn', fix=my_fixer, layer=MyBN, revert=from_my_bn)",
        )
    if not isinstance(remedy.name, str) or not remedy.name:
        raise BNDoctorError(f"expected a non-empty remedy name (got {remedy.name!r})", hint='e.g. "to_my_bn"')
    return register_entry(REMEDIES, remedy.name, remedy, replace=replace, what="a remedy named")


def register_fix(name: str, *, order: int = 100, replace: bool = False) -> Callable[[Fixer], Fixer]:
    """Register ``fn(step: FixStep) -> model`` as the fixer for actions named ``name``; a decorator.

    The sibling of :func:`bndoctor.register_check`: a check of your own returns
    findings with ``Action(name, modules)`` and :func:`bndoctor.fix` applies
    them through this fixer::

        @bndoctor.register_fix("to_my_bn")
        def fix_my_bn(step):
            return to_my_bn(step.model, modules=step.selection, inplace=True)

    Args:
        name: the action name the findings carry.
        order: its place among the fixers of one :func:`bndoctor.fix` call (lower runs first; the built-in
            ones use 10-90), and among the prescriptions BN101 lists.
        replace: redefine a fixer registered under ``name``; otherwise that is an error.

    Returns:
        The decorator, which registers the function and returns it unchanged.
    """

    def decorate(fn: Fixer) -> Fixer:
        existing = REMEDIES.get(name)
        require_new(existing is not None and existing.fix is not None, "a fixer for", name, replace=replace)
        if existing is None:
            register_remedy(Remedy(name, fix=fn, order=order))
        else:
            REMEDIES[name] = Remedy(**{**existing.__dict__, "fix": fn, "order": order})
        return fn

    return decorate


def apply_actions(
    model: nn.Module, actions: Iterable[Action], *, layer_shapes: dict[str, tuple[int, ...]] | None = None
) -> FixStep:
    """Apply ``actions`` to ``model`` in place through their registered fixers, in ascending ``order``.

    Actions of one remedy are merged (each distinct action once) and given to its fixer together. An action
    that names layers none of which exist any more (an earlier fixer replaced them) is dropped.

    Args:
        model: the model to repair in place.
        actions: what to apply; each names a registered remedy with a fixer.
        layer_shapes: the traced input shape of each layer, when known (some fixers use it).

    Returns:
        A :class:`FixStep` holding the new root (``model``), every fixer's ``changes`` and ``skipped``.

    Raises:
        BNDoctorError: an action names a remedy without a registered fixer.
    """
    merged: dict[str, list[Action]] = {}
    for action in actions:
        remedy = REMEDIES.get(action.name)
        if remedy is None or remedy.fix is None:
            raise BNDoctorError(
                f"no fixer is registered for action {action.name!r}",
                hint=f"register one with bndoctor.remedies.register_fix, or use one of: {', '.join(sorted(REMEDIES))}",
            )
        named = merged.setdefault(action.name, [])
        if action not in named:
            named.append(action)
    done = FixStep(model, [], [], dict(layer_shapes or {}), frozenset(merged))
    known = {n for n, _ in model.named_modules()}
    for name in sorted(merged, key=lambda n: (REMEDIES[n].order, n)):
        named = merged[name]
        layers = sorted({m for a in named for m in a.modules if m in known})
        if not layers and any(a.modules for a in named):
            continue  # every layer it names is gone (an earlier repair replaced it)
        step = FixStep(done.model, named, layers, done.layer_shapes, done.planned)
        done.model = REMEDIES[name].fix(step)  # type: ignore[misc]
        done.changes += step.changes
        done.skipped += step.skipped
    return done


def prescriptions(setup: TrainingSetup) -> list[Prescription]:
    """What the registered remedies prescribe for a too-small normalisation batch under ``setup``, best first."""
    out = []
    for remedy in sorted(REMEDIES.values(), key=lambda r: r.order):
        if remedy.prescribe is not None:
            prescription = remedy.prescribe(setup)
            if prescription is not None:
                out.append(prescription)
    return out


def attach_all(model: nn.Module, optimizer: Any) -> list[Any]:
    """Attach what every remedy present in ``model`` needs from the training loop; returns the handles.

    E.g. for accumulation-aware BN, the optimizer step hook that closes each
    window (:func:`bndoctor.accumulate_bn`). Models without such layers get
    nothing attached, and a remedy whose layers all report ``controlled``
    already (the user attached it) is not attached twice. Framework
    optimizers (Accelerate's, Lightning's) are unwrapped by the remedies.
    """
    require_module(model)
    handles = []
    for remedy in REMEDIES.values():
        if remedy.attach is None or remedy.layer is None:
            continue
        layers = [m for m in model.modules() if isinstance(m, remedy.layer)]
        if layers and not all(getattr(m, "controlled", False) for m in layers):
            handles.append(remedy.attach(model, optimizer))
    return handles

"""Which conv/linear layer feeds which BatchNorm: the one definition that fold and check share.

A *producer* is a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear``
(:data:`PRODUCERS`). A pair ``(producer, bn)`` means the BN's input is the
producer's output and nothing else consumes that output, each called once.
Three ways to find them, which agree where they all apply:

* :class:`ForwardPairs` watches a real forward pass (or one on meta tensors,
  as ``check`` runs): module hooks record which producer made the tensor a BN
  receives, and a ``TorchFunctionMode`` counts every other operation that
  consumes it. Works on any model that runs, including those torch.fx cannot
  trace (transformers' vision models).
* :func:`pairs_from_fx` reads the same from a ``torch.fx`` trace, no input needed.
* :func:`pairs_from_sequentials` pairs neighbours inside ``nn.Sequential``
  (the last resort: no input and no trace).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

import torch
import torch.nn as nn
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = ["PRODUCERS", "ForwardPairs", "find_pairs", "pairs_from_fx", "pairs_from_sequentials"]

#: Layers whose output a BN may be folded into (and whose bias a BN makes redundant).
PRODUCERS: tuple[type[nn.Module], ...] = (_ConvNd, nn.Linear)

R = TypeVar("R")


def pairs_from_fx(model: nn.Module, bn_by_id: dict[int, R]) -> list[tuple[nn.Module, R]]:
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return id(m) in bn_by_id or isinstance(m, PRODUCERS) or super().is_leaf_module(m, qualname)

    graph = _Tracer().trace(model)
    calls = Counter()
    for node in graph.nodes:
        if node.op == "call_module":
            calls[id(model.get_submodule(node.target))] += 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        bn = model.get_submodule(node.target)
        record = bn_by_id.get(id(bn))
        if record is None or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        producer = model.get_submodule(source.target)
        if (
            isinstance(producer, PRODUCERS)
            and len(source.users) == 1
            and calls[id(producer)] == 1
            and calls[id(bn)] == 1
        ):
            pairs.append((producer, record))
    return pairs


def pairs_from_sequentials(model: nn.Module, bn_by_id: dict[int, R]) -> list[tuple[nn.Module, R]]:
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    pairs = []
    for container in model.modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container)
        for producer, bn in itertools.pairwise(children):
            record = bn_by_id.get(id(bn))
            if record is not None and isinstance(producer, PRODUCERS) and uses[id(producer)] == 1 and uses[id(bn)] == 1:
                pairs.append((producer, record))
    return pairs


def find_pairs(model: nn.Module, bn_by_id: dict[int, R]) -> tuple[list[tuple[nn.Module, R]], str]:
    """Producer -> BN pairs for the BN modules in ``bn_by_id``; the second item is why fx failed ('' if not)."""
    try:
        return pairs_from_fx(model, bn_by_id), ""
    except Exception as exc:  # any tracing failure means: use the fallback
        return pairs_from_sequentials(model, bn_by_id), str(exc)


class _CountUses(TorchFunctionMode):
    """Counts the operations, outside watched modules, that consume a tensor a producer made."""

    def __init__(self, owner: ForwardPairs[Any]) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        owner = self.owner
        if owner.depth == 0 and owner.made and any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(out)):
            for leaf in tree_leaves((args, kwargs)):  # a query such as x.shape returns no tensor: not a use
                if isinstance(leaf, torch.Tensor):
                    entry = owner.made.get(id(leaf))
                    if entry is not None and entry[1] is leaf:
                        owner.uses[id(leaf)] += 1
        return out


class ForwardPairs(Generic[R]):
    """Record producer -> BN pairs while the model runs: ``with ForwardPairs(model, bn_by_id) as rec: model(x)``.

    ``bn_by_id`` maps ``id(bn_module)`` to whatever the caller wants back in
    :meth:`pairs`. Hooks are removed and the mode is left on exit, also when
    the forward raises.
    """

    def __init__(self, model: nn.Module, bn_by_id: dict[int, R]) -> None:
        self.model = model
        self.bn_by_id = bn_by_id
        self.depth = 0  # > 0 inside a watched BN's forward: its own use of the input does not count
        self.made: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # output tensor id -> (producer, tensor)
        self.uses: Counter[int] = Counter()
        self.calls: Counter[int] = Counter()
        self.received: list[tuple[nn.Module, torch.Tensor]] = []
        self._handles: list[Any] = []
        self._mode = _CountUses(self)

    def _made(self, module: nn.Module, args: Any, output: Any) -> None:
        self.calls[id(module)] += 1
        if isinstance(output, torch.Tensor):
            self.made[id(output)] = (module, output)  # the reference keeps the id unique

    def _enter_bn(self, module: nn.Module, args: Any) -> None:
        self.calls[id(module)] += 1
        self.depth += 1
        if args and isinstance(args[0], torch.Tensor):
            self.received.append((module, args[0]))

    def _leave_bn(self, module: nn.Module, args: Any, output: Any) -> None:
        self.depth -= 1

    def __enter__(self) -> ForwardPairs[R]:
        try:
            for module in self.model.modules():
                if id(module) in self.bn_by_id:
                    self._handles.append(module.register_forward_pre_hook(self._enter_bn))
                    self._handles.append(module.register_forward_hook(self._leave_bn, always_call=True))
                elif isinstance(module, PRODUCERS):
                    self._handles.append(module.register_forward_hook(self._made))
            self._mode.__enter__()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._mode.__exit__(*exc)
        finally:
            self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def pairs(self) -> list[tuple[nn.Module, R]]:
        """The pairs seen: each BN called once on a producer's output that nothing else consumed."""
        out = []
        for bn, x in self.received:
            entry = self.made.get(id(x))
            if entry is None or entry[1] is not x:
                continue
            producer = entry[0]
            if self.uses[id(x)] == 0 and self.calls[id(producer)] == 1 and self.calls[id(bn)] == 1:
                out.append((producer, self.bn_by_id[id(bn)]))
        return out

    def producers_of(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        """(producer, bn) for every BN input that is a producer's output, consumers or not."""
        for bn, x in self.received:
            entry = self.made.get(id(x))
            if entry is not None and entry[1] is x:
                yield entry[0], bn

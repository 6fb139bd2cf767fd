"""Which conv/linear layer feeds which BatchNorm: the one definition that fold and check share.

A *producer* is a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear``
(:data:`PRODUCERS`). A pair ``(producer, bn)`` means the BN's input is the
producer's output. :func:`find_pairs` reads them from a ``torch.fx`` trace
(requiring, for folding, that the producer's output feeds nothing else) and,
for models fx cannot trace, from neighbours inside ``nn.Sequential``.
``check`` with an input shape finds the same pairs from a forward on meta
tensors (tensor identity), using the same :data:`PRODUCERS`.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import TypeVar

import torch.nn as nn
from torch.nn.modules.conv import _ConvNd

__all__ = ["PRODUCERS", "find_pairs", "pairs_from_fx", "pairs_from_sequentials"]

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

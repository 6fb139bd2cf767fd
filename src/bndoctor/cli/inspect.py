"""``bndoctor inspect MODEL``: the BatchNorm inventory of a model, as a table or JSON."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .. import _table
from .._walk import find_bn
from ._command import Command
from ._model import ModelSpecError, add_model_arguments, load_model, load_weights


@dataclass
class InspectResult:
    model: str
    source: str  # "module" or "state_dict"
    parameters: int | None
    layers: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {
            "bn_layers": len(self.layers),
            "frozen": sum(bool(r.get("frozen")) for r in self.layers),
            "training": sum(bool(r.get("training")) for r in self.layers),
            "unsupported": sum(r.get("supported") is False for r in self.layers),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "source": self.source,
            "parameters": self.parameters,
            "summary": self.summary(),
            "layers": self.layers,
        }

    def to_text(self) -> str:
        head = f"{self.model}"
        if self.parameters is not None:
            head += f": {self.parameters:,} parameters"
        if not self.layers:
            return f"{head}\nno BatchNorm layers found"
        if self.source == "state_dict":
            headers = ["layer", "features", "affine", "batches tracked"]
            rows = [[r["name"], r["num_features"], r["affine"], r["num_batches_tracked"]] for r in self.layers]
        else:
            headers = [
                "layer",
                "kind",
                "class",
                "features",
                "affine",
                "track",
                "momentum",
                "eps",
                "mode",
                "frozen",
            ]
            rows = [
                [
                    r["name"] + (f" (= {', '.join(r['aliases'])})" if r["aliases"] else ""),
                    r["kind"],
                    r["class"].rsplit(".", 1)[-1],
                    r["num_features"],
                    r["affine"],
                    r["track_running_stats"],
                    r["momentum"],
                    r["eps"],
                    "train" if r["training"] else "eval",
                    r["frozen"],
                ]
                for r in self.layers
            ]
        s = self.summary()
        tail = f"{s['bn_layers']} BatchNorm layer(s)"
        if self.source == "module":
            tail += f": {s['training']} in training mode, {s['frozen']} frozen"
            if s["unsupported"]:
                tail += f", {s['unsupported']} unsupported"
                reasons = {r["name"]: r["reason"] for r in self.layers if not r["supported"]}
                tail += "\n" + "\n".join(f"  {n}: {why}" for n, why in reasons.items())
        return "\n".join([head, _table.render(headers, rows), tail])


def bn_from_state_dict(state: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """BN layers in a state_dict: every prefix with both running_mean and running_var."""
    layers = []
    for key, value in state.items():
        if not key.endswith("running_mean"):
            continue
        prefix = key[: -len("running_mean")]
        if prefix + "running_var" not in state:
            continue
        tracked = state.get(prefix + "num_batches_tracked")
        layers.append(
            {
                "name": prefix.rstrip("."),
                "num_features": int(value.numel()),
                "affine": prefix + "weight" in state,
                "num_batches_tracked": None if tracked is None else int(tracked),
            }
        )
    return layers


def run(args: argparse.Namespace) -> InspectResult:
    loaded = load_model(args.model, trust_pickle=args.trust_pickle, model_kwargs=args.model_kwargs)
    if not isinstance(loaded, nn.Module):
        if args.weights:
            raise ModelSpecError(
                "--weights needs MODEL to build a module, but MODEL is a state_dict file",
                hint="pass the architecture as MODEL (package.module:callable) and the file as --weights",
            )
        return InspectResult(
            args.model,
            "state_dict",
            sum(v.numel() for v in loaded.values() if v.is_floating_point()),
            bn_from_state_dict(loaded),
        )
    if args.weights:
        load_weights(loaded, args.weights)
    if args.eval:
        loaded.eval()
    # a lazy layer that has not run yet has no size: its parameters are not counted (find_bn reports it)
    parameters = sum(p.numel() for p in loaded.parameters() if not isinstance(p, nn.parameter.UninitializedParameter))
    return InspectResult(args.model, "module", parameters, [r.as_dict() for r in find_bn(loaded)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--eval", action="store_true", help="inspect the model in eval mode")


COMMAND = Command("inspect", "list the BatchNorm layers of a model", add_arguments, run)

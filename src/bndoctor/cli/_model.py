"""Turn a MODEL argument into a module (or a state_dict) without surprises.

MODEL is one of:

* the name of a bundled model (``tiny-resnet``, ``resnet18``, ``resnet50``);
* ``timm:NAME``, ``torchvision:NAME`` or ``transformers:CLASS`` — built with
  random weights, nothing downloaded (see :mod:`bndoctor.cli._libraries`);
* ``package.module:callable`` — imported and called with no arguments;
* a file saved with ``torch.save``: a state_dict is loaded with
  ``weights_only=True``; a pickled full model only with ``trust_pickle=True``,
  because unpickling runs arbitrary code.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from ..models import BUNDLED_MODELS
from ._libraries import LIBRARIES, ModelSpecError, build, parse_model_kwargs

_FORMS = (
    "a bundled model ({names}), timm:NAME, torchvision:NAME, transformers:CLASS (e.g. transformers:ResNetConfig), "
    "package.module:callable, or a file saved with torch.save"
)


def _forms() -> str:
    return _FORMS.format(names=", ".join(sorted(BUNDLED_MODELS)))


def _from_callable(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelSpecError(f"expected MODEL as package.module:callable (got {spec!r})", hint=f"MODEL is {_forms()}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(
            f"cannot import {module_name!r} for MODEL {spec!r} ({exc})",
            hint="check the module path and that its package is installed in this environment",
        ) from exc
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(
                f"module {module_name!r} has no attribute {attr!r}",
                hint="MODEL is package.module:callable, e.g. bndoctor.models:tiny_resnet",
            )
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelSpecError(
            f"expected {spec!r} to be a callable returning an nn.Module (got {type(obj).__name__})",
            hint="point MODEL at a function or class that builds the model with no arguments",
        )
    try:
        model = obj()
    except TypeError as exc:
        raise ModelSpecError(
            f"calling {spec!r} with no arguments failed: {exc}",
            hint="wrap it in a function that takes no arguments and returns the model",
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"expected {spec!r}() to return an nn.Module (got {type(model).__name__})",
            hint="return the model object from the callable",
        )
    return model


def _from_file(path: str, trust_pickle: bool) -> nn.Module | Mapping[str, torch.Tensor]:
    if trust_pickle:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as exc:
            if "Unsupported global" in str(exc):
                raise ModelSpecError(
                    f"{path!r} holds pickled objects, not just tensors (a full model?); "
                    "bndoctor does not unpickle it by default because that runs code from the file",
                    hint="pass --trust-pickle if you trust the file, or save model.state_dict() instead",
                ) from exc
            raise ModelSpecError(
                f"cannot read {path!r} with torch.load ({' '.join(str(exc).split())[:200]})",
                hint="MODEL files must be written by torch.save",
            ) from exc
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        state = obj.get("state_dict", obj) if "state_dict" in obj else obj
        if isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values()):
            return state
    raise ModelSpecError(
        f"expected {path!r} to hold an nn.Module or a state_dict (got {type(obj).__name__})",
        hint="save the model with torch.save(model.state_dict(), path)",
    )


def load_model(
    spec: str, *, trust_pickle: bool = False, model_kwargs: str | None = None
) -> nn.Module | Mapping[str, torch.Tensor]:
    """Resolve MODEL; a state_dict comes back as a mapping of tensors."""
    kwargs = parse_model_kwargs(model_kwargs)
    library, sep, name = spec.partition(":")
    if sep and library in LIBRARIES and name and ("." not in name or library == "timm"):  # timm: arch.tag
        return build(library, name, kwargs)
    if kwargs:
        raise ModelSpecError(
            f"--model-kwargs applies to timm:, torchvision: and transformers: models (got MODEL {spec!r})",
            hint="for your own code, wrap the model in a function that takes no arguments",
        )
    if spec in BUNDLED_MODELS:
        return BUNDLED_MODELS[spec]()
    if os.path.exists(spec):
        if os.path.isdir(spec):
            raise ModelSpecError(f"expected MODEL to be a file (got directory {spec!r})", hint=_forms())
        return _from_file(spec, trust_pickle)
    if ":" in spec:
        return _from_callable(spec)
    if os.path.splitext(spec)[1].lower() in _CHECKPOINT_SUFFIXES or os.sep in spec:
        raise ModelSpecError(f"no such file: {spec!r} (MODEL looks like a file path)", hint="check the path")
    raise ModelSpecError(f"unknown MODEL {spec!r}", hint=f"MODEL is {_forms()}")


#: endings that make a MODEL that does not exist a missing file rather than an unknown name
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".safetensors")


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state_dict file (``weights_only=True``) into ``model``; mismatches are errors."""
    state = _from_file(path, trust_pickle=False)
    if isinstance(state, nn.Module):
        state = state.state_dict()
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ModelSpecError(
            f"{path!r} does not match the model: {detail}",
            hint="load weights saved from the same architecture",
        ) from exc
    problems = [*result.missing_keys[:3], *result.unexpected_keys[:3]]
    if result.missing_keys or result.unexpected_keys:
        raise ModelSpecError(
            f"{path!r} does not match the model: {len(result.missing_keys)} missing and "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {', '.join(problems)})",
            hint="load weights saved from the same architecture",
        )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, ``--weights`` and ``--trust-pickle``: how every command that reads a model gets it."""
    parser.add_argument("model", metavar="MODEL", help=_forms())
    parser.add_argument(
        "--model-kwargs",
        metavar="K=V,...",
        help="keyword arguments for a timm:/torchvision:/transformers: MODEL, e.g. num_classes=10,in_chans=1",
    )
    parser.add_argument("--weights", metavar="FILE", help="state_dict to load into MODEL (weights_only=True)")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow MODEL to be a pickled full model (unpickling runs code from the file)",
    )

"""MODEL specs for the model libraries users have: ``timm:NAME``, ``torchvision:NAME``, ``transformers:CLASS``.

Every model is built with random weights and nothing is downloaded: timm with
``pretrained=False``, torchvision with ``weights=None`` (and
``weights_backbone=None`` for detection models), transformers from a config
class (``ResNetConfig``) or a model class (``ResNetForImageClassification``,
built from its config class's defaults) with ``use_pretrained_backbone=False``
where the config has it. Keyword arguments come from ``--model-kwargs
key=value,...``. Trained weights come only from a local file (``--weights``).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import os
import re
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from ..errors import BNDoctorError

__all__ = ["LIBRARIES", "ModelSpecError", "build", "parse_model_kwargs"]

_DOWNLOAD_HINT = "load trained weights from a local file with --weights FILE (a state_dict saved with torch.save)"


class ModelSpecError(BNDoctorError):
    """The CLI could not turn a MODEL argument into a module."""


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: ``depths=[1,2],act='a,b'`` is two items."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


#: the longest value --model-kwargs evaluates (a literal longer than this is not a model argument)
MAX_VALUE = 1000
_WORD = re.compile(r"[A-Za-z_][\w.\-]*")


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """``"num_classes=10,drop_rate=0.1,act=relu"`` -> dict.

    Values are Python literals (numbers, strings, lists, ``True``/``true``, ``None``) or plain words such as
    ``relu`` (kept as strings); anything else (an expression, a call) is an error, not a string passed on.
    """
    out: dict[str, Any] = {}
    if not text:
        return out
    for item in _split_top_level(text):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ModelSpecError(
                f"expected --model-kwargs as key=value pairs separated by commas (got {item.strip()!r})",
                hint="e.g. --model-kwargs num_classes=10,drop_rate=0.1",
            )
        raw = raw.strip()
        if len(raw) > MAX_VALUE:
            raise ModelSpecError(
                f"--model-kwargs {key}= is {len(raw)} characters long; values are short literals",
                hint="e.g. --model-kwargs num_classes=10,depths=[2,2,2,2]",
            )
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            if not _WORD.fullmatch(raw):
                raise ModelSpecError(
                    f"--model-kwargs {key}={raw!r} is neither a Python literal nor a plain word",
                    hint="numbers, 'strings', [lists], True/False/None, or a bare name such as relu",
                ) from None
            out[key] = {"true": True, "false": False, "none": None}.get(raw.lower(), raw)
    return out


def _import(name: str, extra: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ModelSpecError(
            f"MODEL needs {name}, which cannot be imported here ({exc})",
            hint=f"pip install {extra} (bndoctor never imports it unless a MODEL asks for it)",
        ) from exc
    except Exception as exc:  # installed but broken, e.g. torchvision's compiled ops built for another torch
        raise ModelSpecError(
            f"MODEL needs {name}, which is installed but fails to import: {_brief(exc)}",
            hint=f"the installation is broken, not the model: reinstall {extra} for torch {_torch_version()}",
        ) from exc


def _brief(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 160 characters)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def _torch_version() -> str:
    import torch

    return torch.__version__


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}?" if close else f"{len(choices)} names are available"


def _timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    timm = _import("timm", "timm")
    if kwargs.get("pretrained"):
        raise ModelSpecError(f"timm:{name} with pretrained=True would download weights", hint=_DOWNLOAD_HINT)
    arch = name.partition(".")[0]  # a pretrained tag (resnet18.a1_in1k) names weights, which are not loaded
    if arch not in timm.list_models():
        raise ModelSpecError(f"timm has no model named {arch!r}", hint=_suggest(arch, timm.list_models()))
    return timm.create_model(name, **{**kwargs, "pretrained": False})


def _torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    torchvision = _import("torchvision", "torchvision")
    names = sorted(torchvision.models.list_models())
    if name not in names:
        raise ModelSpecError(f"torchvision has no model named {name!r}", hint=_suggest(name, names))
    for key in ("weights", "weights_backbone"):
        if kwargs.get(key) not in (None, "None"):
            raise ModelSpecError(
                f"torchvision:{name} with {key}={kwargs[key]!r} would download weights", hint=_DOWNLOAD_HINT
            )
    builder = torchvision.models.get_model_builder(name)
    safe = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        safe["weights_backbone"] = None  # detection/segmentation models default to an ImageNet backbone
    return builder(**{**kwargs, **safe})


def _transformers(name: str, kwargs: dict[str, Any]) -> nn.Module:
    transformers = _import("transformers", "transformers")
    cls = getattr(transformers, name, None)
    if not isinstance(cls, type):
        names = [n for n in dir(transformers) if n.endswith(("Config", "Model"))]
        raise ModelSpecError(f"transformers has no class named {name!r}", hint=_suggest(name, names))
    if kwargs.get("use_pretrained_backbone"):
        raise ModelSpecError(
            f"transformers:{name} with use_pretrained_backbone=True would download weights", hint=_DOWNLOAD_HINT
        )
    if issubclass(cls, transformers.PretrainedConfig):
        config_cls, model_cls = cls, None
    elif issubclass(cls, transformers.PreTrainedModel):
        config_cls, model_cls = cls.config_class, cls
    else:
        raise ModelSpecError(
            f"transformers:{name} is neither a config class nor a model class",
            hint="e.g. transformers:ResNetConfig or transformers:ResNetForImageClassification",
        )
    default = config_cls()
    known = set(default.to_dict()) | set(inspect.signature(config_cls.__init__).parameters)
    unknown = sorted(k for k in kwargs if k not in known and not hasattr(default, k))  # num_labels is a property
    if unknown:  # a config stores unknown keys silently; a typo would otherwise change nothing
        raise ModelSpecError(
            f"{config_cls.__name__} has no field {unknown[0]!r}", hint=_suggest(unknown[0], sorted(known))
        )
    config = config_cls(**kwargs)
    if hasattr(config, "use_pretrained_backbone"):
        config.use_pretrained_backbone = False
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a config that still reaches for the hub fails fast
    if model_cls is not None:
        return model_cls(config)
    return transformers.AutoModel.from_config(config)


#: library prefix -> builder(name, kwargs)
LIBRARIES: dict[str, Callable[[str, dict[str, Any]], nn.Module]] = {
    "timm": _timm,
    "torchvision": _torchvision,
    "transformers": _transformers,
}


def build(library: str, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Build ``name`` from ``library`` with random weights; errors say what went wrong and how to fix it."""
    try:
        model = LIBRARIES[library](name, kwargs)
    except BNDoctorError:
        raise
    except TypeError as exc:
        raise ModelSpecError(
            f"{library}:{name} does not accept these --model-kwargs ({exc})",
            hint="check the argument names of the model (or config) class",
        ) from exc
    except ImportError as exc:  # e.g. a transformers config whose backbone comes from timm
        raise ModelSpecError(
            f"{library}:{name} needs a package that is not installed here ({' '.join(str(exc).split())[:160]})",
            hint="install it, or pick a configuration that does without (e.g. --model-kwargs use_timm_backbone=False)",
        ) from exc
    except OSError as exc:  # the hub was asked for something: offline, nothing is downloaded
        raise ModelSpecError(
            f"{library}:{name} would need a download ({' '.join(str(exc).split())[:160]})", hint=_DOWNLOAD_HINT
        ) from exc
    except Exception as exc:  # the library's own check of what it was given (ValueError, KeyError, ...)
        if kwargs:
            raise ModelSpecError(
                f"{library}:{name} rejected these --model-kwargs ({_brief(exc)})",
                hint="check the values against the model's (or config's) documentation",
            ) from exc
        raise ModelSpecError(
            f"{library}:{name} could not be built here ({_brief(exc)})",
            hint=f"if a package it imports is broken, reinstall it for torch {_torch_version()}",
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{library}:{name} did not build an nn.Module (got {type(model).__name__})")
    return model

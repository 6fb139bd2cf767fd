"""The scenario registry: every experiment the harness can run, by name.

A scenario fixes the model's norm layer, the micro-batch, the accumulation
steps, the sampler, the schedule and optionally a pretrained start and a
remedy applied to the model before training. Every remedy registers its
scenarios here with :func:`register`, so that every fix is measured against
the same references.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch.nn as nn

from .._registry import require_new
from ..errors import BNDoctorError
from ..findings import Action
from ..models import NormName
from .samplers import SamplerName

__all__ = ["DEMO", "DEMO_MNIST1D", "SCENARIOS", "Scenario", "get_scenario", "register", "resolve"]

Remedy = Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class Scenario:
    """One training recipe on a data set of the harness (``dataset``: ``"digits"`` or ``"mnist1d"``).

    ``lr`` is the SGD learning rate (momentum 0.9, Nesterov, weight decay
    5e-4, cosine decay over all optimizer steps). ``bn_eval`` keeps BN layers
    in eval mode while the rest trains (running statistics are then never
    updated). ``pretrain`` names a scenario whose final weights (same seed)
    start this one; ``remedy`` is applied to the model after loading them.
    ``recalibrate`` recomputes every BN layer's statistics (frozen ones
    included) with :func:`bndoctor.recalibrate` at the end of each epoch, on
    shuffled batches of 64 from the scenario's own training data (PreciseBN).
    ``world_size > 1`` trains with DDP on that many local gloo processes
    (``accum_steps`` micro-batches per rank per optimizer step, buffers not
    broadcast, so each rank keeps its own running statistics); ``sync_bn``
    converts BN with :func:`bndoctor.to_sync_bn`. ``accum_bn`` converts BN
    with :func:`bndoctor.to_accum_bn` in that mode and closes each
    accumulation window at the optimizer step (:func:`bndoctor.accumulate_bn`);
    with ``sync_bn`` too the windows pool across ranks. ``two_pass`` runs
    :func:`bndoctor.collect_window` over each window's micro-batches before
    its gradient pass.
    """

    name: str
    description: str
    group: str = "core"
    norm: NormName = "batch"
    micro_batch: int = 64
    accum_steps: int = 1
    sampler: SamplerName = "iid"
    epochs: int = 15
    lr: float = 0.05
    bn_eval: bool = False
    domain: Literal["source", "shifted"] = "source"
    pretrain: str | None = None
    remedy: Remedy | None = field(default=None, compare=False)
    recalibrate: bool = False
    world_size: int = 1
    sync_bn: bool = False
    accum_bn: Literal["progressive", "renorm", "blend", "exact"] | None = None
    passes: int | None = None
    batch_renorm: bool = False
    brn_warmup: int = 5000
    two_pass: bool = False
    dataset: str = "digits"

    @property
    def logical_batch(self) -> int:
        return self.micro_batch * self.accum_steps * self.world_size

    def actions(self) -> list[Action]:
        """The remedies this scenario applies through the remedy registry (after ``remedy``, if any)."""
        out = []
        if self.accum_bn:  # pooling across ranks too with sync_bn: the remedy converts to SyncBN first itself
            options: tuple[tuple[str, Any], ...] = (("mode", self.accum_bn), ("sync", self.sync_bn))
            if self.accum_bn == "exact":
                options += (("passes", self.passes),)
            out.append(Action("to_accum_bn", options=options))
        elif self.sync_bn:
            out.append(Action("to_sync_bn"))
        if self.batch_renorm:
            out.append(Action("to_batch_renorm", options=(("warmup_steps", self.brn_warmup),)))
        return out

    def label(self) -> str:
        """Short description of the setup, e.g. ``BN 2x32 correlated``."""
        norm = {"batch": "BN", "group": "GN", "layer": "LN", "instance": "IN", "none": "no norm"}[self.norm]
        if self.sync_bn:
            norm = "SyncBN"
        if self.accum_bn == "exact":
            passes = "until exact" if self.passes is None else f"{self.passes} pass{'es' if self.passes != 1 else ''}"
            norm = f"AccumBN (exact, {passes}{', sync' if self.sync_bn else ''})"
        elif self.accum_bn:
            norm = (
                f"AccumBN ({self.accum_bn}{', two passes' if self.two_pass else ''}{', sync' if self.sync_bn else ''})"
            )
        if self.batch_renorm:
            norm = "BatchRenorm" + (f" (warm-up {self.brn_warmup})" if self.brn_warmup != 5000 else "")
        if self.bn_eval:
            norm += " (eval)"
        batch = f"{self.micro_batch}x{self.accum_steps}" if self.accum_steps > 1 else str(self.micro_batch)
        if self.world_size > 1:
            batch += f"x{self.world_size} ranks"
        text = f"{norm} {batch} {self.sampler}"
        if self.remedy is not None:
            text += f" + {getattr(self.remedy, '__name__', 'remedy')}"
        if self.recalibrate:
            text += " + recalibrate"
        if self.dataset == "mnist1d":
            text += " (MNIST-1D)"
        elif self.dataset.startswith("path:"):
            text += " (your data)"
        return text


SCENARIOS: dict[str, Scenario] = {}


def register(scenario: Scenario, *, replace: bool = False) -> Scenario:
    """Add a scenario to the registry (``replace=True`` to redefine one)."""
    require_new(scenario.name in SCENARIOS, "a scenario named", scenario.name, replace=replace)
    if scenario.pretrain is not None and scenario.pretrain not in SCENARIOS:
        raise BNDoctorError(
            f"scenario {scenario.name!r} pretrains with unknown scenario {scenario.pretrain!r}",
            hint="register the pretraining scenario first",
        )
    if scenario.micro_batch < 2:
        raise BNDoctorError(
            f"expected micro_batch >= 2 in scenario {scenario.name!r} (got {scenario.micro_batch})",
            hint="BatchNorm in training mode needs at least two samples",
        )
    if scenario.two_pass and not scenario.accum_bn:
        raise BNDoctorError(
            f"scenario {scenario.name!r} asks for two passes without accumulation-aware BN",
            hint="set accum_bn='renorm' (or another mode) as well",
        )
    SCENARIOS[scenario.name] = scenario
    return scenario


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise BNDoctorError(
            f"unknown scenario {name!r}",
            hint=f"choose from: {', '.join(SCENARIOS)} (or a group: {', '.join(_groups())})",
        ) from None


def _groups() -> list[str]:
    return sorted({s.group for s in SCENARIOS.values()})


def resolve(selection: Iterable[str] | None) -> list[Scenario]:
    """Scenarios named by exact name, group name or glob pattern, in registry order."""
    if selection is None:
        return list(SCENARIOS.values())
    chosen: list[str] = []
    for item in selection:
        matches = [
            s.name for s in SCENARIOS.values() if s.name == item or s.group == item or fnmatch.fnmatchcase(s.name, item)
        ]
        if not matches:
            get_scenario(item)  # raises the error with the list of names
        chosen.extend(m for m in matches if m not in chosen)
    return [SCENARIOS[n] for n in SCENARIOS if n in chosen]


def frozen_bn(model: nn.Module) -> nn.Module:
    """Remedy: freeze BN statistics (affine stays trainable)."""
    from ..remedies import freeze_bn

    return freeze_bn(model, inplace=True)


def group_norm(model: nn.Module) -> nn.Module:
    """Remedy: convert BN to GroupNorm (affine kept) before training, e.g. a pretrained model before fine-tuning."""
    from ..remedies import convert_bn

    return convert_bn(model, inplace=True)


# --------------------------------------------------------------------------- built-in scenarios
# Each data set's catalogue is a list of rows (name, description, fields) that one builder registers, in
# order; the rows of a family are written once, with the data set's names and words filled in.

Row = tuple[str, str, dict[str, Any]]
_TINY: dict[str, Any] = dict(micro_batch=2, accum_steps=32)  # the harness's physical batch, logical 64
_SAMPLERS = (("correlated", "corr"), ("iid", "iid"))
_MODES = ("progressive", "renorm", "blend")


def _catalogue(rows: Iterable[Row], **common: Any) -> None:
    """Register each row's scenario, with ``common`` fields (group, data set, epochs, ...) added.

    The one builder of every catalogue: digits, MNIST-1D and the user's data (:func:`data_scenarios`).
    """
    for name, description, fields in rows:
        register(Scenario(name, description, **{**common, **fields}))


def _sweep_rows(lines: Iterable[tuple[str, str, str]], describe: Callable[[str, str, int], str]) -> list[Row]:
    """The batch-size sweep: each line (name prefix, norm, sampler) at every batch, logical batch 32."""
    return [
        (
            f"{prefix}-{b}",
            describe(norm, sampler, b),
            dict(norm=norm, micro_batch=b, accum_steps=SWEEP_LOGICAL // b, sampler=sampler, lr=0.025),
        )
        for prefix, norm, sampler in lines
        for b in SWEEP_BATCHES
    ]


def _ranks_rows(prefix: str, describe: Callable[[str, dict[str, Any]], str]) -> list[Row]:
    """Local BN, SyncBN and accumulation-aware BN pooled across ranks: 4 DDP ranks x micro-batch 2 x 8."""
    ranks = dict(micro_batch=2, accum_steps=8, sampler="correlated", world_size=4, epochs=6)
    variants = (("bn", {}), ("syncbn", {"sync_bn": True}), ("accbn-sync", {"sync_bn": True, "accum_bn": "renorm"}))
    return [(f"{prefix}{name}-2x8x4-corr", describe(name, extra), {**ranks, **extra}) for name, extra in variants]


SWEEP_BATCHES = (32, 16, 8, 4, 2)
#: the logical batch of every run of the sweep
SWEEP_LOGICAL = 32
#: (name prefix, norm, sampler) of each line of the digits batch-size sweep
SWEEP_LINES = (("sweep-bn", "batch", "iid"), ("sweep-gn", "group", "iid"), ("sweep-bn-corr", "batch", "correlated"))

# --------------------------------------------------------------------------- digits

_catalogue(
    [
        ("bn-64", "BatchNorm at batch 64: the large-batch reference", {}),
        ("bn-2x32-iid", "BatchNorm at micro-batch 2 x 32 accumulation steps (logical 64), shuffled data", _TINY),
        (
            "bn-2x32-corr",
            "BatchNorm at micro-batch 2 x 32, each micro-batch from one class (logical batches mix classes)",
            dict(_TINY, sampler="correlated"),
        ),
        (
            "bn-eval-2x32-corr",
            "BN layers kept in eval mode while the rest trains (training without batch statistics), 2 x 32 correlated",
            dict(_TINY, sampler="correlated", bn_eval=True),
        ),
        (
            "bn-2x32-corr-recal",
            "BatchNorm at micro-batch 2 x 32, correlated, statistics recalibrated every epoch (bndoctor.recalibrate)",
            dict(_TINY, sampler="correlated", recalibrate=True),
        ),
    ]
)
_catalogue(
    [
        (
            f"accbn{'' if mode == 'progressive' else '-' + mode}-2x32-{tag}",
            f"accumulation-aware BN ({mode}) at micro-batch 2 x 32: each micro-batch normalised with the "
            f"statistics of its accumulation window so far ({tag})",
            dict(_TINY, sampler=sampler, accum_bn=mode),
        )
        for mode in _MODES
        for sampler, tag in _SAMPLERS
    ]
    + [
        (
            f"accbn-2pass-2x32-{tag}",
            f"accumulation-aware BN (renorm) at micro-batch 2 x 32, two passes: a no-grad pass collects the "
            f"whole window's statistics, the gradient pass normalises every micro-batch with them ({tag})",
            dict(_TINY, sampler=sampler, accum_bn="renorm", two_pass=True),
        )
        for sampler, tag in _SAMPLERS
    ]
    + [
        (
            f"brn-2x32-{tag}",
            f"Batch Renormalization (Ioffe 2017; r_max 3, d_max 5, momentum 0.01) at micro-batch 2 x 32 ({tag})",
            dict(_TINY, sampler=sampler, batch_renorm=True),
        )
        for sampler, tag in _SAMPLERS
    ],
    group="accum",
)
# Short runs (5 epochs, 3,595 micro-steps at 2 x 32): Batch Renorm's r_max/d_max warm-up (5,000 forwards by
# default) never finishes, so it depends on a schedule tuned to the run length; accumulation-aware BN has none.
_catalogue(
    [
        ("bn-64-5ep", "BatchNorm at batch 64, 5 epochs (reference for the short runs)", {}),
        (
            "accbn-renorm-2x32-corr-5ep",
            "accumulation-aware BN (renorm) at micro-batch 2 x 32, correlated, 5 epochs",
            dict(_TINY, sampler="correlated", accum_bn="renorm"),
        ),
    ]
    + [
        (
            f"brn{'' if warmup == 5000 else '-warmup1k'}-2x32-corr-5ep",
            f"Batch Renormalization at micro-batch 2 x 32, correlated, 5 epochs, r_max/d_max warm-up over {warmup} "
            "forwards",
            dict(_TINY, sampler="correlated", batch_renorm=True, brn_warmup=warmup),
        )
        for warmup in (5000, 1000)
    ],
    group="accum",
    epochs=5,
)
_catalogue(
    [
        ("gn-64", "GroupNorm at batch 64", dict(norm="group")),
        (
            "gn-2x32-corr",
            "GroupNorm at micro-batch 2 x 32, correlated micro-batches",
            dict(_TINY, norm="group", sampler="correlated"),
        ),
    ]
)
_RANKS_WORDS = {
    "bn": "local BatchNorm",
    "syncbn": "bndoctor SyncBatchNorm",
}
_catalogue(
    _ranks_rows(
        "",
        lambda name, _: (
            f"{_RANKS_WORDS[name]} on 4 DDP ranks (gloo) x micro-batch 2 x 8 accumulation steps (logical 64), one "
            "class per micro-batch; 6 epochs (SyncBN's 2 collectives per layer per micro-step cost ~6 ms each with 4 "
            "processes on 2 cores)"
            if name in _RANKS_WORDS
            else "accumulation-aware BN (renorm) pooled across 4 DDP ranks (gloo) x micro-batch 2 x 8 accumulation "
            "steps: every micro-step normalised with the window so far over all ranks (one collective per layer per "
            "micro-step), one class per micro-batch; 6 epochs"
        ),
    ),
    group="distributed",
)
_catalogue(
    _sweep_rows(
        SWEEP_LINES,
        lambda norm, sampler, b: (
            f"{'BatchNorm' if norm == 'batch' else 'GroupNorm'} at batch {b}"
            f"{', one class per micro-batch,' if sampler == 'correlated' else ''} accumulated to a logical "
            "batch of 32 (the Group Normalization paper's sweep in miniature)"
        ),
    ),
    group="sweep",
)
_catalogue(
    [("ft-bn-64", "fine-tune the batch-64 model on shifted data at batch 64 (reference)", {})]
    + [
        row
        for sampler, tag in _SAMPLERS
        for data in ["micro-batches of one class each" if tag == "corr" else "shuffled data"]
        for row in (
            (
                f"ft-bn-train-2x32-{tag}",
                f"fine-tune on shifted data at micro-batch 2 x 32 ({data}), BN left in training mode",
                dict(_TINY, sampler=sampler),
            ),
            (
                f"ft-bn-frozen-2x32-{tag}",
                f"fine-tune on shifted data at micro-batch 2 x 32 ({data}), BN statistics frozen (bndoctor.freeze_bn)",
                dict(_TINY, sampler=sampler, remedy=frozen_bn),
            ),
            (
                f"ft-bn-frozen-2x32-{tag}-recal",
                f"fine-tune on shifted data at micro-batch 2 x 32 ({data}), BN frozen and its statistics "
                "recalibrated on the target data every epoch (bndoctor.recalibrate)",
                dict(_TINY, sampler=sampler, remedy=frozen_bn, recalibrate=True),
            ),
        )
    ],
    group="finetune",
    domain="shifted",
    pretrain="bn-64",
    epochs=8,
    lr=0.01,
)

#: The curated subset that ``bndoctor demo`` runs: the failure and its fixes.
DEMO = (
    "bn-64",
    "bn-2x32-corr",
    "accbn-renorm-2x32-corr",
    "ft-bn-64",
    "ft-bn-train-2x32-corr",
    "ft-bn-frozen-2x32-corr",
    "ft-bn-frozen-2x32-corr-recal",
)

# --------------------------------------------------------------------------- MNIST-1D
# Greydanus (2020), "Scaling down deep learning": 4,000 training sequences of 40 values, 10 classes, generated
# offline by the mnist1d package; the paper reports logistic regression 32 %, MLP 68 %, CNN 94 %, GRU 91 %,
# human 96 % test accuracy. The model is bndoctor's resnet1d (BatchNorm1d). The same families as on digits.
_M1D = dict(dataset="mnist1d", lr=0.05)
_catalogue(
    [
        ("m1d-bn-64", "MNIST-1D: BatchNorm at batch 64, the large-batch reference", {}),
        ("m1d-gn-64", "MNIST-1D: GroupNorm at batch 64", dict(norm="group")),
    ]
    + [
        row
        for sampler, tag in reversed(_SAMPLERS)
        for what in ["shuffled" if tag == "iid" else "one class per micro-batch"]
        for row in (
            (f"m1d-bn-2x32-{tag}", f"MNIST-1D: BatchNorm at 2 x 32 ({what})", dict(_TINY, sampler=sampler)),
            (
                f"m1d-gn-2x32-{tag}",
                f"MNIST-1D: GroupNorm at 2 x 32 ({what})",
                dict(_TINY, norm="group", sampler=sampler),
            ),
            *(
                (
                    f"m1d-accbn-{mode}-2x32-{tag}",
                    f"MNIST-1D: accumulation-aware BN ({mode}) at 2 x 32 ({what})",
                    dict(_TINY, sampler=sampler, accum_bn=mode),
                )
                for mode in ("renorm", "progressive", "blend")
            ),
            (
                f"m1d-accbn-2pass-2x32-{tag}",
                f"MNIST-1D: accumulation-aware BN (renorm, two passes) at 2 x 32 ({what})",
                dict(_TINY, sampler=sampler, accum_bn="renorm", two_pass=True),
            ),
            *(
                (
                    f"m1d-accbn-exact{'' if passes is None else passes}-2x32-{tag}",
                    f"MNIST-1D: accumulation-aware BN, exact mode ({label}) at 2 x 32 ({what}): the whole window's "
                    "statistics collected first (collect_window), the gradient corrected by replaying the window",
                    dict(_TINY, sampler=sampler, accum_bn="exact", passes=passes, two_pass=True),
                )
                for passes, label in ((1, "1 correction pass"), (2, "2 correction passes"), (None, "until exact"))
            ),
            (
                f"m1d-brn-2x32-{tag}",
                f"MNIST-1D: Batch Renormalization at 2 x 32 ({what})",
                dict(_TINY, sampler=sampler, batch_renorm=True),
            ),
            (
                f"m1d-bn-2x32-{tag}-recal",
                f"MNIST-1D: BatchNorm at 2 x 32 ({what}), statistics recalibrated every epoch (bndoctor.recalibrate)",
                dict(_TINY, sampler=sampler, recalibrate=True),
            ),
        )
    ],
    group="mnist1d",
    epochs=12,
    **_M1D,
)
_catalogue(
    _ranks_rows(
        "m1d-",
        lambda name, _: (
            f"MNIST-1D: {name} on 4 DDP ranks (gloo) x micro-batch 2 x 8 accumulation steps, one class per micro-batch"
        ),
    ),
    group="mnist1d-distributed",
    dataset="mnist1d",
)
_catalogue(
    _sweep_rows(
        (("m1d-sweep-bn", "batch", "iid"), ("m1d-sweep-gn", "group", "iid")),
        lambda norm, _, b: (
            f"MNIST-1D: {'BatchNorm' if norm == 'batch' else 'GroupNorm'} at batch {b}, shuffled, accumulated to "
            "a logical batch of 32 (the Group Normalization paper's sweep)"
        ),
    ),
    group="mnist1d-sweep",
    dataset="mnist1d",
    epochs=12,
)
# fine-tuning at lr 0.002: at 0.01 (digits' fine-tuning rate) frozen BN collapses to one class in the first
# epoch on MNIST-1D (no normalisation by batch statistics: the updates scale the activations directly)
_catalogue(
    [
        ("m1d-ft-bn-64", "MNIST-1D: fine-tune on the shifted generator settings at batch 64", {}),
        (
            "m1d-ft-bn-train-2x32-corr",
            "MNIST-1D: fine-tune on the shifted domain at 2 x 32 (one class per micro-batch), BN in training mode",
            dict(_TINY, sampler="correlated"),
        ),
        (
            "m1d-ft-bn-frozen-2x32-corr",
            "MNIST-1D: fine-tune on the shifted domain at 2 x 32 (one class per micro-batch), BN frozen",
            dict(_TINY, sampler="correlated", remedy=frozen_bn),
        ),
        (
            "m1d-ft-bn-frozen-2x32-corr-recal",
            "MNIST-1D: fine-tune on the shifted domain at 2 x 32, BN frozen and recalibrated on the target each epoch",
            dict(_TINY, sampler="correlated", remedy=frozen_bn, recalibrate=True),
        ),
        (
            "m1d-ft-accbn-renorm-2x32-corr",
            "MNIST-1D: fine-tune on the shifted domain at 2 x 32 (one class per micro-batch), the pretrained BN made "
            "accumulation-aware (renorm; its running statistics kept and updated once per window)",
            dict(_TINY, sampler="correlated", accum_bn="renorm"),
        ),
        *(
            (
                f"m1d-ft-accbn-exact{'' if passes is None else passes}-2x32-corr",
                "MNIST-1D: fine-tune on the shifted domain at 2 x 32 (one class per micro-batch), the pretrained BN "
                f"made accumulation-aware in the exact mode ({label}; whole-window statistics collected first)",
                dict(_TINY, sampler="correlated", accum_bn="exact", passes=passes, two_pass=True),
            )
            for passes, label in ((1, "1 correction pass"), (None, "until exact"))
        ),
        (
            "m1d-ft-brn-2x32-corr",
            "MNIST-1D: fine-tune on the shifted domain at 2 x 32 (one class per micro-batch), the pretrained BN made "
            "Batch Renormalization (r_max 3, d_max 5 from the first step: the running statistics are trained)",
            dict(_TINY, sampler="correlated", batch_renorm=True, brn_warmup=0),
        ),
        (
            "m1d-ft-gn-2x32-corr",
            "MNIST-1D: fine-tune on the shifted domain at 2 x 32 (one class per micro-batch), the pretrained BN "
            "converted to GroupNorm (bndoctor.convert_bn: affine kept, statistics dropped)",
            dict(_TINY, sampler="correlated", remedy=group_norm),
        ),
    ],
    group="mnist1d-finetune",
    dataset="mnist1d",
    domain="shifted",
    pretrain="m1d-bn-64",
    epochs=6,
    lr=0.002,
)
# the demo's MNIST-1D line: the reference, the failure and the default fix, 4 epochs to keep the demo short
_catalogue(
    [
        ("m1d-demo-bn-64", "MNIST-1D demo: BatchNorm at batch 64 (4 epochs)", {}),
        (
            "m1d-demo-bn-2x32-corr",
            "MNIST-1D demo: BatchNorm at 2 x 32, one class per micro-batch (4 epochs)",
            dict(_TINY, sampler="correlated"),
        ),
        (
            "m1d-demo-accbn-2x32-corr",
            "MNIST-1D demo: accumulation-aware BN at 2 x 32, one class per micro-batch (4 epochs)",
            dict(_TINY, sampler="correlated", accum_bn="renorm"),
        ),
    ],
    group="demo-mnist1d",
    epochs=4,
    **_M1D,
)
#: what ``bndoctor demo`` adds when the mnist1d package is installed (``bndoctor[demo]``); in this order:
#: reference, failure, fix (the report's sentence reads them so)
DEMO_MNIST1D = ("m1d-demo-bn-64", "m1d-demo-bn-2x32-corr", "m1d-demo-accbn-2x32-corr")
#: the MNIST-1D core table (5 seeds): the reference, the failure and the remedies, shuffled and correlated
MNIST1D_CORE = (
    "m1d-bn-64",
    "m1d-bn-2x32-iid",
    "m1d-bn-2x32-corr",
    "m1d-gn-2x32-iid",
    "m1d-gn-2x32-corr",
    "m1d-accbn-renorm-2x32-iid",
    "m1d-accbn-renorm-2x32-corr",
    "m1d-brn-2x32-iid",
    "m1d-brn-2x32-corr",
    "m1d-bn-2x32-corr-recal",
)

#: the core scenarios ``bndoctor bench --data PATH`` runs on the user's own data: (name, description, fields)
DATA_CORE: tuple[tuple[str, str, dict], ...] = (
    ("data-bn-64", "BatchNorm at batch 64 (reference)", {}),
    ("data-bn-2x32-iid", "BatchNorm at 2 x 32, shuffled", {"micro_batch": 2, "accum_steps": 32}),
    (
        "data-bn-2x32-corr",
        "BatchNorm at 2 x 32, one class per micro-batch",
        {"micro_batch": 2, "accum_steps": 32, "sampler": "correlated"},
    ),
    (
        "data-gn-2x32-corr",
        "GroupNorm at 2 x 32, one class per micro-batch",
        {"micro_batch": 2, "accum_steps": 32, "sampler": "correlated", "norm": "group"},
    ),
    (
        "data-accbn-renorm-2x32-corr",
        "accumulation-aware BN (renorm) at 2 x 32, one class per micro-batch",
        {"micro_batch": 2, "accum_steps": 32, "sampler": "correlated", "accum_bn": "renorm"},
    ),
    (
        "data-brn-2x32-corr",
        "Batch Renormalization at 2 x 32, one class per micro-batch",
        {"micro_batch": 2, "accum_steps": 32, "sampler": "correlated", "batch_renorm": True},
    ),
)


def data_scenarios(path: str, *, epochs: int = 15) -> list[Scenario]:
    """Register the core scenarios on the user's data at ``path`` (image folder or ``.npz``); returns them.

    The data is read (and checked) here, once, so that a bad path fails
    before anything trains.
    """
    import os

    from .data import load_path

    source = os.path.abspath(path)
    load_path(source)
    for name, _, _ in DATA_CORE:
        SCENARIOS.pop(name, None)  # an earlier --data run's scenarios are replaced
    rows = [(name, f"your data ({os.path.basename(source)}): {text}", fields) for name, text, fields in DATA_CORE]
    _catalogue(rows, group="data", dataset=f"path:{source}", epochs=epochs)
    return [SCENARIOS[name] for name, _, _ in DATA_CORE]

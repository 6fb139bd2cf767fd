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
from typing import Literal

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
    accum_bn: Literal["progressive", "renorm", "blend"] | None = None
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
            out.append(Action("to_accum_bn", options=(("mode", self.accum_bn), ("sync", self.sync_bn))))
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
        if self.accum_bn:
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


# --------------------------------------------------------------------------- built-in scenarios

register(Scenario("bn-64", "BatchNorm at batch 64: the large-batch reference"))
register(
    Scenario(
        "bn-2x32-iid",
        "BatchNorm at micro-batch 2 x 32 accumulation steps (logical 64), shuffled data",
        micro_batch=2,
        accum_steps=32,
    )
)
register(
    Scenario(
        "bn-2x32-corr",
        "BatchNorm at micro-batch 2 x 32, each micro-batch from one class (logical batches mix classes)",
        micro_batch=2,
        accum_steps=32,
        sampler="correlated",
    )
)
register(
    Scenario(
        "bn-eval-2x32-corr",
        "BN layers kept in eval mode while the rest trains (training without batch statistics), 2 x 32 correlated",
        micro_batch=2,
        accum_steps=32,
        sampler="correlated",
        bn_eval=True,
    )
)
register(
    Scenario(
        "bn-2x32-corr-recal",
        "BatchNorm at micro-batch 2 x 32, correlated, statistics recalibrated every epoch (bndoctor.recalibrate)",
        micro_batch=2,
        accum_steps=32,
        sampler="correlated",
        recalibrate=True,
    )
)
for _mode in ("progressive", "renorm", "blend"):
    for _sampler, _tag in (("correlated", "corr"), ("iid", "iid")):
        register(
            Scenario(
                f"accbn{'' if _mode == 'progressive' else '-' + _mode}-2x32-{_tag}",
                f"accumulation-aware BN ({_mode}) at micro-batch 2 x 32: each micro-batch normalised with the "
                f"statistics of its accumulation window so far ({_tag})",
                group="accum",
                micro_batch=2,
                accum_steps=32,
                sampler=_sampler,
                accum_bn=_mode,
            )
        )
for _sampler, _tag in (("correlated", "corr"), ("iid", "iid")):
    register(
        Scenario(
            f"accbn-2pass-2x32-{_tag}",
            f"accumulation-aware BN (renorm) at micro-batch 2 x 32, two passes: a no-grad pass collects the "
            f"whole window's statistics, the gradient pass normalises every micro-batch with them ({_tag})",
            group="accum",
            micro_batch=2,
            accum_steps=32,
            sampler=_sampler,
            accum_bn="renorm",
            two_pass=True,
        )
    )
for _sampler, _tag in (("correlated", "corr"), ("iid", "iid")):
    register(
        Scenario(
            f"brn-2x32-{_tag}",
            f"Batch Renormalization (Ioffe 2017; r_max 3, d_max 5, momentum 0.01) at micro-batch 2 x 32 ({_tag})",
            group="accum",
            micro_batch=2,
            accum_steps=32,
            sampler=_sampler,
            batch_renorm=True,
        )
    )
# Short runs (5 epochs, 3,595 micro-steps at 2 x 32): Batch Renorm's r_max/d_max warm-up (5,000 forwards by
# default) never finishes, so it depends on a schedule tuned to the run length; accumulation-aware BN has none.
_SHORT = dict(group="accum", epochs=5)
register(Scenario("bn-64-5ep", "BatchNorm at batch 64, 5 epochs (reference for the short runs)", **_SHORT))
register(
    Scenario(
        "accbn-renorm-2x32-corr-5ep",
        "accumulation-aware BN (renorm) at micro-batch 2 x 32, correlated, 5 epochs",
        micro_batch=2,
        accum_steps=32,
        sampler="correlated",
        accum_bn="renorm",
        **_SHORT,
    )
)
for _warmup in (5000, 1000):
    register(
        Scenario(
            f"brn{'' if _warmup == 5000 else '-warmup1k'}-2x32-corr-5ep",
            f"Batch Renormalization at micro-batch 2 x 32, correlated, 5 epochs, r_max/d_max warm-up over {_warmup} "
            "forwards",
            micro_batch=2,
            accum_steps=32,
            sampler="correlated",
            batch_renorm=True,
            brn_warmup=_warmup,
            **_SHORT,
        )
    )
register(Scenario("gn-64", "GroupNorm at batch 64", norm="group"))
register(
    Scenario(
        "gn-2x32-corr",
        "GroupNorm at micro-batch 2 x 32, correlated micro-batches",
        norm="group",
        micro_batch=2,
        accum_steps=32,
        sampler="correlated",
    )
)

for _sync in (False, True):
    register(
        Scenario(
            f"{'syncbn' if _sync else 'bn'}-2x8x4-corr",
            f"{'bndoctor SyncBatchNorm' if _sync else 'local BatchNorm'} on 4 DDP ranks (gloo) x micro-batch 2 x 8 "
            "accumulation steps (logical 64), one class per micro-batch; 6 epochs (SyncBN's 2 collectives per "
            "layer per micro-step cost ~6 ms each with 4 processes on 2 cores)",
            group="distributed",
            micro_batch=2,
            accum_steps=8,
            sampler="correlated",
            world_size=4,
            sync_bn=_sync,
            epochs=6,
        )
    )

register(
    Scenario(
        "accbn-sync-2x8x4-corr",
        "accumulation-aware BN (renorm) pooled across 4 DDP ranks (gloo) x micro-batch 2 x 8 accumulation steps: "
        "every micro-step normalised with the window so far over all ranks (one collective per layer per "
        "micro-step), one class per micro-batch; 6 epochs",
        group="distributed",
        micro_batch=2,
        accum_steps=8,
        sampler="correlated",
        world_size=4,
        sync_bn=True,
        accum_bn="renorm",
        epochs=6,
    )
)

SWEEP_BATCHES = (32, 16, 8, 4, 2)
#: the logical batch of every run of the sweep
SWEEP_LOGICAL = 32
#: (name prefix, norm, sampler) of each line of the batch-size sweep
SWEEP_LINES = (("sweep-bn", "batch", "iid"), ("sweep-gn", "group", "iid"), ("sweep-bn-corr", "batch", "correlated"))
for _prefix, _norm, _sampler in SWEEP_LINES:
    for _b in SWEEP_BATCHES:
        register(
            Scenario(
                f"{_prefix}-{_b}",
                f"{'BatchNorm' if _norm == 'batch' else 'GroupNorm'} at batch {_b}"
                f"{', one class per micro-batch,' if _sampler == 'correlated' else ''} accumulated to a logical "
                "batch of 32 (the Group Normalization paper's sweep in miniature)",
                group="sweep",
                norm=_norm,
                micro_batch=_b,
                accum_steps=SWEEP_LOGICAL // _b,
                sampler=_sampler,
                lr=0.025,
            )
        )

_FT = dict(group="finetune", domain="shifted", pretrain="bn-64", epochs=8, lr=0.01)
register(Scenario("ft-bn-64", "fine-tune the batch-64 model on shifted data at batch 64 (reference)", **_FT))
for _sampler, _tag in (("correlated", "corr"), ("iid", "iid")):
    _data = "micro-batches of one class each" if _tag == "corr" else "shuffled data"
    register(
        Scenario(
            f"ft-bn-train-2x32-{_tag}",
            f"fine-tune on shifted data at micro-batch 2 x 32 ({_data}), BN left in training mode",
            micro_batch=2,
            accum_steps=32,
            sampler=_sampler,
            **_FT,
        )
    )
    register(
        Scenario(
            f"ft-bn-frozen-2x32-{_tag}",
            f"fine-tune on shifted data at micro-batch 2 x 32 ({_data}), BN statistics frozen (bndoctor.freeze_bn)",
            micro_batch=2,
            accum_steps=32,
            sampler=_sampler,
            remedy=frozen_bn,
            **_FT,
        )
    )
    register(
        Scenario(
            f"ft-bn-frozen-2x32-{_tag}-recal",
            f"fine-tune on shifted data at micro-batch 2 x 32 ({_data}), BN frozen and its statistics "
            "recalibrated on the target data every epoch (bndoctor.recalibrate)",
            micro_batch=2,
            accum_steps=32,
            sampler=_sampler,
            remedy=frozen_bn,
            recalibrate=True,
            **_FT,
        )
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

# --------------------------------------------------------------------------- MNIST-1D (group "mnist1d")
# Greydanus (2020), "Scaling down deep learning": 4,000 training sequences of 40 values, 10 classes, generated
# offline by the mnist1d package; the paper reports logistic regression 32 %, MLP 68 %, CNN 94 %, GRU 91 %,
# human 96 % test accuracy. The model is bndoctor's resnet1d (BatchNorm1d). The same families as on digits.
_M1D = dict(group="mnist1d", dataset="mnist1d", epochs=12, lr=0.05)
_M1D_SMALL = dict(micro_batch=2, accum_steps=32, **_M1D)
register(Scenario("m1d-bn-64", "MNIST-1D: BatchNorm at batch 64, the large-batch reference", **_M1D))
register(Scenario("m1d-gn-64", "MNIST-1D: GroupNorm at batch 64", norm="group", **_M1D))
for _sampler, _tag in (("iid", "iid"), ("correlated", "corr")):
    _what = "shuffled" if _tag == "iid" else "one class per micro-batch"
    register(
        Scenario(f"m1d-bn-2x32-{_tag}", f"MNIST-1D: BatchNorm at 2 x 32 ({_what})", sampler=_sampler, **_M1D_SMALL)
    )
    register(
        Scenario(
            f"m1d-gn-2x32-{_tag}",
            f"MNIST-1D: GroupNorm at 2 x 32 ({_what})",
            norm="group",
            sampler=_sampler,
            **_M1D_SMALL,
        )
    )
    for _mode in ("renorm", "progressive", "blend"):
        register(
            Scenario(
                f"m1d-accbn-{_mode}-2x32-{_tag}",
                f"MNIST-1D: accumulation-aware BN ({_mode}) at 2 x 32 ({_what})",
                sampler=_sampler,
                accum_bn=_mode,
                **_M1D_SMALL,
            )
        )
    register(
        Scenario(
            f"m1d-accbn-2pass-2x32-{_tag}",
            f"MNIST-1D: accumulation-aware BN (renorm, two passes) at 2 x 32 ({_what})",
            sampler=_sampler,
            accum_bn="renorm",
            two_pass=True,
            **_M1D_SMALL,
        )
    )
    register(
        Scenario(
            f"m1d-brn-2x32-{_tag}",
            f"MNIST-1D: Batch Renormalization at 2 x 32 ({_what})",
            sampler=_sampler,
            batch_renorm=True,
            **_M1D_SMALL,
        )
    )
    register(
        Scenario(
            f"m1d-bn-2x32-{_tag}-recal",
            f"MNIST-1D: BatchNorm at 2 x 32 ({_what}), statistics recalibrated every epoch (bndoctor.recalibrate)",
            sampler=_sampler,
            recalibrate=True,
            **_M1D_SMALL,
        )
    )
for _name, _extra in (
    ("bn", {}),
    ("syncbn", {"sync_bn": True}),
    ("accbn-sync", {"sync_bn": True, "accum_bn": "renorm"}),
):
    register(
        Scenario(
            f"m1d-{_name}-2x8x4-corr",
            f"MNIST-1D: {_name} on 4 DDP ranks (gloo) x micro-batch 2 x 8 accumulation steps, one class per "
            "micro-batch",
            group="mnist1d-distributed",
            dataset="mnist1d",
            micro_batch=2,
            accum_steps=8,
            sampler="correlated",
            world_size=4,
            epochs=6,
            **_extra,
        )
    )
for _norm, _prefix in (("batch", "m1d-sweep-bn"), ("group", "m1d-sweep-gn")):
    for _b in SWEEP_BATCHES:
        register(
            Scenario(
                f"{_prefix}-{_b}",
                f"MNIST-1D: {'BatchNorm' if _norm == 'batch' else 'GroupNorm'} at batch {_b}, shuffled, accumulated to "
                "a logical batch of 32 (the Group Normalization paper's sweep)",
                group="mnist1d-sweep",
                dataset="mnist1d",
                norm=_norm,
                micro_batch=_b,
                accum_steps=SWEEP_LOGICAL // _b,
                epochs=12,
                lr=0.025,
            )
        )
# fine-tuning at lr 0.002: at 0.01 (digits' fine-tuning rate) frozen BN collapses to one class in the first
# epoch on MNIST-1D (no normalisation by batch statistics: the updates scale the activations directly)
_M1D_FT = dict(group="mnist1d-finetune", dataset="mnist1d", domain="shifted", pretrain="m1d-bn-64", epochs=6, lr=0.002)
register(Scenario("m1d-ft-bn-64", "MNIST-1D: fine-tune on the shifted generator settings at batch 64", **_M1D_FT))
register(
    Scenario(
        "m1d-ft-bn-train-2x32-corr",
        "MNIST-1D: fine-tune on the shifted domain at 2 x 32 (one class per micro-batch), BN in training mode",
        micro_batch=2,
        accum_steps=32,
        sampler="correlated",
        **_M1D_FT,
    )
)
register(
    Scenario(
        "m1d-ft-bn-frozen-2x32-corr",
        "MNIST-1D: fine-tune on the shifted domain at 2 x 32 (one class per micro-batch), BN frozen",
        micro_batch=2,
        accum_steps=32,
        sampler="correlated",
        remedy=frozen_bn,
        **_M1D_FT,
    )
)
register(
    Scenario(
        "m1d-ft-bn-frozen-2x32-corr-recal",
        "MNIST-1D: fine-tune on the shifted domain at 2 x 32, BN frozen and recalibrated on the target each epoch",
        micro_batch=2,
        accum_steps=32,
        sampler="correlated",
        remedy=frozen_bn,
        recalibrate=True,
        **_M1D_FT,
    )
)
# the demo's MNIST-1D line: the reference, the failure and the default fix, 4 epochs to keep the demo short
_M1D_DEMO = dict(group="demo-mnist1d", dataset="mnist1d", epochs=4, lr=0.05)
register(Scenario("m1d-demo-bn-64", "MNIST-1D demo: BatchNorm at batch 64 (4 epochs)", **_M1D_DEMO))
register(
    Scenario(
        "m1d-demo-bn-2x32-corr",
        "MNIST-1D demo: BatchNorm at 2 x 32, one class per micro-batch (4 epochs)",
        micro_batch=2,
        accum_steps=32,
        sampler="correlated",
        **_M1D_DEMO,
    )
)
register(
    Scenario(
        "m1d-demo-accbn-2x32-corr",
        "MNIST-1D demo: accumulation-aware BN at 2 x 32, one class per micro-batch (4 epochs)",
        micro_batch=2,
        accum_steps=32,
        sampler="correlated",
        accum_bn="renorm",
        **_M1D_DEMO,
    )
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
    made = []
    for name, text, fields in DATA_CORE:
        scenario = Scenario(
            name,
            f"your data ({os.path.basename(source)}): {text}",
            group="data",
            dataset=f"path:{source}",
            epochs=epochs,
            **fields,
        )
        made.append(register(scenario, replace=True))
    return made

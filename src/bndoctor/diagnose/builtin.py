"""The built-in checks: the small-batch checklist and the known pitfalls of BN tooling, as findings.

Codes are stable: BN1xx batch size and statistics regime, BN2xx layer
configuration, BN3xx distributed setup, GN1xx GroupNorm, BN9xx what bndoctor
cannot analyse. Thresholds (:mod:`bndoctor.findings`): a normalisation batch
below 8 samples is an error, below 16 a warning (the Group Normalization
paper's ImageNet curve: BN's error grows quickly below 8 images per GPU, Wu
and He 2018). What a layer normalises over is asked from the layer itself
(:mod:`bndoctor.layers` protocol); the remedies a finding prescribes come
from the remedy registry (:func:`bndoctor.remedies.prescriptions`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import remedies
from .._walk import BNInfo
from ..findings import ERROR_BELOW, FINETUNE_RANGE, WARN_BELOW, Action, Finding
from ..layers import is_small_batch_remedy, pools_ranks, pools_window
from ._core import Context, register_check

MOMENTUM_RANGE = (0.001, 0.5)
EPS_RANGE = (1e-7, 1e-2)
_SHOWN = 5


def _names(records: list[BNInfo]) -> str:
    names = [r.name for r in records]
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _is_remedy(record: BNInfo) -> bool:
    return is_small_batch_remedy(record.module)


def _learning(ctx: Context) -> list[BNInfo]:
    """Layers that will normalise with (and learn) batch statistics once the model trains."""
    return [r for r in ctx.records if not r.frozen and not r.lazy]


def _synced(ctx: Context, record: BNInfo) -> bool:
    if ctx.setup is not None and ctx.setup.sync_bn:
        return True
    return pools_ranks(record.module)


def _normalisation_batch(ctx: Context, record: BNInfo) -> int:
    """Samples per statistics computation of this layer in training (the layer says what it pools)."""
    setup = ctx.setup
    if setup is None:
        raise ValueError("the normalisation batch needs a TrainingSetup")  # internal: callers check first
    n = setup.micro_batch
    if _synced(ctx, record):
        n *= setup.world_size
    if pools_window(record.module):
        n *= setup.accum_steps
    return n


def _remedies(ctx: Context) -> list[remedies.Prescription]:
    """Remedies for a tiny normalisation batch, best first for this setup (from the remedy registry)."""
    if ctx.setup is None:
        return []
    return remedies.prescriptions(ctx.setup)


def _values_per_channel(ctx: Context, records: list[BNInfo]) -> dict[str, int]:
    """Samples x spatial positions each layer normalises over per step (needs the traced input shapes)."""
    if ctx.input_shapes is None:
        return {}
    out = {}
    for record in records:
        shape = ctx.input_shapes.get(record.name)
        if shape is not None and len(shape) >= 2:
            out[record.name] = int(
                shape[0] * torch.Size(shape[2:]).numel() * (_normalisation_batch(ctx, record) // shape[0])
            )
    return out


@register_check("BN101", "normalisation batch too small", needs_setup=True)
def small_normalisation_batch(ctx: Context) -> Iterator[Finding]:
    """Layers whose training statistics span fewer than 8 samples (error) or 16 (warning).

    Why: BN normalises with the statistics of the batch it sees, not of the logical batch; with few
    samples they are noisy, and training (batch statistics) and inference (running statistics) drift
    apart. The Group Normalization paper's ImageNet curve (Wu and He 2018): BN's top-1 error 23.6% at
    32 images per GPU, 24.8% at 8, 27.3% at 4, 34.7% at 2, while GroupNorm stays at 24.0-24.2%.
    The normalisation batch is the micro-batch, times the world size for synchronised layers, times the
    accumulation steps for accumulation-aware BN. On digits with one class per micro-batch, BN at 2 x 32
    reaches 82-83% where batch 64 reaches 98.3% (BENCHMARKS.md).
    Fix: the remedies the registry prescribes for the setup, best first: freeze when fine-tuning;
    accumulation-aware BN (to_accum_bn) with accumulation; SyncBN across processes; GroupNorm.
    """
    if ctx.setup is None:
        return
    layers = [r for r in _learning(ctx) if not _is_remedy(r)]
    by_size: dict[int, list[BNInfo]] = {}
    for record in layers:
        by_size.setdefault(_normalisation_batch(ctx, record), []).append(record)
    for size, group in sorted(by_size.items()):
        if size >= WARN_BELOW:
            continue
        severity = "error" if size < ERROR_BELOW else "warning"
        ranked = _remedies(ctx)
        fix = "; else ".join(p.text for p in ranked[:3])
        setup = ctx.setup
        values = _values_per_channel(ctx, group)
        spread = f" ({min(values.values())}-{max(values.values())} values per channel)" if values else ""
        yield Finding(
            "BN101",
            severity,
            None,
            f"{len(group)} BN layer(s) compute batch statistics over {size} sample(s) per step{spread} "
            f"(below {ERROR_BELOW if severity == 'error' else WARN_BELOW} samples), although the logical batch is "
            f"{setup.logical_batch}: the statistics are noisy and differ between training and inference",
            {
                "normalisation_batch": size,
                "micro_batch": setup.micro_batch,
                "accum_steps": setup.accum_steps,
                "world_size": setup.world_size,
                "logical_batch": setup.logical_batch,
                "layers": [r.name for r in group],
                "values_per_channel": values,
            },
            fix,
            Action(ranked[0].action.name, tuple(r.name for r in group), ranked[0].action.options) if ranked else None,
        )


@register_check("BN102", "one value per channel", needs_setup=True)
def one_value_per_channel(ctx: Context) -> Iterator[Finding]:
    """A layer that gets one value per channel per batch (needs an input shape).

    Why: training BN then raises "Expected more than 1 value per channel", and a variance of one
    value means nothing. Fix: a larger micro-batch, freeze the layer, or LayerNorm/GroupNorm.
    """
    if ctx.setup is None or ctx.input_shapes is None:
        return
    for record in _learning(ctx):
        shape = ctx.input_shapes.get(record.name)
        if shape is None or len(shape) < 2:
            continue
        values = shape[0] * int(torch.Size(shape[2:]).numel())
        if _synced(ctx, record):
            values *= ctx.setup.world_size
        if values <= 1:
            yield Finding(
                "BN102",
                "error",
                record.name,
                f"gets 1 value per channel per batch (input {tuple(shape)}): training fails with "
                "'Expected more than 1 value per channel' and any statistics would be meaningless",
                {"input_shape": list(shape), "values_per_channel": values},
                "use a larger micro-batch, freeze this layer (bndoctor.freeze_bn(model, modules=...)), "
                "or replace it by LayerNorm/GroupNorm",
                Action("freeze_bn", (record.name,)),
            )


@register_check("BN103", "gradient accumulation with BN learning statistics", needs_setup=True)
def accumulation_with_bn(ctx: Context) -> Finding | None:
    """Gradient accumulation while BN layers learn statistics.

    Why: accumulation gives the gradient of the logical batch but not its statistics: each micro-batch
    is normalised alone and the running statistics take one EMA step per micro-batch, so they follow
    the last few micro-batches. Fix: accumulation-aware BN (to_accum_bn + accumulate_bn) normalises
    over the window and updates the running statistics once per optimizer step.
    """
    if ctx.setup is None or ctx.setup.accum_steps == 1:
        return None
    layers = [r for r in _learning(ctx) if not _is_remedy(r)]
    if not layers:
        return None
    setup = ctx.setup
    ranked = _remedies(ctx)
    return Finding(
        "BN103",
        "warning",
        None,
        f"gradient accumulation over {setup.accum_steps} micro-batches gives the gradient of a batch of "
        f"{setup.logical_batch}, but {len(layers)} BN layer(s) still see {setup.micro_batch} sample(s) at a time "
        f"and update their running statistics {setup.accum_steps} times per optimizer step",
        {"accum_steps": setup.accum_steps, "micro_batch": setup.micro_batch, "layers": len(layers)},
        ranked[0].text if ranked else "",
        Action(ranked[0].action.name, tuple(r.name for r in layers), ranked[0].action.options) if ranked else None,
    )


#: BN104's fix for a loop of your own ("") and for each trainer whose callback or plugin does the step
_SYNC_FIX = {
    "": "model = bndoctor.to_sync_bn(model) before wrapping in DDP (or pass sync_batchnorm=True to the framework "
    "and TrainingSetup(sync_bn=True))",
    "lightning": "Trainer(plugins=[BNDoctorSync()]) (bndoctor.integrations.lightning) converts the layers when fit "
    "sets up DDP (unlike sync_batchnorm=True it keeps accumulation-aware layers and trains on CPU)",
    "huggingface": "model = bndoctor.to_sync_bn(model) before Trainer(...)",
}


@register_check("BN104", "DDP without SyncBN at a small per-device batch", needs_setup=True)
def ddp_without_sync(ctx: Context) -> Finding | None:
    """Several processes train with local BN at a per-device batch below 16.

    Why: each rank normalises its own few samples and keeps its own running statistics, which drift
    apart (on digits: 4 ranks x 2, local BN 87.8 +- 11.8% vs SyncBN 98.3%). Fix: to_sync_bn before
    wrapping in DDP, or the framework's sync_batchnorm with TrainingSetup(sync_bn=True).
    """
    setup = ctx.setup
    if setup is None or setup.world_size == 1 or setup.micro_batch >= WARN_BELOW:
        return None
    layers = [r for r in _learning(ctx) if not _synced(ctx, r) and not _is_remedy(r)]
    if not layers or setup.finetune:
        return None
    return Finding(
        "BN104",
        "warning",
        None,
        f"{setup.world_size} processes train with local BN: each normalises over its own {setup.micro_batch} "
        "sample(s) and keeps its own running statistics, which drift apart between ranks",
        {"world_size": setup.world_size, "micro_batch": setup.micro_batch, "layers": len(layers)},
        _SYNC_FIX.get(setup.trainer or "", _SYNC_FIX[""]),
        Action("to_sync_bn", tuple(r.name for r in layers)),
    )


@register_check("BN105", "fine-tuning with BN in training mode", needs_setup=True)
def finetune_with_bn_training(ctx: Context) -> Finding | None:
    """Fine-tuning with BN layers still learning statistics.

    Why: the pretrained running statistics are overwritten by small-batch estimates. Fix: freeze_bn
    (statistics fixed, affine still trainable); under a large domain shift recalibrate on target data.
    """
    setup = ctx.setup
    if setup is None or not setup.finetune:
        return None
    layers = [r for r in _learning(ctx) if not _is_remedy(r)]
    if not layers:
        return None
    sizes = {_normalisation_batch(ctx, r) for r in layers}
    small = min(sizes) < WARN_BELOW
    return Finding(
        "BN105",
        "warning" if small else "info",
        None,
        f"fine-tuning with {len(layers)} BN layer(s) still learning statistics from batches of {min(sizes)}: "
        "the pretrained statistics are overwritten by noisy small-batch estimates",
        {"layers": len(layers), "normalisation_batch": min(sizes)},
        "model = bndoctor.freeze_bn(model); with a large domain shift, recalibrate on target data: "
        "bndoctor.recalibrate(model, target_loader)",
        Action("freeze_bn", tuple(r.name for r in layers)),
    )


@register_check("BN106", "fine-tuning logical batch outside 32-128", needs_setup=True)
def finetune_logical_batch(ctx: Context) -> Finding | None:
    """Fine-tuning with a logical batch outside 32-128 (information).

    Why: the range usually chosen for fine-tuning; outside it, retune the learning rate.
    """
    setup = ctx.setup
    if setup is None or not setup.finetune:
        return None
    low, high = FINETUNE_RANGE
    if low <= setup.logical_batch <= high:
        return None
    side = "below" if setup.logical_batch < low else "above"
    return Finding(
        "BN106",
        "info",
        None,
        f"the logical batch {setup.logical_batch} is {side} the {low}-{high} usually chosen for fine-tuning",
        {"logical_batch": setup.logical_batch, "range": [low, high]},
        f"adjust accum_steps to reach {low}-{high} samples per optimizer step, or retune the learning rate",
    )


@register_check("BN201", "bias right before BN")
def bias_before_bn(ctx: Context) -> Iterator[Finding]:
    """A conv/linear bias right before BN, when nothing else reads the conv's output.

    Why: BN subtracts the mean, so the bias has no effect in training. Fix: bias=False; fix moves the
    bias into the BN's running mean exactly.
    """
    by_name = {r.name: r for r in ctx.records}
    for producer_name, bn_name in ctx.pairs or []:
        record = by_name.get(bn_name)
        producer = ctx.model.get_submodule(producer_name) if producer_name else None
        if record is None or producer is None or getattr(producer, "bias", None) is None:
            continue
        if not record.supported:
            continue
        yield Finding(
            "BN201",
            "info",
            producer_name,
            f"has a bias, but {bn_name} right after it subtracts the mean: the bias is redundant",
            {"bias_of": producer_name, "bn": bn_name, "parameters": int(producer.bias.numel())},
            f"create {type(producer).__name__}(..., bias=False); bndoctor.fix moves the bias into "
            f"{bn_name}'s running mean exactly",
            Action("drop_bias", (producer_name, bn_name)),
        )


@register_check("BN202", "track_running_stats=False", applies_to=_BatchNorm)
def no_running_stats(ctx: Context, name: str, module: nn.Module) -> Finding | None:
    """A BN layer with track_running_stats=False.

    Why: it normalises with batch statistics in eval mode too, so a prediction depends on the other
    samples of the batch and a single sample fails. Fix: keep running statistics and recalibrate.
    """
    if module.track_running_stats:
        return None
    return Finding(
        "BN202",
        "warning",
        name,
        "keeps no running statistics, so it normalises with batch statistics in eval mode too: predictions "
        "depend on the other samples of the batch and fail for a single sample",
        {"track_running_stats": False},
        "build it with track_running_stats=True and compute statistics with bndoctor.recalibrate(model, loader)",
    )


@register_check("BN203", "BN in eval mode while the model trains")
def bn_eval_while_training(ctx: Context) -> Finding | None:
    """BN layers in eval mode while the model trains.

    Why: an intentional freeze done with .eval() is undone by the next model.train(); a partial one is
    usually an accident. Fix: freeze_bn, which survives model.train(), or model.train().
    """
    if not ctx.model.training:
        return None
    trainable = [r for r in ctx.records if r.supported and not r.frozen]
    idle = [r for r in trainable if not r.training]
    if not idle:
        return None
    everything = len(idle) == len(trainable)
    params_frozen = all(not p.requires_grad for r in idle for p in r.module.parameters(recurse=False))
    if everything or params_frozen:
        verdict = "looks like an intentional freeze done with .eval(), which the next model.train() silently undoes"
    else:
        verdict = f"looks accidental: {len(idle)} of {len(trainable)} BN layers are in eval mode"
    return Finding(
        "BN203",
        "warning",
        None,
        f"{len(idle)} BN layer(s) are in eval mode while the model is in training mode ({_names(idle)}): {verdict}",
        {"layers": [r.name for r in idle], "of": len(trainable), "intentional": everything or params_frozen},
        "to freeze on purpose: model = bndoctor.freeze_bn(model, modules=[...]) (survives model.train()); "
        "otherwise call model.train()",
        Action("freeze_bn", tuple(r.name for r in idle)) if everything or params_frozen else None,
    )


@register_check("BN204", "affine frozen, statistics still learning")
def affine_frozen_stats_learning(ctx: Context) -> Finding | None:
    """BN layers whose weight and bias have requires_grad=False but still update statistics.

    Why: half a freeze: the statistics keep changing with every batch. Fix: freeze_bn(affine=True).
    """
    layers = [
        r
        for r in _learning(ctx)
        if r.affine and r.training and not any(p.requires_grad for p in r.module.parameters(recurse=False))
    ]
    if not layers:
        return None
    return Finding(
        "BN204",
        "warning",
        None,
        f"{len(layers)} BN layer(s) have requires_grad=False on weight and bias but are in training mode "
        f"({_names(layers)}): their running statistics still change with every batch",
        {"layers": [r.name for r in layers]},
        "freeze statistics too: model = bndoctor.freeze_bn(model, affine=True)",
        Action("freeze_bn", tuple(r.name for r in layers)),
    )


@register_check("BN205", "momentum outside a sensible range", applies_to=_BatchNorm)
def momentum_range(ctx: Context, name: str, module: nn.Module) -> Finding | None:
    """A momentum outside 0.001-0.5 (None: a cumulative average, information).

    Why: too low and the running statistics lag the changing network; too high and they follow the
    last few noisy batches. Fix: 0.1 (torch's default), 0.01 for very long runs.
    """
    momentum = module.momentum
    if not module.track_running_stats:
        return None
    if momentum is None:
        return Finding(
            "BN205",
            "info",
            name,
            "momentum=None: the running statistics are the plain average over every batch since the last reset, "
            "so early (untrained) batches weigh as much as late ones",
            {"momentum": None},
            "use momentum=None only for recalibration; train with e.g. momentum=0.1",
        )
    low, high = MOMENTUM_RANGE
    if low <= momentum <= high:
        return None
    reason = (
        "the running statistics barely follow the changing network"
        if momentum < low
        else "the running statistics follow the last few (noisy) batches"
    )
    return Finding(
        "BN205",
        "warning",
        name,
        f"momentum {momentum:g} is outside {low:g}-{high:g}: {reason}",
        {"momentum": momentum, "range": [low, high]},
        "set momentum=0.1 (torch's default) or 0.01 for very long runs",
        Action("set_momentum", (name,), (("momentum", 0.1),)),
    )


@register_check("BN206", "eps outside a sensible range", applies_to=_BatchNorm)
def eps_range(ctx: Context, name: str, module: nn.Module) -> Finding | None:
    """An eps outside 1e-7-1e-2.

    Why: too small divides dead channels by almost zero; too large shrinks low-variance channels.
    """
    low, high = EPS_RANGE
    if low <= module.eps <= high:
        return None
    reason = "divides by almost zero for dead channels" if module.eps < low else "shrinks low-variance channels"
    return Finding(
        "BN206",
        "warning",
        name,
        f"eps {module.eps:g} is outside {low:g}-{high:g}: {reason}",
        {"eps": module.eps, "range": [low, high]},
        "use eps=1e-5 (torch's default) or 1e-3 (TensorFlow/Keras ports)",
    )


@register_check("BN207", "half-precision running statistics")
def half_precision_stats(ctx: Context) -> Iterator[Finding]:
    """Running statistics kept in float16/bfloat16.

    Why: small variances underflow and the EMA update loses its low bits. Fix: keep BN in float32
    (autocast does); fix casts these layers back.
    """
    for record in ctx.records:
        buffer = getattr(record.module, "running_var", None)
        if isinstance(buffer, torch.Tensor) and buffer.dtype in (torch.float16, torch.bfloat16):
            yield Finding(
                "BN207",
                "warning",
                record.name,
                f"keeps its running statistics in {str(buffer.dtype).replace('torch.', '')}: small variances "
                "underflow and the EMA update loses its low bits",
                {"dtype": str(buffer.dtype)},
                "keep BN in float32 (autocast does; a model cast with .half() does not): "
                "bndoctor.fix casts these layers back to float32",
                Action("float_bn", (record.name,)),
            )


@register_check("BN208", "BN never reached by the forward")
def never_reached(ctx: Context) -> Finding | None:
    """BN layers that no forward with the given input shape reaches.

    Why: their statistics never update, or they belong to a branch this input does not take.
    """
    if ctx.input_shapes is None:
        return None
    unreached = [r for r in ctx.records if r.name not in ctx.input_shapes]
    if not unreached:
        return None
    return Finding(
        "BN208",
        "warning",
        None,
        f"{len(unreached)} BN layer(s) never ran in a forward pass with this input shape ({_names(unreached)}): "
        "their statistics never update, or they belong to a branch that this input does not take",
        {"layers": [r.name for r in unreached]},
        "remove unused layers, or check with the input shape of the branch that uses them",
    )


@register_check("BN301", "SyncBN under DataParallel", applies_to=nn.DataParallel)
def sync_under_data_parallel(ctx: Context, name: str, module: nn.Module) -> Finding | None:
    """SyncBN inside nn.DataParallel.

    Why: DataParallel runs threads in one process; torch's SyncBatchNorm refuses it and nothing is
    synchronised. Fix: DistributedDataParallel, one process per device.
    """
    synced = [r for r in ctx.records if pools_ranks(r.module) and (not name or r.name.startswith(name + "."))]
    if not synced:
        return None
    return Finding(
        "BN301",
        "error",
        name or None,
        f"nn.DataParallel runs {len(synced)} SyncBatchNorm layer(s) in threads of one process: torch's "
        "SyncBatchNorm refuses it, and no statistics are synchronised",
        {"layers": [r.name for r in synced]},
        "use DistributedDataParallel (one process per device) with SyncBN, or BatchNorm under DataParallel",
    )


@register_check("BN302", "SyncBN without several processes")
def sync_without_processes(ctx: Context) -> Finding | None:
    """torch's SyncBatchNorm in a single process without a process group.

    Why: it raises in training without an initialised process group (and on CPU). Fix: from_sync_bn
    for one process (norm+activation layers keep their activation), or initialise torch.distributed.
    """
    setup = ctx.setup
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if initialised or (setup is not None and setup.world_size > 1):
        return None
    torch_sync = [r for r in ctx.records if isinstance(r.module, nn.SyncBatchNorm) and not r.frozen]
    if not torch_sync:
        return None
    return Finding(
        "BN302",
        "error",
        None,
        f"{len(torch_sync)} torch.nn.SyncBatchNorm layer(s) but a single process and no process group: "
        "torch's SyncBatchNorm raises in training without an initialised process group (and on CPU)",
        {"layers": [r.name for r in torch_sync], "world_size": 1 if setup is None else setup.world_size},
        "for one process: model = bndoctor.from_sync_bn(model); for several: initialise torch.distributed "
        "first (bndoctor.SyncBatchNorm also runs on CPU/gloo)",
        Action("from_sync_bn", tuple(r.name for r in torch_sync)),
    )


@register_check("GN101", "GroupNorm groups do not divide the channels", applies_to=nn.GroupNorm)
def groups_divide(ctx: Context, name: str, module: nn.Module) -> Finding | None:
    """GroupNorm whose groups do not divide its channels: the forward fails."""
    groups, channels = module.num_groups, module.num_channels
    if groups > 0 and channels % groups == 0:
        return None
    return Finding(
        "GN101",
        "error",
        name,
        f"{groups} groups do not divide {channels} channels: the forward fails",
        {"num_groups": groups, "num_channels": channels},
        f"choose a divisor of {channels}, e.g. "
        f"{max(d for d in range(1, min(32, channels) + 1) if channels % d == 0)} groups",
    )


@register_check("GN102", "GroupNorm with one channel per group", applies_to=nn.GroupNorm)
def one_channel_per_group(ctx: Context, name: str, module: nn.Module) -> Finding | None:
    """GroupNorm with one channel per group, which is InstanceNorm.

    Why: it removes each channel's contrast; GN with about 32 groups does better (Wu and He 2018).
    """
    groups, channels = module.num_groups, module.num_channels
    if channels != groups or channels == 1:
        return None
    return Finding(
        "GN102",
        "warning",
        name,
        f"{groups} groups for {channels} channels is one channel per group: InstanceNorm, which removes each "
        "channel's contrast (GN with 32 groups does better, Wu and He 2018)",
        {"num_groups": groups, "num_channels": channels},
        "use fewer groups, e.g. bndoctor.convert_bn picks a divisor near 32 with at least 2 channels per group",
    )


@register_check("BN901", "BN-like layer bndoctor cannot analyse")
def unsupported_layers(ctx: Context) -> Iterator[Finding]:
    """BN-like layers bndoctor cannot analyse (not a torch BatchNorm subclass; lazy layers before their
    first forward). Checks that need their class are skipped and fixes leave them alone.
    """
    for record in ctx.records:
        if not record.supported:
            yield Finding(
                "BN901",
                "info",
                record.name,
                f"{record.cls.rsplit('.', 1)[-1]}: {record.reason or 'not a torch BatchNorm subclass'}; checks that "
                "need its class were skipped and fixes leave it alone",
                {"class": record.cls, "kind": record.kind},
                "convert it to a torch BatchNorm class first, or run a forward pass (lazy layers)",
            )

"""Step time of accumulation-aware BN and Batch Renorm relative to plain BN at micro-batch 2 (target <= 1.10).

The tiny ResNet trains on digits-shaped inputs with 32 micro-batches of 2 per
optimizer step (forward + backward per micro-batch, SGD step per window), with
plain ``nn.BatchNorm2d``, with ``bndoctor.AccumBatchNorm`` in each mode (and
the two-pass variant: ``collect_window`` over the window first) and with
``bndoctor.BatchRenorm``; interleaved rounds, median per variant, one thread.
``--device cuda`` times the same on a GPU (synchronised before each clock
read; oneDNN does not apply there). On the tiny network two more rows are
lower bounds, layers written here and no remedy: plain BN after one more
statistics kernel (what any layer pays in eager mode that needs the batch's
statistics before it normalises), and that with per-channel factors folded into
the affine parameters (how Batch Renorm's r and d reach torch's BN kernel).

A second table times the BN layers of the ResNet-18-sized network alone: its
20 layers at the shapes the network feeds them (micro-batch 2), forward and
backward, each variant against plain BN. On CPU the convolutions' run-to-run
spread (several per cent of the step) hides differences of a per cent or two
in the whole-network table; this one measures what the layers add.

    python benchmarks/bench_accum.py --update BENCHMARKS.md
    python benchmarks/bench_accum.py --device cuda --update BENCHMARKS.md   # its own section
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import bndoctor
from _device import add_arguments, clock, command_suffix, section, where
from _publish import publish
from bndoctor.models import resnet18, tiny_resnet

MICRO, ACCUM = 2, 32
MODELS = {
    "tiny-resnet (77k params, 1x8x8)": (tiny_resnet, (1, 8, 8)),
    "resnet18 (ours, 11M params, 3x64x64)": (lambda: resnet18(num_classes=10), (3, 64, 64)),
}


VARIANTS = (
    "plain BN",
    "AccumBN renorm",
    "AccumBN renorm, two passes",
    "AccumBN progressive",
    "AccumBN blend",
    "BatchRenorm",
)


class _StatsThenBN(torch.nn.BatchNorm2d):
    """Lower bound, not a remedy: plain BN after one more statistics kernel per call (its result unused).

    Any layer that needs the micro-batch's statistics before it normalises (Batch Renorm's r and d, the
    accumulation window) pays at least this in eager mode, unless one native kernel does both.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            torch.batch_norm_update_stats(x, None, None, 0.0)
        return super().forward(x)


class _StatsFoldBN(torch.nn.BatchNorm2d):
    """Lower bound, not a remedy: the statistics kernel, then BN with per-channel factors folded into gamma, beta."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        weight, bias = self.weight * var, torch.addcmul(self.bias, self.weight, mean)
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, True, 0.1, self.eps)


FLOORS = {
    "lower bound: plain BN + a statistics kernel": _StatsThenBN,
    "lower bound: + r, d folded into gamma, beta": _StatsFoldBN,
}


def _with_floor_layers(model: torch.nn.Module, cls: type) -> torch.nn.Module:
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is torch.nn.BatchNorm2d:
                layer = cls(child.num_features)
                layer.load_state_dict(child.state_dict())
                setattr(module, name, layer)
    return model


def _variants(factory, device, floors: bool = False) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    out = {}
    for name in VARIANTS + (tuple(FLOORS) if floors else ()):
        torch.manual_seed(0)
        model = factory()
        if name in FLOORS:
            model = _with_floor_layers(model, FLOORS[name])
        elif name == "BatchRenorm":
            model = bndoctor.to_batch_renorm(model)
        elif name != "plain BN":
            model = bndoctor.to_accum_bn(model, mode=name.split(",")[0].split()[-1])
        model = model.to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if name.startswith("AccumBN"):
            bndoctor.accumulate_bn(model, opt)
        out[name] = (model.train(), opt)
    return out


def _window(model, opt, xs, ys, two_pass: bool = False) -> float:
    start = clock(xs[0].device)
    if two_pass:
        bndoctor.collect_window(model, xs)
    for x, y in zip(xs, ys):
        (F.cross_entropy(model(x), y) / ACCUM).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (clock(xs[0].device) - start) / ACCUM


def _bn_shapes(factory, shape) -> list[tuple[int, ...]]:
    """The input shape of every BatchNorm2d of the network at micro-batch ``MICRO``, in forward order."""
    shapes: list[tuple[int, ...]] = []
    model = factory()
    hooks = [
        m.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model.train()(torch.randn(MICRO, *shape))
    for hook in hooks:
        hook.remove()
    return shapes


def _layers_alone(factory, shape, device, rounds: int) -> dict[str, float]:
    """ms per micro-step of the network's BN layers alone (forward + backward), per variant; windows of ACCUM."""
    shapes = _bn_shapes(factory, shape)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(s, generator=gen).to(device).requires_grad_(True) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    stacks = {}
    for name in ("plain BN", "AccumBN renorm", "BatchRenorm"):
        layers = []
        for s in shapes:
            if name == "plain BN":
                layer = torch.nn.BatchNorm2d(s[1])
            elif name == "BatchRenorm":
                layer = bndoctor.BatchRenorm(s[1])
            else:
                layer = bndoctor.AccumBatchNorm(s[1])
                layer.acquire_control()
            layers.append(layer.to(device).train())
        stacks[name] = layers

    def window(layers) -> float:
        start = clock(device)
        for _ in range(ACCUM):
            for layer, x, g in zip(layers, xs, grads):
                layer(x).backward(g)
        for layer in layers:
            if isinstance(layer, bndoctor.AccumBatchNorm):
                layer.close_window()
        return (clock(device) - start) / ACCUM

    for layers in stacks.values():
        window(layers)
    times: dict[str, list[float]] = {name: [] for name in stacks}
    for _ in range(rounds):
        for name, layers in stacks.items():
            times[name].append(window(layers))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--update", type=Path)
    add_arguments(parser, "bench_accum")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    lines = [
        f"torch {torch.__version__}, {where(device)}; micro-batch {MICRO} x {ACCUM} accumulation "
        f"steps, forward + backward per micro-batch and one SGD step per window; median of {args.rounds} "
        "interleaved windows.",
        "",
        "| model | oneDNN | layer | ms per micro-step | ratio to plain BN (target <= 1.10; <= 1.03 for ResNet-18) |",
        "|---|---|---|---|---|",
    ]
    # oneDNN off: as the harness runs (native kernels are faster at batch 2); on: torch's default
    settings = (False, True) if device.type == "cpu" else (None,)
    whole: dict[tuple[str, object], float] = {}  # plain BN's step per (model, oneDNN), for the second table
    for (label, (factory, shape)), onednn in [(m, o) for m in MODELS.items() for o in settings]:
        if onednn is not None:
            torch.backends.mkldnn.enabled = onednn
        gen = torch.Generator().manual_seed(0)
        xs = [torch.randn(MICRO, *shape, generator=gen).to(device) for _ in range(ACCUM)]
        ys = [torch.randint(0, 10, (MICRO,), generator=gen).to(device) for _ in range(ACCUM)]
        variants = _variants(factory, device, floors=factory is tiny_resnet)
        for name, (model, opt) in variants.items():
            _window(model, opt, xs, ys, "two passes" in name)
        times = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, (model, opt) in variants.items():
                times[name].append(_window(model, opt, xs, ys, "two passes" in name))
        base = statistics.median(times["plain BN"])
        whole[(label, onednn)] = base
        for name in variants:
            t = statistics.median(times[name])
            dnn = "n/a" if onednn is None else ("on" if onednn else "off")
            lines.append(f"| {label} | {dnn} | {name} | {t * 1e3:.2f} | {t / base:.2f} |")
    label, (factory, shape) = list(MODELS.items())[1]
    alone = _layers_alone(factory, shape, device, args.rounds)
    steps = {dnn: t for (name, dnn), t in whole.items() if name == label}
    against = ", ".join(
        f"{t * 1e3:.0f} ms" + ("" if dnn is None else f" with oneDNN {'on' if dnn else 'off'}")
        for dnn, t in steps.items()
    )
    lines += [
        "",
        f"BN layers of the ResNet-18-sized network alone ({len(_bn_shapes(factory, shape))} layers at the shapes "
        f"the network feeds them at micro-batch {MICRO}, forward + backward, median of {args.rounds} interleaved "
        f"windows of {ACCUM}); the last column puts what a layer type adds over plain BN against the whole "
        f"network's plain-BN step in the table above ({against}).",
        "",
        "| layer | ms per micro-step, all BN layers | added over plain BN, ms | added / whole plain-BN step |",
        "|---|---|---|---|",
    ]
    for name, t in alone.items():
        added = t - alone["plain BN"]
        share = " / ".join(f"{added / step:+.1%}" for step in steps.values())
        lines.append(f"| {name} | {t * 1e3:.2f} | {added * 1e3:+.2f} | {share} |")
    text = "\n".join(lines)
    command = f"python benchmarks/bench_accum.py --rounds {args.rounds}{command_suffix(args)}"
    title = "Accumulation-aware BN and Batch Renorm: step time" + (" on CUDA" if device.type == "cuda" else "")
    publish(text, args.update, command, key=section(args, "bench_accum"), title=title)


if __name__ == "__main__":
    main()

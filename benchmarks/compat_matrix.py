"""Compatibility matrix: every bndoctor operation on every BN architecture timm, torchvision and transformers build.

    python benchmarks/compat_matrix.py                  # all libraries, writes docs/compatibility.md
    python benchmarks/compat_matrix.py --limit 5        # a quick look

Each model is built with random weights (nothing is downloaded) and run
through :func:`bndoctor.bench.compat.run_operations` on a batch of 2 images
at a small input size (64x64, larger where an architecture needs it). For
timm, one model per architecture (module of ``timm.models``): the first
variant, in name order, that builds and holds BatchNorm. Needs timm and
torchvision in ``.venv/thirdparty`` (``make setup``); like the tests, it skips
registering torchvision's CUDA-only fake ops, which cannot load beside a CPU
torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import _thirdparty  # noqa: E402  (the test-only torchvision shim; never in the library)

from bndoctor import find_bn  # noqa: E402
from bndoctor.bench.compat import OPERATIONS, OpResult, run_operations  # noqa: E402

SIZES = (64, 128, 224, 256, 299)
MAX_PARAMETERS = 150e6  # larger variants repeat a smaller one's architecture at hours of CPU time


def _example(size: int, channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))


def _runs(build, size: int) -> bool:
    """Whether the model runs at this size in eval and in training mode (auxiliary heads run in training only)."""
    try:
        model = build()
        with torch.no_grad():
            model.eval()(_example(size))
            model.train()(_example(size))
        return True
    except Exception:
        return False


def _pick_size(build) -> int | None:
    return next((s for s in SIZES if _runs(build, s)), None)


_SMALL = {"pico", "nano", "tiny", "small", "mini", "lite", "xs", "xxs", "b0", "050", "035", "m0", "t", "s", "18", "a0"}


def _smallest_first(name: str) -> tuple[bool, int, str]:
    """Try a small variant of an architecture first (cheaper to run, same layers)."""
    tokens = set(name.replace(".", "_").split("_"))
    return (not tokens & _SMALL, len(name), name)


def timm_models(limit: int | None) -> list[tuple[str, object]]:
    timm = _thirdparty.timm()
    out = []
    for module in sorted(timm.list_modules()):
        names = sorted(timm.list_models(module=module), key=_smallest_first)
        # the smallest variant, and variants whose name says BatchNorm (timm's vgg11 has none, vgg11_bn has)
        candidates = names[:1] + [n for n in names[1:] if "bn" in n.split("_")]
        chosen, built = None, False
        for name in candidates:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name, pretrained=False)
            except Exception:
                continue
            built = True
            if find_bn(model):
                chosen = name
                break
        if chosen is not None:
            out.append((f"timm:{chosen}", lambda name=chosen: timm.create_model(name, pretrained=False)))
        elif built:
            out.append((f"timm:{candidates[0]}", None))  # no BatchNorm in this architecture
        if limit and len(out) >= limit:
            break
    return out


def torchvision_models(limit: int | None) -> list[tuple[str, object]]:
    tv = _thirdparty.torchvision()
    out = []
    for name in sorted(tv.models.list_models(module=tv.models)):
        build = lambda name=name: tv.models.get_model(name, weights=None)  # noqa: E731
        out.append((f"torchvision:{name}", build if find_bn(build()) else None))
        if limit and len(out) >= limit:
            break
    out.append(
        ("torchvision:resnet50 (FrozenBatchNorm2d)", lambda: tv.models.resnet50(norm_layer=tv.ops.FrozenBatchNorm2d))
    )
    return out


HF_CONFIGS = [
    ("ResNetConfig", {}),
    ("RegNetConfig", {}),
    ("MobileNetV1Config", {}),
    ("MobileNetV2Config", {}),
    ("EfficientNetConfig", {}),
    ("BitConfig", {}),
    ("MobileViTConfig", {}),
    ("MobileViTV2Config", {}),
    ("LevitConfig", {}),
    ("EfficientFormerConfig", {}),
    ("VanConfig", {}),
    ("ConvNextConfig", {}),
    ("DetrConfig", {"use_pretrained_backbone": False, "backbone_config": "resnet"}),
    ("ConditionalDetrConfig", {"use_pretrained_backbone": False, "backbone_config": "resnet"}),
    ("TableTransformerConfig", {"use_pretrained_backbone": False, "backbone_config": "resnet"}),
]


def transformers_models(limit: int | None) -> list[tuple[str, object]]:
    tr = _thirdparty.transformers()
    out = []
    for config_name, kwargs in HF_CONFIGS[:limit]:
        config_cls = getattr(tr, config_name, None)
        if config_cls is None:
            continue

        def build(config_cls=config_cls, kwargs=kwargs):
            if kwargs.get("backbone_config") == "resnet":  # transformers' own ResNet, not a timm backbone
                kwargs = {**kwargs, "backbone_config": tr.ResNetConfig(out_features=["stage4"])}
            model = tr.AutoModel.from_config(config_cls(**kwargs))
            backbone = getattr(model, "backbone", None)  # DETR-style models: the conv backbone holds the BN
            inner = getattr(backbone, "model", None) or getattr(backbone, "conv_encoder", None)
            return inner if isinstance(inner, torch.nn.Module) and backbone is not None else model

        try:
            out.append((f"transformers:{config_name}", build if find_bn(build()) else None))
        except Exception as exc:
            out.append((f"transformers:{config_name}", f"does not build here: {type(exc).__name__}: {exc}"[:160]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="models per library (default: all)")
    parser.add_argument("--libraries", default="timm,torchvision,transformers")
    parser.add_argument("--out", default=str(ROOT / "docs" / "compatibility.md"))
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the results of libraries not in --libraries from the JSON written next to --out by an earlier run",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    listers = {"timm": timm_models, "torchvision": torchvision_models, "transformers": transformers_models}
    rows: list[tuple[str, str, int, list]] = []  # library, model, size, results
    without_bn: dict[str, list[str]] = defaultdict(list)
    unbuildable: list[tuple[str, str]] = []
    start = time.perf_counter()
    for library in args.libraries.split(","):
        for name, build in listers[library](args.limit):
            if build is None:
                without_bn[library].append(name)
                continue
            if isinstance(build, str):
                unbuildable.append((name, build))
                continue
            parameters = sum(p.numel() for p in build().parameters())
            if parameters > MAX_PARAMETERS:
                unbuildable.append((name, f"{parameters / 1e6:.0f}M parameters: a larger variant of a model run here"))
                continue
            size = _pick_size(build)
            if size is None:
                unbuildable.append((name, f"no forward at {', '.join(map(str, SIZES))} px"))
                continue
            results = run_operations(build, _example(size))
            rows.append((library, name, size, results))
            bad = [r.operation for r in results if r.status == "fail"]
            print(f"{name:55s} {size:4d}px  {'FAIL ' + ','.join(bad) if bad else 'ok'}", flush=True)
    seconds = time.perf_counter() - start
    sidecar = Path(args.out).with_suffix(".json")
    if args.reuse and sidecar.exists():  # results of the other libraries from the earlier run
        earlier = json.loads(sidecar.read_text())
        ran = set(args.libraries.split(","))
        rows += [
            (r["library"], r["name"], r["size"], [OpResult(**x) for x in r["results"]])
            for r in earlier["rows"]
            if r["library"] not in ran
        ]
        for library, names in earlier["without_bn"].items():
            if library not in ran:
                without_bn[library] = names
        unbuildable += [tuple(u) for u in earlier["unbuildable"] if u[0].split(":")[0] not in ran]
        seconds += earlier["seconds"]
    rows.sort(key=lambda r: (r[0], r[1]))
    sidecar.write_text(
        json.dumps(
            {
                "rows": [
                    {"library": lib, "name": n, "size": size, "results": [dataclasses.asdict(x) for x in res]}
                    for lib, n, size, res in rows
                ],
                "without_bn": without_bn,
                "unbuildable": unbuildable,
                "seconds": seconds,
            },
            indent=1,
        )
    )
    Path(args.out).write_text(render(rows, without_bn, unbuildable, seconds, args))
    print(f"wrote {args.out} ({len(rows)} models, {seconds / 60:.1f} min)")


def render(rows, without_bn, unbuildable, seconds, args) -> str:
    timm, torchvision, transformers = _thirdparty.timm(), _thirdparty.torchvision(), _thirdparty.transformers()

    libraries = sorted({r[0] for r in rows})
    lines = [
        "# Compatibility matrix",
        "",
        "Every bndoctor operation on every BatchNorm architecture that timm, torchvision and transformers build,",
        "with random weights (nothing downloaded), on a batch of 2 images at 64x64 (larger where an architecture",
        "needs it). What each operation checks is in `src/bndoctor/bench/compat.py`; each is compared with an",
        "independent answer (outputs before/after, for fold in float64; the float64 statistics of the layer",
        "inputs; the original state_dict). `n/a`: the model's BN layers are all frozen, so nothing learns",
        "statistics to sync, accumulate, recalibrate or monitor; or (fold) no BN follows a conv/linear directly.",
        "",
        f"Generated by `python benchmarks/compat_matrix.py` in {seconds / 60:.0f} min on 2 CPU cores, with torch",
        f"{torch.__version__}, timm {timm.__version__}, torchvision {torchvision.__version__}, transformers",
        f"{transformers.__version__}. timm: one model per architecture (module of `timm.models`; a small variant",
        "first). torchvision: every classification model. transformers: the vision configs listed in the script.",
        "",
        "| library | models | " + " | ".join(OPERATIONS) + " |",
        "|---|---|" + "---|" * len(OPERATIONS),
    ]
    for library in libraries:
        mine = [r for r in rows if r[0] == library]
        cells = []
        for i in range(len(OPERATIONS)):
            results = [r[3][i] for r in mine]
            passed = sum(x.status == "pass" for x in results)
            na = sum(x.status == "n/a" for x in results)
            applicable = len(results) - na
            cells.append(f"{passed}/{applicable}" + (f" (+{na} n/a)" if na else ""))
        lines.append(f"| {library} | {len(mine)} | " + " | ".join(cells) + " |")
    failures = [(r[1], x) for r in rows for x in r[3] if x.status == "fail"]
    lines += ["", "## Failures", ""]
    if failures:
        lines += [f"- `{name}` — {x.operation}: {x.detail}" for name, x in failures]
    else:
        lines.append("None.")
    partial = [(r[1], x.detail) for r in rows for x in r[3] if x.operation == "fold" and x.status == "pass"]
    partial = [(n, d) for n, d in partial if d.split(" of ")[0] != d.split(" of ")[-1].split(" ")[0]]
    lines += [
        "",
        "## Layers fold leaves in place",
        "",
        "`fold_bn` folds a BN only into a conv/linear whose output feeds nothing else and reaches the BN",
        "unchanged. The layers left in place have no such producer, and stay exact as before: pre-activation BN",
        "after a concatenation or a residual sum (DenseNet, ResNetV2, DPN, NASNet), BN after a reshape of a",
        "linear layer's output (LeViT's and XCiT's attention), after mixed or split convolutions whose outputs",
        "are concatenated (MixNet), after an activation, or in auxiliary heads that an eval-mode forward does",
        'not run (GoogLeNet, Inception v3). "fx agrees": where torch.fx can trace the model, it finds the same',
        "pairs as the forward pass.",
        "",
    ]
    lines += [f"- `{n}`: {d}" for n, d in partial] or ["None."]
    if unbuildable:
        lines += ["", "## Not run (too large for a 2-core run, or does not build or run here)", ""]
        lines += [f"- `{n}`: {why}" for n, why in unbuildable]
    lines += ["", "## Architectures without BatchNorm (nothing to do)", ""]
    for library, names in sorted(without_bn.items()):
        lines.append(f"- {library} ({len(names)}): " + ", ".join(f"`{n.split(':', 1)[1]}`" for n in names))
    lines += ["", "## Per model", "", "| model | input | " + " | ".join(OPERATIONS) + " |"]
    lines.append("|---|---|" + "---|" * len(OPERATIONS))
    for _, name, size, results in rows:
        lines.append(f"| `{name}` | {size} | " + " | ".join(x.status for x in results) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

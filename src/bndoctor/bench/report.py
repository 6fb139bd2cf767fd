"""Write a suite's results: raw JSON, a Markdown table with a short reading, and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .runner import SuiteResult
from .scenarios import DEMO_MNIST1D, SWEEP_BATCHES, SWEEP_LINES, Scenario

__all__ = ["findings", "markdown_table", "write_report"]


def _pct(value: float) -> str:
    text = f"{100 * value:.1f}"
    return "0.0" if text == "-0.0" else text


def markdown_table(suite: SuiteResult) -> str:
    """One row per scenario: mean ± sd over seeds, in percent."""
    lines = [
        "| scenario | setup | logical batch | seeds | final val acc % | last-5 val acc % (min–max over seeds) "
        "| jitter (pp) | monitor alerts | s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in suite.scenarios:
        if not suite.runs_of(s.name):
            continue
        m = suite.summary(s.name)
        setup = s.label() + (", shifted data" if s.domain == "shifted" else "")
        lines.append(
            f"| {s.name} | {setup} | {s.logical_batch} | {m['seeds']} "
            f"| {_pct(m['final_mean'])} ± {_pct(m['final_sd'])} "
            f"| {_pct(m['last5_mean'])} ± {_pct(m['last5_sd'])} ({_pct(m['last5_min'])}–{_pct(m['last5_max'])}) "
            f"| {_pct(m['jitter'])} | {_alerts(suite, s.name)} | {m['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def _alerts(suite: SuiteResult, name: str) -> str:
    """BNMonitor alerts of a scenario's runs, e.g. ``BN101 (3/3 seeds)``; ``none``; ``-`` (no BN)."""
    runs = suite.runs_of(name)
    monitored = [r.extra["monitor"] for r in runs if "monitor" in r.extra]
    if not monitored:
        return "-"
    codes = sorted({code for m in monitored for code in m["alerts"]})
    if not codes:
        return "none"
    parts = [f"{code} ({sum(code in m['alerts'] for m in monitored)}/{len(runs)} seeds)" for code in codes]
    return ", ".join(parts)


def _write_monitor_files(suite: SuiteResult, out_dir: Path) -> None:
    """Move each run's monitor records into ``monitor/<scenario>-seed<k>.jsonl`` (for ``bndoctor report``)."""
    from ..monitor.sinks import JsonlSink

    for run in suite.runs:
        monitor = run.extra.get("monitor")
        if not monitor or "records" not in monitor:
            continue
        path = out_dir / "monitor" / f"{run.scenario}-seed{run.seed}.jsonl"
        path.unlink(missing_ok=True)
        sink = JsonlSink(path)
        for record in monitor.pop("records"):
            sink.write(record)
        sink.close()
        monitor["file"] = str(path.relative_to(out_dir))


def findings(suite: SuiteResult) -> list[str]:
    """Plain sentences on what the numbers show, for the scenarios that ran."""
    ran = {s.name for s in suite.scenarios if suite.runs_of(s.name)}

    def acc(name: str) -> float:
        return suite.summary(name)["last5_mean"]

    out = []
    if {"bn-64", "bn-2x32-corr"} <= ran:
        ref, bad = acc("bn-64"), acc("bn-2x32-corr")
        jitter = suite.summary("bn-2x32-corr")["jitter"]
        out.append(
            f"BatchNorm at micro-batch 2 with class-correlated micro-batches reaches {_pct(bad)}% last-5 validation "
            f"accuracy against {_pct(ref)}% at batch 64 ({_pct(ref - bad)} pp lower, epoch-to-epoch jitter "
            f"{_pct(jitter)} pp), although both take the same optimizer steps on logical batches of 64: "
            "accumulation gives the gradient of the large batch, not its statistics."
        )
        if "bn-2x32-iid" in ran:
            out.append(
                f"With shuffled micro-batches of 2 the same setup reaches {_pct(acc('bn-2x32-iid'))}%: tiny batches "
                "hurt most when the samples of a micro-batch are alike."
            )
        for name, what in (("gn-2x32-corr", "GroupNorm"), ("bn-eval-2x32-corr", "BN kept in eval mode")):
            if name in ran and ref > bad:
                closed = (acc(name) - bad) / (ref - bad)
                out.append(
                    f"{what} at the same micro-batch reaches {_pct(acc(name))}%, "
                    f"closing {100 * closed:.0f}% of the gap."
                )
    if {"bn-2x32-corr", "bn-2x32-corr-recal"} <= ran:
        ema, precise = suite.summary("bn-2x32-corr"), suite.summary("bn-2x32-corr-recal")
        out.append(
            f"Recalibrating the BN statistics every epoch (bndoctor.recalibrate, PreciseBN) in the same correlated "
            f"micro-batch-2 run gives {_pct(precise['last5_mean'])}% instead of {_pct(ema['last5_mean'])}% with the "
            f"EMA statistics, and the epoch-to-epoch jitter drops from {_pct(ema['jitter'])} to "
            f"{_pct(precise['jitter'])} pp: most of the failure sits in the running statistics."
        )
    if "bn-64" in ran:
        for tag, sampler in (("corr", "class-correlated"), ("iid", "shuffled")):
            modes = [
                (m, f"accbn{'' if m == 'progressive' else '-' + m}-2x32-{tag}")
                for m in ("renorm", "progressive", "blend")
            ]
            modes.append(("renorm, two passes", f"accbn-2pass-2x32-{tag}"))
            modes = [(m, name) for m, name in modes if name in ran]
            if f"brn-2x32-{tag}" in ran:
                modes.append(("Batch Renorm (baseline)", f"brn-2x32-{tag}"))
            if modes:
                plain = f"bn-2x32-{tag}"
                base = f" (plain BN: {_pct(acc(plain))}%)" if plain in ran else ""
                listed = ", ".join(
                    f"{m} {_pct(acc(name))}% (jitter {_pct(suite.summary(name)['jitter'])} pp)" for m, name in modes
                )
                out.append(
                    f"Accumulation-aware BN at micro-batch 2 x 32, {sampler} micro-batches: {listed}, against "
                    f"{_pct(acc('bn-64'))}% for BN at batch 64{base}."
                )
    for tag in ("corr", "iid"):
        frozen, recal = f"ft-bn-frozen-2x32-{tag}", f"ft-bn-frozen-2x32-{tag}-recal"
        if {frozen, recal} <= ran:
            out.append(
                f"Frozen BN recalibrated on the target (shifted) data every epoch, {tag} micro-batches: "
                f"{_pct(acc(recal))}% against {_pct(acc(frozen))}% frozen alone "
                f"(jitter {_pct(suite.summary(recal)['jitter'])} vs {_pct(suite.summary(frozen)['jitter'])} pp)."
            )
    for local, synced in (("bn-2x8x4-corr", "syncbn-2x8x4-corr"),):
        if {local, synced} <= ran:
            spreads = {}
            for name in (local, synced):
                per_run = [r.extra.get("rank_last5", [r.last5_mean]) for r in suite.runs_of(name)]
                spreads[name] = max(max(v) - min(v) for v in per_run)
            world = next(sc.world_size for sc in suite.scenarios if sc.name == local)
            out.append(
                f"On {world} DDP ranks with micro-batches of 2 from one class each, local BN reaches "
                f"{_pct(acc(local))}% on rank 0 and the ranks' own running statistics make their accuracies differ "
                f"by up to {_pct(spreads[local])} pp; bndoctor SyncBatchNorm (normalising over all ranks' "
                f"micro-batches) reaches {_pct(acc(synced))}% with {_pct(spreads[synced])} pp between ranks."
            )
            if "accbn-sync-2x8x4-corr" in ran:
                out.append(
                    f"Accumulation-aware BN pooled across the same {world} ranks (normalisation batch: the window so "
                    f"far on all ranks, up to 64 images) reaches {_pct(acc('accbn-sync-2x8x4-corr'))}%, with one "
                    "collective per layer per micro-step instead of SyncBN's two."
                )
    if {"ft-bn-train-2x32-corr", "ft-bn-frozen-2x32-corr"} <= ran:
        train, frozen = acc("ft-bn-train-2x32-corr"), acc("ft-bn-frozen-2x32-corr")
        ref = f" (fine-tuning at batch 64: {_pct(acc('ft-bn-64'))}%)" if "ft-bn-64" in ran else ""
        out.append(
            f"Fine-tuning the batch-64 model on intensity-inverted digits at micro-batch 2 (correlated): BN left in "
            f"training mode reaches {_pct(train)}%, BN statistics frozen with bndoctor.freeze_bn {_pct(frozen)}%{ref}."
        )
    if {"ft-bn-train-2x32-iid", "ft-bn-frozen-2x32-iid"} <= ran:
        train, frozen = acc("ft-bn-train-2x32-iid"), acc("ft-bn-frozen-2x32-iid")
        spread = max(
            suite.summary("ft-bn-train-2x32-iid")["last5_sd"], suite.summary("ft-bn-frozen-2x32-iid")["last5_sd"]
        )
        verdict = (
            "frozen statistics come from the source domain, which the strong shift makes stale"
            if train - frozen > spread
            else "the two are within the spread over seeds"
        )
        out.append(
            f"With shuffled micro-batches the same fine-tuning gives {_pct(train)}% (BN in training mode) and "
            f"{_pct(frozen)}% (frozen): {verdict}."
        )
    if set(DEMO_MNIST1D) <= ran:  # short runs: the final epoch, not the mean of the last five
        ref, bad, fixed = (suite.summary(name)["final_mean"] for name in DEMO_MNIST1D)  # the tuple's order
        epochs = next(sc.epochs for sc in suite.scenarios if sc.name == DEMO_MNIST1D[0])
        out.append(
            f"MNIST-1D (harder than digits; the paper's CNN reaches 94%), {epochs} epoch{'s' if epochs != 1 else ''}, "
            f"one class per micro-batch of 2 x 32: plain BN {_pct(bad)}% final validation accuracy, "
            f"accumulation-aware BN {_pct(fixed)}%, BN at batch 64 {_pct(ref)}%."
        )
    lines = {}
    for prefix, _, _ in SWEEP_LINES:
        rows = [(b, acc(f"{prefix}-{b}")) for b in SWEEP_BATCHES if f"{prefix}-{b}" in ran]
        if len(rows) >= 2:
            lines[prefix] = rows
    if "sweep-bn" in lines and "sweep-gn" in lines:
        bn, gn = lines["sweep-bn"], lines["sweep-gn"]
        bn_drop, gn_drop = bn[0][1] - bn[-1][1], gn[0][1] - gn[-1][1]
        text = (
            f"Batch-size sweep at a logical batch of 32 (batch {'/'.join(str(b) for b, _ in bn)}, shuffled): "
            f"BN {'/'.join(_pct(v) for _, v in bn)}%, GN {'/'.join(_pct(v) for _, v in gn)}%. "
        )
        if bn_drop > max(1.0, 2 * abs(gn_drop)) / 100:
            text += (
                f"BN loses {_pct(bn_drop)} pp from the largest to the smallest batch while GN moves "
                f"{_pct(-gn_drop)} pp: the shape of the Group Normalization paper's result."
            )
        else:
            text += (
                f"BN moves only {_pct(-bn_drop)} pp from the largest to the smallest batch (GN {_pct(-gn_drop)} pp): "
                "with shuffled batches this small, easy data set does not reproduce the paper's BN degradation "
                "(ImageNet top-1 error 23.6% -> 34.7% from 32 to 2 images per GPU)."
            )
        if "sweep-bn-corr" in lines:
            corr = lines["sweep-bn-corr"]
            text += (
                f" With one class per micro-batch BN gives {'/'.join(_pct(v) for _, v in corr)}%: "
                "the degradation appears when the samples of a normalisation batch are alike."
            )
        out.append(text)
    return out


def _plot_curves(suite: SuiteResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups: dict[str, list[Scenario]] = {}
    for s in suite.scenarios:
        if suite.runs_of(s.name):
            groups.setdefault(s.group, []).append(s)
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    for ax, (group, scenarios) in zip(axes[0], groups.items()):
        if len(scenarios) > 10:  # the default cycle has 10 colours
            ax.set_prop_cycle(color=plt.cm.tab20.colors)
        for s in scenarios:
            curves = np.array([r.val_acc for r in suite.runs_of(s.name)]) * 100
            epochs = np.arange(1, curves.shape[1] + 1)
            (line,) = ax.plot(epochs, curves.mean(0), label=f"{s.name}")
            if len(curves) > 1:
                ax.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.15, color=line.get_color())
        ax.set_title(f"{group}: validation accuracy (mean, min–max over seeds)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val accuracy %")
        ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]), top=100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_sweep(suite: SuiteResult, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    drawn = False
    labels = {"sweep-bn": "BatchNorm", "sweep-gn": "GroupNorm", "sweep-bn-corr": "BatchNorm, one class per micro-batch"}
    for prefix, _, _ in SWEEP_LINES:
        label = labels.get(prefix, prefix)
        rows = [(b, suite.summary(f"{prefix}-{b}")) for b in SWEEP_BATCHES if suite.runs_of(f"{prefix}-{b}")]
        if not rows:
            continue
        drawn = True
        ax.errorbar(
            [b for b, _ in rows],
            [100 * (1 - m["last5_mean"]) for _, m in rows],
            yerr=[100 * m["last5_sd"] for _, m in rows],
            marker="o",
            capsize=3,
            label=label,
        )
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(SWEEP_BATCHES), [str(b) for b in SWEEP_BATCHES])
        ax.invert_xaxis()
        ax.set_xlabel("images per normalisation batch (logical batch 32)")
        ax.set_ylabel("val error % (last-5 mean, ± sd over seeds)")
        ax.set_title("BN vs GN across batch sizes (GN paper, Fig. 1, in miniature)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


#: the reference figures of MNIST-1D's paper, printed beside bndoctor's results on it
MNIST1D_PAPER = (
    'MNIST-1D reference figures (Greydanus 2020, "Scaling down deep learning", test accuracy): logistic '
    "regression 32 %, MLP 68 %, CNN 94 %, GRU 91 %, human 96 %. bndoctor's model is resnet1d (81k parameters, "
    "BatchNorm1d); its batch-64 row above is the comparable figure."
)


def _data_descriptions(suite: SuiteResult) -> list[str]:
    """One phrase per data set the suite's scenarios use, in order of first use."""
    phrases = {
        "digits": "digits (scikit-learn), 1,438 train / 359 validation images, tiny ResNet (77k parameters)",
        "mnist1d": "MNIST-1D (the mnist1d package, generated offline), 4,000 train / 1,000 validation "
        "sequences of 40 values, resnet1d (81k parameters)",
    }
    seen: list[str] = []
    for s in suite.scenarios:
        name = s.dataset if not s.dataset.startswith("path:") else "path"
        text = phrases.get(name, f"the data at {s.dataset[len('path:') :]}, model chosen for its input shape")
        if text not in seen:
            seen.append(text)
    return seen or [phrases["digits"]]


def write_report(suite: SuiteResult, out_dir: Path, *, plots: bool = True) -> dict[str, Any]:
    """Write results.json, report.md and the plots into ``out_dir``; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {}
    results = out_dir / "results.json"
    _write_monitor_files(suite, out_dir)
    results.write_text(json.dumps(suite.to_json(), indent=1))
    paths["results"] = str(results)
    images = []
    if plots:
        curves = out_dir / "curves.png"
        _plot_curves(suite, curves)
        images.append(curves)
        sweep = out_dir / "sweep.png"
        if _plot_sweep(suite, sweep):
            images.append(sweep)
    paths["plots"] = [str(p) for p in images]
    lines = ["# bndoctor benchmark", ""]
    if suite.command:
        lines += [f"Reproduce: `{suite.command}`", ""]
    lines += [
        f"Seeds {', '.join(map(str, suite.seeds))}; {'; '.join(_data_descriptions(suite))}; SGD with Nesterov "
        f"momentum and cosine decay. Accuracies are on the validation set of the scenario's domain, mean ± sd "
        f"over seeds; jitter is the standard deviation of the last 5 epochs within a run. Total wall time "
        f"{suite.wall_s:.0f} s.",
        "",
        markdown_table(suite),
        "",
    ]
    if any(s.dataset == "mnist1d" for s in suite.scenarios):
        lines += [MNIST1D_PAPER, ""]
    found = findings(suite)
    if found:
        lines += ["## What it shows", ""] + [f"- {f}" for f in found] + [""]
    lines += [f"![{p.stem}]({p.name})" for p in images]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    paths["report"] = str(report)
    return paths

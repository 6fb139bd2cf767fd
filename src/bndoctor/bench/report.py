"""Write a suite's results: raw JSON, a Markdown table with a short reading, and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .runner import SuiteResult
from .scenarios import SWEEP_BATCHES, SWEEP_LOGICAL, Scenario

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


#: what a scenario is unless a query says otherwise: one process, plain BN training from scratch on digits
#: (any number of epochs: a reading compares the scenarios it finds with its reference's epochs)
_PLAIN: dict[str, Any] = dict(
    dataset="digits",
    norm="batch",
    sampler="iid",
    domain="source",
    pretrained=False,
    remedy=None,
    recalibrate=False,
    bn_eval=False,
    world_size=1,
    sync_bn=False,
    accum_bn=None,
    batch_renorm=False,
    brn_warmup=5000,
    two_pass=False,
)


def _field(scenario: Scenario, key: str) -> Any:
    if key == "pretrained":
        return scenario.pretrain is not None
    if key == "remedy":
        return None if scenario.remedy is None else getattr(scenario.remedy, "__name__", "remedy")
    return getattr(scenario, key)


class _Ran:
    """The scenarios of a suite that ran, found by what they are (their fields), not by their names."""

    def __init__(self, suite: SuiteResult) -> None:
        self.suite = suite
        self.scenarios = [s for s in suite.scenarios if suite.runs_of(s.name)]

    def find(self, **fields: Any) -> Scenario | None:
        """The first scenario that ran with these fields (and :data:`_PLAIN` for the rest), or None.

        Scenarios are tried in the suite's order (the registry's), so where several differ only in their
        epochs the registered first one is the reference.
        """
        spec = {**_PLAIN, **fields}
        return next((s for s in self.scenarios if all(_field(s, k) == v for k, v in spec.items())), None)

    def acc(self, scenario: Scenario) -> float:
        return self.suite.summary(scenario.name)["last5_mean"]

    def jitter(self, scenario: Scenario) -> float:
        return self.suite.summary(scenario.name)["jitter"]


_SMALL = dict(micro_batch=2, accum_steps=32)  # the harness's tiny physical batch, same logical batch as 64
_LARGE = dict(micro_batch=64, accum_steps=1)
_CORR = dict(sampler="correlated")


def _small_batch_failure(ran: _Ran) -> list[str]:
    ref = ran.find(**_LARGE)
    bad = ran.find(**_SMALL, **_CORR, epochs=ref.epochs) if ref is not None else None
    if ref is None or bad is None:
        return []
    r, b = ran.acc(ref), ran.acc(bad)
    same = dict(epochs=ref.epochs)
    out = [
        f"BatchNorm at micro-batch 2 with class-correlated micro-batches reaches {_pct(b)}% last-5 validation "
        f"accuracy against {_pct(r)}% at batch 64 ({_pct(r - b)} pp lower, epoch-to-epoch jitter "
        f"{_pct(ran.jitter(bad))} pp), although both take the same optimizer steps on logical batches of 64: "
        "accumulation gives the gradient of the large batch, not its statistics."
    ]
    shuffled = ran.find(**_SMALL, **same)
    if shuffled is not None:
        out.append(
            f"With shuffled micro-batches of 2 the same setup reaches {_pct(ran.acc(shuffled))}%: tiny batches "
            "hurt most when the samples of a micro-batch are alike."
        )
    for other, what in (
        (ran.find(**_SMALL, **_CORR, **same, norm="group"), "GroupNorm"),
        (ran.find(**_SMALL, **_CORR, **same, bn_eval=True), "BN kept in eval mode"),
    ):
        if other is not None and r > b:
            closed = (ran.acc(other) - b) / (r - b)
            reached = _pct(ran.acc(other))
            out.append(f"{what} at the same micro-batch reaches {reached}%, closing {100 * closed:.0f}% of the gap.")
    return out


def _recalibration(ran: _Ran) -> list[str]:
    ema = ran.find(**_SMALL, **_CORR)
    precise = ran.find(**_SMALL, **_CORR, recalibrate=True, epochs=ema.epochs) if ema is not None else None
    if ema is None or precise is None:
        return []
    return [
        f"Recalibrating the BN statistics every epoch (bndoctor.recalibrate, PreciseBN) in the same correlated "
        f"micro-batch-2 run gives {_pct(ran.acc(precise))}% instead of {_pct(ran.acc(ema))}% with the "
        f"EMA statistics, and the epoch-to-epoch jitter drops from {_pct(ran.jitter(ema))} to "
        f"{_pct(ran.jitter(precise))} pp: most of the failure sits in the running statistics."
    ]


def _accumulation_aware(ran: _Ran) -> list[str]:
    ref = ran.find(**_LARGE)
    if ref is None:
        return []
    out = []
    for sampler, words in (("correlated", "class-correlated"), ("iid", "shuffled")):
        like = dict(_SMALL, sampler=sampler, epochs=ref.epochs)
        variants = [(mode, ran.find(**like, accum_bn=mode)) for mode in ("renorm", "progressive", "blend")]
        variants.append(("renorm, two passes", ran.find(**like, accum_bn="renorm", two_pass=True)))
        variants.append(("Batch Renorm (baseline)", ran.find(**like, batch_renorm=True)))
        variants = [(what, s) for what, s in variants if s is not None]
        if not variants:
            continue
        plain = ran.find(**like)
        base = f" (plain BN: {_pct(ran.acc(plain))}%)" if plain is not None else ""
        listed = ", ".join(f"{what} {_pct(ran.acc(s))}% (jitter {_pct(ran.jitter(s))} pp)" for what, s in variants)
        out.append(
            f"Accumulation-aware BN at micro-batch 2 x 32, {words} micro-batches: {listed}, against "
            f"{_pct(ran.acc(ref))}% for BN at batch 64{base}."
        )
    return out


_FINETUNE = dict(pretrained=True, domain="shifted", **_SMALL)


def _frozen_recalibrated(ran: _Ran) -> list[str]:
    out = []
    for sampler, tag in (("correlated", "corr"), ("iid", "iid")):
        frozen = ran.find(**_FINETUNE, sampler=sampler, remedy="frozen_bn")
        if frozen is None:
            continue
        recal = ran.find(**_FINETUNE, sampler=sampler, remedy="frozen_bn", recalibrate=True, epochs=frozen.epochs)
        if recal is not None:
            out.append(
                f"Frozen BN recalibrated on the target (shifted) data every epoch, {tag} micro-batches: "
                f"{_pct(ran.acc(recal))}% against {_pct(ran.acc(frozen))}% frozen alone "
                f"(jitter {_pct(ran.jitter(recal))} vs {_pct(ran.jitter(frozen))} pp)."
            )
    return out


def _ranks(ran: _Ran) -> list[str]:
    ddp = dict(micro_batch=2, accum_steps=8, world_size=4, **_CORR)
    local = ran.find(**ddp)
    synced = ran.find(**ddp, sync_bn=True, epochs=local.epochs) if local is not None else None
    if local is None or synced is None:
        return []
    ddp["epochs"] = local.epochs
    spreads = {}
    for s in (local, synced):
        per_run = [r.extra.get("rank_last5", [r.last5_mean]) for r in ran.suite.runs_of(s.name)]
        spreads[s.name] = max(max(v) - min(v) for v in per_run)
    out = [
        f"On {local.world_size} DDP ranks with micro-batches of 2 from one class each, local BN reaches "
        f"{_pct(ran.acc(local))}% on rank 0 and the ranks' own running statistics make their accuracies differ "
        f"by up to {_pct(spreads[local.name])} pp; bndoctor SyncBatchNorm (normalising over all ranks' "
        f"micro-batches) reaches {_pct(ran.acc(synced))}% with {_pct(spreads[synced.name])} pp between ranks."
    ]
    pooled = ran.find(**ddp, sync_bn=True, accum_bn="renorm")
    if pooled is not None:
        out.append(
            f"Accumulation-aware BN pooled across the same {local.world_size} ranks (normalisation batch: the window "
            f"so far on all ranks, up to 64 images) reaches {_pct(ran.acc(pooled))}%, with one collective per layer "
            "per micro-step instead of SyncBN's two."
        )
    return out


def _finetuning(ran: _Ran) -> list[str]:
    out = []
    train = ran.find(**_FINETUNE, **_CORR)
    frozen = ran.find(**_FINETUNE, **_CORR, remedy="frozen_bn", epochs=train.epochs) if train is not None else None
    if train is not None and frozen is not None:
        reference = ran.find(pretrained=True, domain="shifted", epochs=train.epochs, **_LARGE)
        ref = f" (fine-tuning at batch 64: {_pct(ran.acc(reference))}%)" if reference is not None else ""
        out.append(
            f"Fine-tuning the batch-64 model on intensity-inverted digits at micro-batch 2 (correlated): BN left in "
            f"training mode reaches {_pct(ran.acc(train))}%, BN statistics frozen with bndoctor.freeze_bn "
            f"{_pct(ran.acc(frozen))}%{ref}."
        )
    train = ran.find(**_FINETUNE)
    frozen = ran.find(**_FINETUNE, remedy="frozen_bn", epochs=train.epochs) if train is not None else None
    if train is not None and frozen is not None:
        t, f = ran.acc(train), ran.acc(frozen)
        spread = max(ran.suite.summary(train.name)["last5_sd"], ran.suite.summary(frozen.name)["last5_sd"])
        verdict = (
            "frozen statistics come from the source domain, which the strong shift makes stale"
            if t - f > spread
            else "the two are within the spread over seeds"
        )
        out.append(
            f"With shuffled micro-batches the same fine-tuning gives {_pct(t)}% (BN in training mode) and "
            f"{_pct(f)}% (frozen): {verdict}."
        )
    return out


def _mnist1d_demo(ran: _Ran) -> list[str]:
    demo = dict(dataset="mnist1d", group="demo-mnist1d")
    found = [ran.find(**demo, **_LARGE), ran.find(**demo, **_SMALL, **_CORR)]
    found.append(ran.find(**demo, **_SMALL, **_CORR, accum_bn="renorm"))
    if any(s is None for s in found):
        return []
    ref, bad, fixed = (ran.suite.summary(s.name)["final_mean"] for s in found)  # short runs: the final epoch
    epochs = found[0].epochs
    return [
        f"MNIST-1D (harder than digits; the paper's CNN reaches 94%), {epochs} epoch{'s' if epochs != 1 else ''}, "
        f"one class per micro-batch of 2 x 32: plain BN {_pct(bad)}% final validation accuracy, "
        f"accumulation-aware BN {_pct(fixed)}%, BN at batch 64 {_pct(ref)}%."
    ]


#: the sweep's lines: (norm, sampler) -> the label of its curve
_SWEEP_LINES = {
    ("batch", "iid"): "BatchNorm",
    ("group", "iid"): "GroupNorm",
    ("batch", "correlated"): "BatchNorm, one class per micro-batch",
}


def _sweep_lines(ran: _Ran) -> dict[tuple[str, str], list[tuple[int, Scenario]]]:
    """Each line of the batch-size sweep that ran: (batch, scenario) from the largest batch to the smallest."""
    lines = {}
    for norm, sampler in _SWEEP_LINES:
        found = [
            (b, ran.find(norm=norm, sampler=sampler, micro_batch=b, accum_steps=SWEEP_LOGICAL // b))
            for b in SWEEP_BATCHES
        ]
        rows = [(b, s) for b, s in found if s is not None]
        if rows:
            lines[(norm, sampler)] = rows
    return lines


def _sweep(ran: _Ran) -> list[str]:
    lines = {key: [(b, ran.acc(s)) for b, s in rows] for key, rows in _sweep_lines(ran).items() if len(rows) >= 2}
    bn, gn = lines.get(("batch", "iid")), lines.get(("group", "iid"))
    if bn is None or gn is None:
        return []
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
    corr = lines.get(("batch", "correlated"))
    if corr is not None:
        text += (
            f" With one class per micro-batch BN gives {'/'.join(_pct(v) for _, v in corr)}%: "
            "the degradation appears when the samples of a normalisation batch are alike."
        )
    return [text]


#: the readings, in the order the report prints them; each finds the scenarios it compares by their fields
_READINGS = (
    _small_batch_failure,
    _recalibration,
    _accumulation_aware,
    _frozen_recalibrated,
    _ranks,
    _finetuning,
    _mnist1d_demo,
    _sweep,
)


def findings(suite: SuiteResult) -> list[str]:
    """Plain sentences on what the numbers show, for the scenarios that ran."""
    ran = _Ran(suite)
    return [sentence for reading in _READINGS for sentence in reading(ran)]


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
    for key, found in _sweep_lines(_Ran(suite)).items():
        label = _SWEEP_LINES[key]
        rows = [(b, suite.summary(s.name)) for b, s in found]
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

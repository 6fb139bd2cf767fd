"""Render a monitor run (JSONL) as a Markdown and an HTML report with PNG plots.

    bndoctor report run.jsonl --out report/

Plots: the effective normalisation batch per layer over time (log scale,
with the threshold of 8), the drift of running statistics between samples,
and, for multi-rank runs, the cross-rank divergence.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BNDoctorError
from .alerts import DIVERGENCE_ALERT

__all__ = ["RECENT_STEPS", "MonitorRun", "load_run", "recent_b_simple", "write_run_report"]


@dataclass
class MonitorRun:
    """The records of one monitor run, split by kind."""

    path: str
    start: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    divergence: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    noise: list[dict[str, Any]] = field(default_factory=list)
    runs_in_file: int = 1

    @property
    def layers(self) -> list[str]:
        names = list(self.start.get("layers", []))
        for sample in self.samples:
            names.extend(n for n in sample["layers"] if n not in names)
        return names

    def series(self, layer: str, metric: str) -> tuple[list[int], list[float]]:
        steps, values = [], []
        for sample in self.samples:
            value = sample["layers"].get(layer, {}).get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                steps.append(sample["step"])
                values.append(float(value))
        return steps, values


_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

#: fields each kind of record must have, with the types they must be (numbers may be non-finite)
_REQUIRED: dict[str, dict[str, tuple[type, ...]]] = {
    "sample": {"step": (int, float), "layers": (dict,)},
    "divergence": {"step": (int, float), "max": (int, float)},
    "alert": {"step": (int, float), "finding": (dict,)},
    "noise": {"step": (int, float), "b_simple": (int, float), "logical_batch": (int, float)},
}


def _decode(value: Any) -> Any:
    """The JSONL sink writes NaN/Inf as strings (JSON has none): read them back as floats."""
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _check_fields(record: dict[str, Any], kind: str, where: str) -> None:
    for name, types in _REQUIRED.get(kind, {}).items():
        value = record.get(name)
        if isinstance(value, bool) or not isinstance(value, types):
            found = "missing" if name not in record else f"{type(value).__name__} {value!r}"[:60]
            raise BNDoctorError(
                f"{where}: a {kind!r} record needs {name!r} ({' or '.join(t.__name__ for t in types)}), found {found}",
                hint="pass a file written by bndoctor.BNMonitor, unedited",
            )
    if kind == "alert":
        finding = record["finding"]
        for name in ("code", "severity", "message"):
            if not isinstance(finding.get(name), str):
                raise BNDoctorError(
                    f"{where}: the alert's finding needs a string {name!r}",
                    hint="pass a file written by bndoctor.BNMonitor, unedited",
                )


def load_run(path: str | Path) -> MonitorRun:
    """Read a JSONL file written by :class:`bndoctor.BNMonitor`.

    A file that holds several runs (a sink path reused) yields the last one;
    ``MonitorRun.runs_in_file`` says how many there were.
    """
    path = Path(path)
    if not path.is_file():
        raise BNDoctorError(
            f"no monitor file at {str(path)!r}", hint="pass the JSONL path given to BNMonitor(sink=...)"
        )
    run = MonitorRun(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BNDoctorError(f"{path.name} is not a text file", hint="pass the JSONL file BNMonitor wrote") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BNDoctorError(
                f"{path.name} line {number} is not JSON ({exc.msg})",
                hint="pass a file written by bndoctor.BNMonitor (one JSON object per line)",
            ) from None
        kind = record.get("kind") if isinstance(record, dict) else None
        if not isinstance(kind, str):
            continue
        record = _decode(record)
        _check_fields(record, kind, f"{path.name} line {number}")
        if kind == "start":
            if run.start or run.samples:  # a second run appended to the same file: report the last one
                run = MonitorRun(str(path), runs_in_file=run.runs_in_file + 1)
            run.start = record
        elif kind == "sample":
            run.samples.append(record)
        elif kind == "divergence":
            run.divergence.append(record)
        elif kind == "alert":
            run.alerts.append(record)
        elif kind == "noise":
            run.noise.append(record)
    if not run.samples and not run.start:
        raise BNDoctorError(
            f"{path.name} holds no monitor records",
            hint="the run may have stopped before its first sampled forward; check BNMonitor(every=...)",
        )
    return run


def _num(value: Any, spec: str) -> str:
    """A number formatted with ``spec``; ``-`` for anything else (a missing or null field)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    if not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _layer_rows(run: MonitorRun) -> list[list[Any]]:
    rows = []
    for layer in run.layers:
        _, n_eff = run.series(layer, "n_eff")
        _, drift = run.series(layer, "drift_mean")
        _, collapsed = run.series(layer, "collapsed")
        tail = n_eff[-5:]
        rows.append(
            [
                layer,
                f"{statistics.median(n_eff):.1f}" if n_eff else "-",
                f"{statistics.median(tail):.1f}" if tail else "-",
                f"{max(drift):.3f}" if drift else "-",
                f"{max(collapsed):.0%}" if collapsed else "-",
            ]
        )
    return rows


#: at most this many lines per plot; more layers are drawn as one line (median) and band (range) per stage
MAX_LINES = 8


def stages(layers: list[str], most: int = MAX_LINES) -> dict[str, list[str]]:
    """Group layer names into at most ``most`` stages by a common name prefix (``layer1.0.bn1`` -> ``layer1``).

    Few layers stay one per group. Otherwise the deepest prefix length that
    gives at most ``most`` groups is used (``layer1``...``layer4`` for a
    ResNet; ``net.layers.0``... for a wrapped one).
    """
    if len(layers) <= most:
        return {name: [name] for name in layers}
    parts = [name.split(".") for name in layers]
    best: dict[str, list[str]] = {"all layers": list(layers)}
    for depth in range(1, max(len(p) for p in parts)):
        groups: dict[str, list[str]] = {}
        for name, part in zip(layers, parts):
            groups.setdefault(".".join(part[:depth]), []).append(name)
        if len(groups) > most:
            break
        if len(groups) > 1 or len(best) == 1:
            best = groups
    return best


def rolling_median(values: list[float], window: int) -> list[float]:
    """The statistic the effective-batch alert uses: the median of the last ``window`` samples."""
    return [statistics.median(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def _grouped_series(
    run: MonitorRun, metric: str, groups: dict[str, list[str]], smooth: int
) -> list[tuple[str, list[int], list[float], list[float], list[float]]]:
    """Per group: steps, median over its layers, and the band (min, max) at each sampled step."""
    out = []
    for label, names in groups.items():
        by_step: dict[int, list[float]] = {}
        for name in names:
            steps, values = run.series(name, metric)
            if smooth > 1:
                values = rolling_median(values, smooth)
            for step, value in zip(steps, values):
                by_step.setdefault(step, []).append(value)
        if not by_step:
            continue
        steps = sorted(by_step)
        out.append(
            (
                label if len(names) == 1 else f"{label} ({len(names)} layers)",
                steps,
                [statistics.median(by_step[k]) for k in steps],
                [min(by_step[k]) for k in steps],
                [max(by_step[k]) for k in steps],
            )
        )
    return out


def _plain_log_ticks(value: float, _: Any) -> str:
    """Log-axis labels as plain numbers (2, 5, 10 rather than 2x10^0), only at 1, 2 and 5 of each decade."""
    if value <= 0:
        return ""
    lead = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if any(abs(lead - k) < 1e-6 for k in (1, 2, 5)) else ""


def _finish(fig: Any, ax: Any, out: Path, name: str, xlabel: str, ylabel: str, title: str, legend: Any) -> None:
    """Label the axes, add the legend (keyword arguments of ``legend``) and write ``out/name``."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)


def _stage_plot(run: MonitorRun, out: Path, metric: str, title: str, ylabel: str, name: str, smooth: int) -> bool:
    """One line per stage of the network (median over its layers, range shaded), log scale."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    groups = stages(run.layers)
    series = _grouped_series(run, metric, groups, smooth)
    if not series:
        return False
    colors = plt.cm.viridis([i / max(len(groups) - 1, 1) for i in range(len(groups))])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (label, steps, middle, low, high), color in zip(series, colors):
        ax.plot(steps, [max(v, 1e-6) for v in middle], color=color, linewidth=1.4, label=label)
        if low != high:
            ax.fill_between(steps, [max(v, 1e-6) for v in low], [max(v, 1e-6) for v in high], color=color,
                            alpha=0.15, linewidth=0)  # fmt: skip
    if metric == "n_eff":
        for value, text, style in _batch_lines(run):
            ax.axhline(value, color="gray", linestyle=style, linewidth=1, label=text)
    ax.set_yscale("log")
    plain = FuncFormatter(_plain_log_ticks)
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    grouped = any(len(v) > 1 for v in groups.values())
    legend = dict(fontsize=7, ncol=2, title="median and range per stage" if grouped else None, title_fontsize=7)
    _finish(fig, ax, out, name, "optimizer step", ylabel, title, legend)
    return True


def _batch_lines(run: MonitorRun) -> list[tuple[float, str, str]]:
    """The micro-batch and the normalisation batch (window, ranks) the layers recorded: lines for the n_eff plot."""
    images: list[float] = []
    batches: list[float] = []
    for record in run.samples:
        for layer in (record.get("layers") or {}).values():
            if isinstance(layer.get("images"), (int, float)) and layer["images"] > 0:
                images.append(float(layer["images"]))
            if isinstance(layer.get("batch"), (int, float)) and math.isfinite(layer["batch"]):
                batches.append(float(layer["batch"]))
    lines = []
    if images:
        lines.append((statistics.median(images), f"micro-batch ({statistics.median(images):g} samples)", ":"))
    if batches and max(batches) > (max(images) if images else 0):
        lines.append((max(batches), f"normalisation batch (window or ranks, up to {max(batches):g})", "--"))
    return lines


def _divergence_plot(run: MonitorRun, out: Path) -> bool:
    import matplotlib.pyplot as plt

    if not run.divergence:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([r["step"] for r in run.divergence], [r["max"] for r in run.divergence], marker="o")
    ax.axhline(DIVERGENCE_ALERT, color="red", linestyle="--", linewidth=1, label="alert threshold (BN503)")
    title = "cross-rank divergence of running statistics (mean in std, variance relative)"
    _finish(fig, ax, out, "monitor-divergence.png", "optimizer step", "largest difference across ranks", title,
            dict(fontsize=8))  # fmt: skip
    return True


def _noise_plot(run: MonitorRun, out: Path) -> bool:
    import matplotlib.pyplot as plt

    noise = [r for r in run.noise if isinstance(r.get("b_simple"), (int, float)) and math.isfinite(r["b_simple"])]
    if not noise:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    recent = recent_b_simple([r["b_simple"] for r in run.noise])
    unresolved = len(run.noise) - len(noise)
    # estimates of a noise scale that is not measurable are drawn faint: single steps, not a measurement
    style = dict(color="gray", alpha=0.5, marker=".", linestyle="none") if recent is None else {}
    ax.plot([r["step"] for r in noise], [r["b_simple"] for r in noise], label="B_simple per step", **style)
    ax.axhline(run.noise[-1]["logical_batch"], color="gray", linestyle="--", linewidth=1, label="logical batch")
    ax.set_yscale("log")
    title = "gradient noise scale B_simple" + (
        f": not measurable (the mean gradient is lost in the noise; {unresolved} of {len(run.noise)} steps had no "
        "estimate)"
        if recent is None
        else f": {recent:.3g} (median of the last steps)"
    )
    _finish(fig, ax, out, "monitor-noise.png", "optimizer step", "samples (log)", title, dict(fontsize=8))
    return True


def _plots(run: MonitorRun, out: Path) -> list[tuple[str, str]]:
    """Draw every plot the run has data for; returns (file name, title) of each."""
    import matplotlib

    matplotlib.use("Agg")
    window = int(run.start.get("window", 5)) if _num(run.start.get("window"), "d") != "-" else 5
    stage_plots = (
        (
            "n_eff",
            f"effective normalisation batch (median of the last {window} samples), in samples",
            "independent samples (log)",
            "monitor-neff.png",
            window,
        ),
        (
            "drift_mean",
            "drift of the running mean between samples",
            "standard deviations (log)",
            "monitor-drift.png",
            1,
        ),
    )
    made = []
    for metric, title, ylabel, name, smooth in stage_plots:
        if _stage_plot(run, out, metric, title, ylabel, name, smooth):
            made.append((name, title))
    if _divergence_plot(run, out):
        made.append(("monitor-divergence.png", "cross-rank divergence"))
    if _noise_plot(run, out):
        made.append(("monitor-noise.png", "gradient noise scale"))
    return made


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(html.escape(str(c)).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary(run: MonitorRun) -> str:
    """One paragraph: the model, its layers, the samples and the run file."""
    steps = [s["step"] for s in run.samples]
    parts = [f"{run.start.get('model', 'model')}: {len(run.layers)} BN layer(s), {len(run.samples)} samples"]
    if steps:
        parts.append(f" from step {steps[0]} to {steps[-1]}")
    parts.append(f", one every {run.start.get('every', '?')} training forwards")
    if _num(run.start.get("world_size"), "d") not in ("-", "1"):
        parts.append(f", world size {run.start['world_size']}")
    parts.append(".")
    if run.runs_in_file > 1:
        parts.append(f" The file holds {run.runs_in_file} runs (its sink path was reused); this report shows the last.")
    return "".join(parts)


_ALERT_HEADERS = ["step", "code", "severity", "layer", "finding", "fix"]
_LAYER_HEADERS = ["layer", "effective batch (median)", "effective batch (last 5)", "max drift", "max collapsed"]


def _alert_rows(run: MonitorRun) -> list[list[Any]]:
    return [
        [
            a["step"],
            a["finding"]["code"],
            a["finding"]["severity"],
            a["finding"].get("module") or "(model)",
            a["finding"]["message"],
            a["finding"].get("fix", ""),
        ]
        for a in run.alerts
    ]


def _notes(run: MonitorRun) -> list[str]:
    """The paragraphs under the layer table: what the figures mean, divergence and noise summaries."""
    notes = [
        "\nEffective batch: how many independent samples the statistics a layer normalises with are worth: its "
        "normalisation batch (the micro-batch, or the window or ranks it pools), divided by the design effect "
        "of micro-batches whose samples are alike; never more than that batch (the plot's dashed lines). "
        "Drift: change of the running mean between samples, in standard deviations."
    ]
    if run.divergence:
        last = run.divergence[-1]
        notes.append(
            f"\nCross-rank divergence: {len(run.divergence)} checks, last at step {last['step']}: "
            f"max {_num(last['max'], '.3f')}."
        )
    if run.noise:
        last = run.noise[-1]
        alpha = last.get("alpha")
        recent = recent_b_simple([r["b_simple"] for r in run.noise])
        measured = "not measurable (the mean gradient is lost in the noise)" if recent is None else f"{recent:.3g}"
        notes.append(
            f"\nGradient noise scale: {len(run.noise)} steps; B_simple over the last steps {measured} for a "
            f"logical batch of {_num(last['logical_batch'], 'g')}"
            + ("" if _num(alpha, ".2f") == "-" else f", tail index {_num(alpha, '.2f')}")
            + "."
        )
    return notes


def _write_html(run: MonitorRun, out: Path, summary: str, alert_rows: list[list[Any]], layer_rows: list[list[Any]],
                images: list[tuple[str, str]]) -> None:  # fmt: skip
    """``report.html``, with its images embedded: the file is complete on its own (mail it, attach it)."""
    body = [
        "<h1>BatchNorm monitor report</h1>",
        f"<p>Source: <code>{html.escape(run.path)}</code></p><p>{html.escape(summary)}</p>",
        "<h2>Alerts</h2>",
        _html_table(_ALERT_HEADERS, alert_rows) if alert_rows else "<p>No alerts.</p>",
        "<h2>Layers</h2>",
        _html_table(_LAYER_HEADERS, layer_rows),
    ]
    body += [
        f'<h3>{html.escape(title)}</h3><img src="data:image/png;base64,'
        f'{base64.b64encode((out / name).read_bytes()).decode("ascii")}" alt="{html.escape(title)}">'
        for name, title in images
    ]
    style = "body{font-family:sans-serif;max-width:1000px;margin:auto}td,th{border:1px solid #ccc;padding:3px 6px}"
    (out / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>bndoctor monitor</title><style>{style}</style>"
        f"</head><body>{''.join(body)}</body></html>\n",
        encoding="utf-8",
    )


def write_run_report(run: MonitorRun, out: str | Path, *, plots: bool = True) -> Path:
    """Write ``report.md``, ``report.html`` and the plots into ``out``.

    The HTML file embeds its images (one file to share); the Markdown file links the PNG files next to it.

    Args:
        run: a run file read by :func:`load_run`.
        out: the folder to write into (made if missing).
        plots: draw the PNG plots (needs matplotlib).

    Returns:
        The path of ``report.md``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = _plots(run, out) if plots and run.samples else []
    summary = _summary(run)
    alert_rows, layer_rows = _alert_rows(run), _layer_rows(run)
    md = [f"# BatchNorm monitor report\n\nSource: `{run.path}`\n\n{summary}\n", "## Alerts\n"]
    md.append(_md_table(_ALERT_HEADERS, alert_rows) if alert_rows else "No alerts.")
    md += ["\n## Layers\n", _md_table(_LAYER_HEADERS, layer_rows), *_notes(run)]
    md += [f"\n![{title}]({name})" for name, title in images]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    _write_html(run, out, summary, alert_rows, layer_rows, images)
    return md_path


#: steps whose B_simple :func:`recent_b_simple` summarises
RECENT_STEPS = 10


def recent_b_simple(values: list[float], steps: int = RECENT_STEPS) -> float | None:
    """The noise scale of the last ``steps`` estimates: their median, or None when it is not measurable.

    An estimate is unresolved when it is not finite (the smoothed ``|G|^2`` was not positive: the mean
    gradient is lost in the noise). When more than half of the recent estimates are unresolved the noise
    scale is not measurable at this batch, and None says so; the monitor's summary (``bndoctor watch``),
    ``bndoctor report`` and its plot all use this one rule.

    Args:
        values: the B_simple estimates of the steps so far, oldest first (``inf`` or NaN where unresolved).
        steps: how many of the last estimates to summarise.

    Returns:
        The median of the resolved recent estimates, or None when most of them are unresolved.
    """
    recent = [float(v) for v in values[-steps:]]
    finite = [v for v in recent if math.isfinite(v) and v > 0]
    return statistics.median(finite) if recent and 2 * len(finite) > len(recent) else None

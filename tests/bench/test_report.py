import json

from bndoctor.bench import SCENARIOS
from bndoctor.bench.report import findings, markdown_table, write_report
from bndoctor.bench.runner import RunResult, SuiteResult


def _suite():
    names = ["bn-64", "bn-2x32-corr", "gn-2x32-corr", "sweep-bn-32", "sweep-bn-2", "sweep-gn-32", "sweep-gn-2"]
    acc = {
        "bn-64": 0.98,
        "bn-2x32-corr": 0.80,
        "gn-2x32-corr": 0.97,
        "sweep-bn-32": 0.98,
        "sweep-bn-2": 0.90,
        "sweep-gn-32": 0.97,
        "sweep-gn-2": 0.97,
    }
    runs = [
        RunResult(n, seed, [acc[n] - 0.1] + [acc[n] + 0.01 * seed] * 5, [1.0] * 6, 2.0)
        for n in names
        for seed in (0, 1)
    ]
    return SuiteResult([SCENARIOS[n] for n in names], [0, 1], runs, 10.0, command="bndoctor bench")


def test_table_rows_and_numbers():
    table = markdown_table(_suite())
    row = next(line for line in table.splitlines() if line.startswith("| bn-2x32-corr"))
    assert "| 64 | 2 | 80.5 ± 0.7 | 80.5 ± 0.7 (80.0–81.0) | 0.0 | - | 2.0 |" in row


def test_findings_quantify_gap_and_fix():
    text = " ".join(findings(_suite()))
    assert "80.5% last-5 validation accuracy against 98.5% at batch 64 (18.0 pp lower" in text
    assert "GroupNorm at the same micro-batch reaches 97.5%, closing 94% of the gap" in text
    assert "BN loses 8.0 pp from the largest to the smallest batch while GN moves 0.0 pp" in text


def test_write_report_files(tmp_path):
    paths = write_report(_suite(), tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["runs"]) == 14 and data["command"] == "bndoctor bench"
    assert {p.split("/")[-1] for p in paths["plots"]} == {"curves.png", "sweep.png"}
    assert all((tmp_path / name).stat().st_size > 10_000 for name in ("curves.png", "sweep.png"))
    report = (tmp_path / "report.md").read_text()
    assert "Reproduce: `bndoctor bench`" in report and "![sweep](sweep.png)" in report


def test_distributed_finding_reports_rank_spread():
    runs = [
        RunResult("bn-2x8x4-corr", 0, [0.7] * 5, [1.0] * 5, 1.0, {"rank_last5": [0.70, 0.95, 0.80, 0.75]}),
        RunResult("syncbn-2x8x4-corr", 0, [0.98] * 5, [1.0] * 5, 1.0, {"rank_last5": [0.98] * 4}),
    ]
    suite = SuiteResult([SCENARIOS["bn-2x8x4-corr"], SCENARIOS["syncbn-2x8x4-corr"]], [0], runs, 2.0)
    text = " ".join(findings(suite))
    assert "On 4 DDP ranks" in text and "differ by up to 25.0 pp" in text and "98.0% with 0.0 pp" in text


def test_accumulation_finding_lists_modes_against_the_reference():
    names = {"bn-64": 0.98, "bn-2x32-corr": 0.80, "accbn-renorm-2x32-corr": 0.975, "accbn-2x32-corr": 0.93}
    runs = [RunResult(n, 0, [a] * 5, [1.0] * 5, 1.0) for n, a in names.items()]
    suite = SuiteResult([SCENARIOS[n] for n in names], [0], runs, 1.0)
    text = " ".join(findings(suite))
    assert (
        "class-correlated micro-batches: renorm 97.5% (jitter 0.0 pp), progressive 93.0% (jitter 0.0 pp), "
        "against 98.0% for BN at batch 64 (plain BN: 80.0%)" in text
    )


def test_report_names_its_data_and_puts_the_mnist1d_paper_beside_it(tmp_path):
    write_report(_suite(), tmp_path / "digits", plots=False)
    digits = (tmp_path / "digits" / "report.md").read_text()
    assert "digits (scikit-learn)" in digits and "MNIST-1D" not in digits
    runs = [RunResult(n, 0, [0.9, 0.95], [1.0, 0.5], 1.0) for n in ("m1d-bn-64", "bn-64")]
    suite = SuiteResult([SCENARIOS["m1d-bn-64"], SCENARIOS["bn-64"]], [0], runs, 2.0)
    write_report(suite, tmp_path / "both", plots=False)
    both = (tmp_path / "both" / "report.md").read_text()
    assert "MNIST-1D (the mnist1d package" in both and "digits (scikit-learn)" in both
    assert "logistic regression 32 %, MLP 68 %, CNN 94 %, GRU 91 %, human 96 %" in both


def test_readings_find_scenarios_by_what_they_are_not_by_their_names():
    """A renamed scenario keeps its sentence: the readings look scenarios up by their fields."""
    import dataclasses

    suite = _suite()
    renamed = {name: f"my-{name}" for name in ("bn-64", "bn-2x32-corr", "gn-2x32-corr", "sweep-bn-2")}
    scenarios = [dataclasses.replace(s, name=renamed.get(s.name, s.name)) for s in suite.scenarios]
    runs = [dataclasses.replace(r, scenario=renamed.get(r.scenario, r.scenario)) for r in suite.runs]
    assert findings(SuiteResult(scenarios, [0, 1], runs, 10.0)) == findings(suite)
    # a scenario that is something else (here: shuffled instead of correlated) is not taken for it
    changed = [dataclasses.replace(s, sampler="iid") if s.name == "bn-2x32-corr" else s for s in suite.scenarios]
    text = " ".join(findings(SuiteResult(changed, [0, 1], suite.runs, 10.0)))
    assert "last-5 validation accuracy against" not in text

"""Code in docs/ that can run on its own does (the snippets that need user data are skipped)."""

import pathlib
import re

import pytest
import torch

import bndoctor
from bndoctor.models import tiny_resnet

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def _blocks(name):
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(_blocks("recalibration.md"))))
def test_recalibration_doc_snippets_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loader = [torch.randn(32, 1, 8, 8) for _ in range(4)]
    original = tiny_resnet()
    env = {
        "bndoctor": bndoctor,
        "torch": torch,
        "model": original,
        "pretrained": tiny_resnet(),
        "train_loader": [torch.randn(64, 1, 8, 8) for _ in range(64)],
        "source_loader": loader,
        "target_loader": [-b for b in loader],
        "source_val": loader[0],
        "evaluate": lambda model, data: model.eval()(data),
    }
    code = _blocks("recalibration.md")[index].replace("...fine-tune...", "pass")
    exec(compile(code, "recalibration.md", "exec"), env)


def test_accumulation_doc_snippet_runs():
    code, two_passes, exact = _blocks("accumulation.md")
    original = tiny_resnet()
    env = {
        "bndoctor": bndoctor,
        "torch": torch,
        "model": original,
        "loader": [(torch.randn(2, 1, 8, 8), torch.randint(0, 10, (2,))) for _ in range(8)],
        "loss_fn": torch.nn.functional.cross_entropy,
        "accum": 4,
    }
    exec(compile(code, "accumulation.md", "exec"), env)
    trained = env["model"]
    assert int(trained.stem[1].num_batches_tracked) == 2
    env["windows"] = [env["loader"][:4], env["loader"][4:]]
    exec(compile(two_passes, "accumulation.md", "exec"), env)
    assert int(trained.stem[1].num_batches_tracked) == 4 and not trained.stem[1].holds_collected
    assert isinstance(env["export"].stem[1], torch.nn.BatchNorm2d)
    assert not torch.equal(trained.fc.weight, original.fc.weight)  # the optimizer trained the converted model
    env = {**env, "model": tiny_resnet()}
    exec(compile(exact, "accumulation.md", "exec"), env)
    layer = env["model"].stem[1]
    assert layer.mode == "exact" and int(layer.num_batches_tracked) == 2 and not layer.recorded_calls


@pytest.mark.parametrize("index", range(len(_blocks("check.md"))))
def test_check_doc_snippets_run(index):
    from bndoctor.diagnose import CHECKS
    from bndoctor.remedies import REMEDIES

    try:
        exec(compile(_blocks("check.md")[index], "check.md", "exec"), {})
    finally:
        for code in ("ACME001", "ACME002"):
            CHECKS.pop(code, None)
        REMEDIES.pop("slow_momentum", None)


def test_monitor_doc_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _blocks("monitor.md")[0]
    env = {}
    exec(compile(code, "monitor.md", "exec"), env)
    assert [f.code for f in env["monitor"].alerts][:1] == ["BN101"]
    assert (tmp_path / "bn_monitor.jsonl").exists()


def test_noise_doc_snippet_runs():
    env = {}
    exec(compile(_blocks("noise.md")[0], "noise.md", "exec"), env)
    assert env["gns"].b_simple > 0 and len(env["gns"].samples) == 20


def test_models_doc_snippet_runs():
    pytest.importorskip("transformers")
    (code,) = _blocks("models.md")
    exec(compile(code, "models.md", "exec"), {})


def test_decision_guide_figures_are_the_benchmarks():
    """docs/choose.md quotes BENCHMARKS.md: every 'mean % (min–max)' it gives is a row there."""
    guide = (DOCS / "choose.md").read_text()
    benchmarks = (DOCS.parent / "BENCHMARKS.md").read_text()
    quoted = re.findall(r"(\d+\.\d) % \((\d+\.\d)–(\d+\.\d)\)", guide)
    assert len(quoted) >= 8
    for mean, low, high in quoted:
        harness_row = rf"\| {mean} ± \d+\.\d \({low}–{high}\)"
        mnist1d_row = rf"\| {mean} \| \d+\.\d \| {low}–{high} \|"  # benchmarks/mnist1d_table.py's layout
        assert re.search(harness_row, benchmarks) or re.search(mnist1d_row, benchmarks), (
            f"{mean} ({low}–{high}) not in BENCHMARKS"
        )
    from bndoctor.cli.explain import RUNTIME_CODES
    from bndoctor.diagnose import CHECKS

    for code in re.findall(r"\b(BN\d{3}|GN\d{3})\b", guide):
        assert code in CHECKS or code in RUNTIME_CODES, code

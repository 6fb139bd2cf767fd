"""Generated bad input for the CLI (hypothesis, seeded): MODEL specs, --model-kwargs, configuration files and data.

Whatever a user types or keeps on disk, a command ends with exit 0 (or 1: findings) or 2 (a one-line error with a
hint), never 3 ("internal error", which means a bndoctor bug), and never a traceback.
"""

from __future__ import annotations

import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bndoctor.cli import main
from bndoctor.cli._errors import EXIT_INTERNAL
from tests import _thirdparty

FUZZ = settings(
    max_examples=60,
    deadline=10_000,  # ms per case: a case that hangs fails instead of blocking the suite
    derandomize=True,  # the same cases on every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_NAME = st.text(string.ascii_letters + string.digits + "_-.", min_size=0, max_size=24)


@pytest.fixture(autouse=True, scope="module")
def _libraries():
    _thirdparty.timm()  # imports torchvision too (with the test-only shim)
    _thirdparty.transformers()


def _ends_cleanly(capsys, argv: list[str]) -> int:
    code = main(argv)
    captured = capsys.readouterr()
    assert code != EXIT_INTERNAL, (argv, captured.err)
    assert "Traceback" not in captured.err, argv
    if code == 2:
        assert captured.err.startswith("bndoctor: error: ") and len(captured.err.strip().splitlines()) <= 2, argv
    return code


@FUZZ
@given(library=st.sampled_from(["timm", "torchvision", "transformers", "fuzz_no_such_module", "tiny-resnet"]),
       name=_NAME, separator=st.sampled_from([":", "", "::", ":."]))  # fmt: skip
def test_model_specs(capsys, library, name, separator):
    _ends_cleanly(capsys, ["inspect", f"{library}{separator}{name}"])


_VALUE = st.one_of(
    st.integers(-5, 300).map(str),
    st.sampled_from(["abc", "'x'", "[1, 2]", "None", "true", "1e9", "-1", "(", "]", "{'a': 1}", "1/0", "a b"]),
    st.text(string.printable, max_size=12),
)


_KEY = st.sampled_from(["num_classes", "drop_rate", "in_chans", "act_layer", "bogus", "global_pool", "x", "=", ""])


@FUZZ
@given(pairs=st.lists(st.tuples(_KEY, _VALUE), max_size=3))
def test_model_kwargs(capsys, pairs):
    text = ",".join(f"{key}={value}" for key, value in pairs)
    _ends_cleanly(capsys, ["inspect", "timm:resnet18", "--model-kwargs", text])


_TOML_VALUE = st.sampled_from(
    ["2", '"2"', "-1", "0", "true", "[]", '["BN1"]', '["XX9"]', "[3, 8, 8]", "[0]", '"fp64"', "{}", "1.5", '"a"']
)


@FUZZ
@given(entries=st.lists(st.tuples(st.sampled_from(
    ["micro-batch", "accum", "world-size", "select", "ignore", "precision", "input-shape", "finetune", "unknown"]),
    _TOML_VALUE), max_size=4), raw=st.binary(max_size=24))  # fmt: skip
def test_configuration_files(capsys, tmp_path_factory, monkeypatch, entries, raw):
    folder = tmp_path_factory.mktemp("project")
    table = "".join(f"{key} = {value}\n" for key, value in entries)
    (folder / "pyproject.toml").write_bytes(b"[tool.bndoctor]\n" + table.encode() + raw)
    monkeypatch.chdir(folder)
    _ends_cleanly(capsys, ["check", "tiny-resnet"])


@settings(FUZZ, max_examples=30)
@given(
    rows=st.integers(0, 40),
    shape=st.lists(st.integers(1, 5), max_size=3),
    dtype=st.sampled_from(["float32", "int64", "bool", "complex64", "U2", "object"]),
    labels=st.sampled_from(["ok", "float", "negative", "short", "missing"]),
    poison=st.sampled_from(["", "nan", "inf"]),
)
def test_data_files(capsys, tmp_path_factory, rows, shape, dtype, labels, poison):
    folder = tmp_path_factory.mktemp("data")
    x = np.zeros((rows, *shape)).astype(dtype) if dtype != "object" else np.array([object()] * rows)
    if poison and dtype == "float32" and x.size:
        x.flat[0] = float(poison)
    y = {
        "ok": np.arange(rows) % 2,
        "float": np.linspace(0, 1, rows),
        "negative": -np.ones(rows, dtype=int),
        "short": np.arange(max(rows - 1, 0)) % 2,
        "missing": None,
    }[labels]
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    path = folder / "d.npz"
    try:
        np.savez(path, **arrays)
    except ValueError:  # numpy cannot write it either: nothing to test
        return
    argv = ["bench", "--data", str(path), "--out", str(folder / "out"), "--quiet", "--no-plots", "--seeds", "1"]
    _ends_cleanly(capsys, [*argv, "--epochs", "1", "--jobs", "1", "--scenarios", "data-bn-64"])

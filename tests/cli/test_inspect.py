import json

import pytest
import torch
import torch.nn as nn

from bndoctor.cli import main
from bndoctor.models import tiny_resnet


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bundled_model_table(capsys):
    code, out, _ = run(capsys, "inspect", "tiny-resnet")
    assert code == 0
    assert "layers.2.0.downsample.1" in out and "BatchNorm2d" in out
    assert "9 BatchNorm layer(s): 9 in training mode, 0 frozen" in out


def test_json_format_and_eval(capsys):
    code, out, _ = run(capsys, "inspect", "resnet18", "--format", "json", "--eval")
    data = json.loads(out)
    assert code == 0 and data["source"] == "module"
    assert data["summary"] == {"bn_layers": 20, "frozen": 0, "training": 0, "unsupported": 0}
    assert data["layers"][0]["name"] == "stem.1" and data["layers"][-1]["num_features"] == 512


def test_callable_spec(capsys):
    code, out, _ = run(capsys, "inspect", "tests.cli.test_inspect:frozen_model", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["summary"]["frozen"] == 9


def frozen_model():
    import bndoctor

    return bndoctor.freeze_bn(tiny_resnet())


def not_a_model():
    return 42


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-model", "unknown MODEL 'no-such-model'"),
        ("no_such_pkg.mod:fn", "cannot import 'no_such_pkg.mod'"),
        ("bndoctor.models:nope", "has no attribute 'nope'"),
        ("tests.cli.test_inspect:not_a_model", "to return an nn.Module (got int)"),
        ("bndoctor.models:BUNDLED_MODELS", "to be a callable"),
        ("bndoctor.models:ResNet", "with no arguments failed"),
    ],
)
def test_bad_specs_are_one_line_errors(capsys, spec, message):
    code, out, err = run(capsys, "inspect", spec)
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert message in lines[0] and lines[1].startswith("hint:") and len(lines) == 2
    assert "Traceback" not in err


def test_state_dict_file(capsys, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_resnet().state_dict(), path)
    code, out, _ = run(capsys, "inspect", str(path), "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["source"] == "state_dict" and len(data["layers"]) == 9
    assert data["layers"][0] == {
        "name": "stem.1",
        "num_features": 16,
        "affine": True,
        "num_batches_tracked": 0,
    }
    code, out, _ = run(capsys, "inspect", str(path))
    assert "stem.1" in out and "batches tracked" in out


def test_weights_option_loads_state_dict(capsys, tmp_path):
    model = tiny_resnet()
    model.train()
    model(torch.randn(4, 1, 8, 8))
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    code, _, _ = run(capsys, "inspect", "tiny-resnet", "--weights", str(path))
    assert code == 0
    torch.save({"fc.weight": torch.zeros(1)}, path)
    code, _, err = run(capsys, "inspect", "tiny-resnet", "--weights", str(path))
    assert code == 2 and "does not match the model" in err


def test_pickled_model_needs_trust(capsys, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)), path)
    code, _, err = run(capsys, "inspect", str(path))
    assert code == 2 and "pickled objects" in err and "--trust-pickle" in err
    code, out, _ = run(capsys, "inspect", str(path), "--trust-pickle")
    assert code == 0 and "1 BatchNorm layer(s)" in out


def test_missing_and_garbage_files(capsys, tmp_path):
    garbage = tmp_path / "junk.pt"
    garbage.write_bytes(b"not a torch file")
    code, _, err = run(capsys, "inspect", str(garbage))
    assert code == 2 and "cannot read" in err
    code, _, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and "expected MODEL to be a file" in err
    code, _, err = run(capsys, "inspect", "tiny-resnet", "--weights", str(tmp_path / "none.pt"))
    assert code == 2 and "file not found" in err


def test_model_without_bn(capsys):
    code, out, _ = run(capsys, "inspect", "tests.cli.test_inspect:no_bn")
    assert code == 0 and "no BatchNorm layers found" in out


def no_bn():
    return nn.Sequential(nn.Linear(2, 2))


@pytest.mark.parametrize("spec", [":", "pkg:", ":attr"])
def test_an_empty_module_or_attribute_in_model_is_a_one_line_error(capsys, spec):
    assert main(["inspect", spec]) == 2
    err = capsys.readouterr().err
    assert "expected MODEL as package.module:callable" in err and "internal error" not in err


def test_a_model_with_an_uninitialised_lazy_layer_is_inspected(capsys, tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LazyBatchNorm2d())
    torch.save(model, tmp_path / "lazy.pt")
    assert main(["inspect", str(tmp_path / "lazy.pt"), "--trust-pickle", "--format", "json"]) == 0
    (layer,) = json.loads(capsys.readouterr().out)["layers"]
    assert layer["kind"] == "lazy" and not layer["supported"]

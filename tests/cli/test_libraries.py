"""MODEL specs for timm, torchvision and transformers: random init, nothing downloaded, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from bndoctor.cli import main
from bndoctor.cli._libraries import parse_model_kwargs
from tests import _thirdparty


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def _libraries():
    _thirdparty.timm()  # imports torchvision too (with the test-only shim)
    _thirdparty.transformers()


def test_timm_model_checked_with_model_kwargs(capsys):
    code, out, err = run(
        capsys, "check", "timm:efficientnet_b0", "--micro-batch", "2", "--accum", "8", "--format", "json",
        "--model-kwargs", "in_chans=1,num_classes=10", "--input-shape", "1,64,64",
    )  # fmt: skip
    data = json.loads(out)
    assert code == 1 and not err and data["bn_layers"] == 49
    (bn101,) = [f for f in data["findings"] if f["code"] == "BN101"]
    assert bn101["action"]["name"] == "to_accum_bn" and len(bn101["action"]["modules"]) == 49


def test_torchvision_detection_model_builds_without_a_backbone_download(capsys):
    code, out, _ = run(capsys, "inspect", "torchvision:fasterrcnn_mobilenet_v3_large_fpn", "--format", "json")
    assert code == 0 and len(json.loads(out)["layers"]) > 0


def test_transformers_config_and_model_class(capsys):
    code, out, err = run(capsys, "inspect", "transformers:ResNetConfig", "--model-kwargs", "depths=[1,1,1,1]")
    assert code == 0, err
    assert "17 BatchNorm layer(s)" in out  # depths=[1,1,1,1]: 1 + 4 x 4 layers
    code, out, err = run(
        capsys, "inspect", "transformers:MobileNetV2ForImageClassification", "--model-kwargs", "num_labels=3"
    )
    assert code == 0, err
    assert "52 BatchNorm layer(s)" in out


@pytest.mark.parametrize(
    ("argv", "message", "hint"),
    [
        (["timm:efficientnet_b9"], "timm has no model named 'efficientnet_b9'", "efficientnet_b8"),
        (["timm:resnet18", "--model-kwargs", "pretrained=true"], "would download weights", "--weights FILE"),
        (["torchvision:resnet18", "--model-kwargs", "weights=DEFAULT"], "would download weights", "--weights"),
        (["torchvision:resnet81"], "torchvision has no model named 'resnet81'", "resnet18"),
        (["transformers:ResNetConfig", "--model-kwargs", "depht=[1]"], "has no field 'depht'", "depths"),
        (["transformers:ResNetConfg"], "transformers has no class named 'ResNetConfg'", "ResNetConfig"),
        (["transformers:DetrConfig", "--model-kwargs", "use_pretrained_backbone=True"], "would download", "--weights"),
        (["timm:resnet18", "--model-kwargs", "num_classes"], "key=value pairs", "--model-kwargs num_classes=10"),
        (["timm:resnet18", "--model-kwargs", "bogus=1"], "does not accept these --model-kwargs", "argument names"),
        (["tiny-resnet", "--model-kwargs", "a=1"], "--model-kwargs applies to timm:", "wrap the model"),
    ],
)
def test_bad_specs_are_one_line_with_a_hint(capsys, argv, message, hint):
    code, out, err = run(capsys, "inspect", *argv)
    assert code == 2 and not out
    first, second = err.strip().splitlines()
    assert message in first and hint in second and "Traceback" not in err


def test_model_kwargs_values_are_python_literals():
    assert parse_model_kwargs("a=1,b=0.5,c=true,d=None,e=relu,f=[1,2],g='x'") == {
        "a": 1, "b": 0.5, "c": True, "d": None, "e": "relu", "f": [1, 2], "g": "x",
    }  # fmt: skip


def test_weights_from_a_local_file_load_into_a_library_model(capsys, tmp_path):
    timm = _thirdparty.timm()
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with torch.no_grad():
        model.bn1.running_mean.fill_(0.25)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    code, out, _ = run(
        capsys, "inspect", "timm:resnet18", "--model-kwargs", "num_classes=3", "--weights", str(tmp_path / "w.pt")
    )
    assert code == 0 and "bn1" in out


def test_a_model_that_needs_a_missing_package_is_a_one_line_error(capsys, monkeypatch):
    from bndoctor.cli import _libraries

    def needs_timm(name, kwargs):
        raise ImportError("TimmBackbone requires the timm library but it was not found in your environment")

    monkeypatch.setitem(_libraries.LIBRARIES, "transformers", needs_timm)
    code, _, err = run(capsys, "inspect", "transformers:DetrConfig")
    assert code == 2 and "needs a package that is not installed" in err and "use_timm_backbone=False" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["transformers:ResNetConfig", "--model-kwargs", "num_channels=abc"], "rejected these --model-kwargs"),
        (["timm:resnet18", "--model-kwargs", "act_layer=nosuchact"], "rejected these --model-kwargs"),
        (["transformers:ResNetConfig", "--model-kwargs", "hidden_act=nosuchact"], "rejected these --model-kwargs"),
        (["transformers:UperNetConfig", "--model-kwargs", "backbone_config=abc"], "rejected these --model-kwargs"),
        (["timm:resnet18", "--model-kwargs", "drop_rate=" + "1" * 50_000], "characters long"),
        (["timm:resnet18", "--model-kwargs", "drop_rate=__import__('os').getcwd()"], "neither a Python literal"),
    ],
    ids=["hf-validation", "timm-act", "hf-act", "upernet-backbone", "huge-value", "code"],
)
def test_model_kwargs_a_library_rejects_are_usage_errors(capsys, argv, message):
    code, out, err = run(capsys, "inspect", *argv)
    assert code == 2 and not out and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # one line and a hint


def test_a_timm_name_with_a_pretrained_tag_builds_with_random_weights(capsys):
    code, out, _ = run(capsys, "inspect", "timm:resnet18.a1_in1k")
    assert code == 0 and "bn1" in out


def test_a_library_that_is_installed_but_broken_is_named(capsys, monkeypatch):
    import importlib

    real = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "timm":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", broken)
    code, _, err = run(capsys, "inspect", "timm:resnet18")
    assert code == 2 and "timm, which is installed but fails to import" in err and "torchvision::nms" in err
    assert "installation is broken" in err and "internal error" not in err

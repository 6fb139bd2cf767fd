"""``bndoctor bench --data PATH``: the core scenarios on the user's own data (image folder or .npz)."""

import json

import numpy as np
import pytest
import torch

from bndoctor.bench.data import load_path
from bndoctor.cli import main


def _image_folder(root, classes=3, per_class=16, size=8, rgb=False):
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(classes):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(per_class):
            pattern = np.zeros((size, size), dtype=np.float64)
            pattern[:, k * size // classes : (k + 1) * size // classes] = 200  # a stripe per class
            pixels = np.clip(pattern + rng.normal(0, 20, pattern.shape), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels, "L")
            (image.convert("RGB") if rgb else image).save(root / f"class{k}" / f"{i}.png")
    return root


def test_image_folder_loads_as_a_stratified_normalised_split(tmp_path):
    data = load_path(str(_image_folder(tmp_path / "imgs", rgb=True)))
    assert data.x_train.shape[1:] == (3, 8, 8) and data.num_classes == 3
    assert len(data.y_train) + len(data.y_val) == 48 and torch.bincount(data.y_val).tolist() == [3, 3, 3]
    assert abs(float(data.x_train.mean())) < 1e-5 and abs(float(data.x_train.std()) - 1) < 1e-2


def test_bench_runs_the_core_scenarios_on_an_image_folder(tmp_path, capsys):
    folder = _image_folder(tmp_path / "imgs")
    code = main(
        ["bench", "--data", str(folder), "--seeds", "1", "--epochs", "1", "--jobs", "1", "--quiet", "--no-plots",
         "--scenarios", "data-bn-64", "data-accbn-renorm-2x32-corr", "--out", str(tmp_path / "out"), "--format", "json"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    names = [s["name"] for s in report["scenarios"]]
    assert names == ["data-bn-64", "data-accbn-renorm-2x32-corr"]
    assert all(0.0 <= r["final_acc"] <= 1.0 for r in report["runs"])
    assert "your data" in report["scenarios"][0]["label"]


def test_bench_on_an_npz_of_sequences_picks_the_1d_model(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    x = rng.normal(size=(40, 24)) + y[:, None]  # (N, L): sequences
    np.savez(tmp_path / "seq.npz", x=x, y=y)
    from bndoctor.bench.runner import model_for

    data = load_path(str(tmp_path / "seq.npz"))
    assert data.x_train.shape[1:] == (1, 24)
    assert isinstance(model_for(data).layers[0][0].bn1, torch.nn.BatchNorm1d)
    code = main(
        ["bench", "--data", str(tmp_path / "seq.npz"), "--seeds", "1", "--epochs", "1", "--jobs", "1", "--quiet",
         "--no-plots", "--scenarios", "data-bn-64", "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 0 and "data-bn-64" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: np.savez(p / "d.npz", inputs=np.zeros((30, 5))), "expected arrays named x and y"),
        (lambda p: np.savez(p / "d.npz", x=np.zeros((30, 5)), y=np.linspace(0, 1, 30)), "integer label"),
        (lambda p: np.savez(p / "d.npz", x=np.zeros((30, 5)), y=np.zeros(30, dtype=int)), "two classes"),
    ],
)
def test_bad_data_is_a_one_line_error(tmp_path, capsys, make, message):
    make(tmp_path)
    code = main(["bench", "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_a_folder_of_mixed_sizes_or_one_class_is_refused(tmp_path, capsys):
    from PIL import Image

    folder = _image_folder(tmp_path / "imgs", classes=2, per_class=12)
    Image.fromarray(np.zeros((9, 9), dtype=np.uint8)).save(folder / "class0" / "odd.png")
    assert main(["bench", "--data", str(folder), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "different sizes" in capsys.readouterr().err
    single = tmp_path / "single" / "only"
    single.mkdir(parents=True)
    assert main(["bench", "--data", str(tmp_path / "single"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "one subfolder per class" in capsys.readouterr().err


def _pickle_as_npz(p):
    import pickle

    (p / "d.npz").write_bytes(pickle.dumps({"x": [1, 2], "y": [0, 1]}))


def _nan_rows(p):
    x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    x[3, 2], x[7, 0] = np.nan, np.inf
    np.savez(p / "d.npz", x=x, y=np.arange(40) % 2)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: np.savez(p / "d.npz", x=np.array([object()] * 30), y=np.zeros(30, int)), "cannot read d.npz"),
        (lambda p: np.savez(p / "d.npz", x=np.zeros((30, 5)), y=np.array([None] * 30)), "cannot read d.npz"),
        (_pickle_as_npz, "cannot read d.npz"),
        (lambda p: (p / "d.npz").write_text("not a zip file"), "cannot read d.npz"),
        (lambda p: np.savez(p / "d.npz", x=np.array(["a"] * 30), y=np.arange(30) % 2), "x must hold real numbers"),
        (_nan_rows, "2 of 40 samples hold NaN or Inf (the first: sample 3)"),
    ],
    ids=["object-x", "object-y", "pickle", "not-zip", "strings", "nan-inf"],
)
def test_unreadable_or_non_finite_npz_is_refused_before_training(tmp_path, capsys, make, message):
    make(tmp_path)
    out = tmp_path / "out"
    code = main(["bench", "--data", str(tmp_path / "d.npz"), "--out", str(out), "--quiet", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert not out.exists()  # nothing written


@pytest.mark.parametrize(
    "content", [b"this is text, not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20], ids=["text", "truncated"]
)
def test_an_unreadable_image_in_a_class_folder_is_named(tmp_path, capsys, content):
    folder = _image_folder(tmp_path / "imgs", classes=2, per_class=12)
    (folder / "class1" / "broken.png").write_bytes(content)
    assert main(["bench", "--data", str(folder), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "broken.png" in err and "Traceback" not in err

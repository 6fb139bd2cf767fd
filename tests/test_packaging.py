"""The wheel carries what the metadata promises: the license text, and the files loaded by path at run time."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_the_license_and_the_watch_bootstrap(tmp_path):
    pytest.importorskip("setuptools")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("bndoctor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    license_file = next(n for n in names if n.endswith("dist-info/licenses/LICENSE"))
    assert "Apache License" in zipfile.ZipFile(wheel).read(license_file).decode()
    assert "bndoctor/integrations/_boot/sitecustomize.py" in names  # bndoctor watch puts this folder on PYTHONPATH
    assert "bndoctor/py.typed" in names

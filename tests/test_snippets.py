"""Every code and shell block in README.md and docs/ is run by a test, or says why it is only illustrative.

Before each ```python / ```bash / ```toml block the page holds one of
``<!-- tested: tests/FILE.py::test_name -->`` (checked here: the test exists)
or ``<!-- illustrative: reason -->``. Blocks of program output (```text) and
layouts (no language) are not code. The shell blocks that can run here are
run below, line by line, through the CLI's ``main``.
"""

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from bndoctor.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
CODE = ("python", "bash", "toml", "sh", "console")
MARK = re.compile(r"<!--\s*(tested|illustrative):\s*(.+?)\s*-->")


def _blocks(page):
    text = page.read_text()
    previous = 0
    for match in re.finditer(r"```(\w*)\n(.*?)```", text, flags=re.S):
        before = text[previous : match.start()]
        previous = match.end()
        line = text[: match.start()].count("\n") + 1
        marks = MARK.findall(before[-400:])
        yield match.group(1), match.group(2), line, (marks[-1] if marks else None)


def _all_code_blocks():
    return [
        (f"{page.relative_to(ROOT)}:{line}", lang, body, mark)
        for page in PAGES
        for lang, body, line, mark in _blocks(page)
        if lang in CODE
    ]


@pytest.mark.parametrize(
    ("where", "lang", "body", "mark"),
    _all_code_blocks(),
    ids=lambda v: v if ":" in str(v) and "\n" not in str(v) else "",
)
def test_every_code_block_is_tested_or_marked_illustrative(where, lang, body, mark):
    assert mark is not None, f"{where}: add <!-- tested: tests/FILE.py::test_name --> or <!-- illustrative: why -->"
    kind, detail = mark
    if kind == "illustrative":
        assert len(detail) > 10, f"{where}: say why the block is only illustrative"
        return
    path, _, name = detail.partition("::")
    assert (ROOT / path).is_file(), f"{where}: {path} does not exist"
    assert re.search(rf"def {re.escape(name)}\b", (ROOT / path).read_text()), f"{where}: no test {name} in {path}"


def _shell(block, cwd, monkeypatch):
    """Run each ``bndoctor ...`` line of a shell block through ``main``; returns the exit codes."""
    monkeypatch.chdir(cwd)
    codes = []
    for raw in block.replace("\\\n", " ").splitlines():
        words = shlex.split(raw, comments=True)
        if not words:
            continue
        assert words[0] == "bndoctor", f"not a bndoctor command: {raw}"
        codes.append(main(words[1:]))
    return codes


def _block(page, index=0, lang="bash"):
    return [body for kind, body, _, _ in _blocks(ROOT / page) if kind == lang][index]


def test_check_doc_shell_block(tmp_path, monkeypatch, capsys):
    from tests._thirdparty import timm

    timm()  # the third command builds timm:efficientnet_b0
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(
        "from bndoctor.models import tiny_resnet\n\ndef build():\n    return tiny_resnet()\n"
    )
    from bndoctor.models import tiny_resnet

    torch.save(tiny_resnet().state_dict(), tmp_path / "ckpt.pt")
    monkeypatch.syspath_prepend(str(tmp_path))
    codes = _shell(_block("docs/check.md"), tmp_path, monkeypatch)
    out = capsys.readouterr().out
    # micro-batch 2 and 4: error-level BN101, the gate fails the job; micro-batch 8: warnings only, it passes
    assert codes == [1, 1, 0]
    assert "::warning title=bndoctor BN1" in out  # the --format github annotations


def test_check_doc_toml_block(tmp_path, monkeypatch, capsys):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "demo"\n\n' + _block("docs/check.md", lang="toml"))
    monkeypatch.chdir(tmp_path)
    assert main(["check", "resnet50", "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["setup"]["micro_batch"] == 2 and report["setup"]["accum_steps"] == 32
    assert report["input_shape"] == [3, 224, 224] and {f["code"][:3] for f in report["findings"]} <= {"BN1", "BN2"}


def test_models_doc_shell_block(tmp_path, monkeypatch, capsys):
    from tests._thirdparty import timm, torchvision

    timm()
    models = torchvision().models
    torch.save(models.resnet50(weights=None).state_dict(), tmp_path / "resnet50.pt")
    codes = _shell(_block("docs/models.md"), tmp_path, monkeypatch)
    # both checks gate on an error-level finding (BN101 at micro-batch 2; fine-tuning with BN in train mode at 4)
    assert codes == [1, 1, 0, 0]
    assert "MobileNetV2" in capsys.readouterr().out


def test_monitor_doc_shell_block(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_block("docs/monitor.md", lang="python"), "monitor.md", "exec"), {})
    assert _shell(_block("docs/monitor.md"), tmp_path, monkeypatch) == [0]
    page = (tmp_path / "bn_report" / "report.html").read_text()
    assert "data:image/png;base64," in page


def test_the_marker_check_itself_fails_on_an_unmarked_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nprint(1)\n```\n\n<!-- illustrative: needs a GPU cluster -->\n```bash\nx\n```\n")
    blocks = list(_blocks(page))
    assert blocks[0][3] is None and blocks[1][3] == ("illustrative", "needs a GPU cluster")


if __name__ == "__main__":  # list the blocks and their marks
    for where, lang, _, mark in _all_code_blocks():
        print(where, lang, mark, file=sys.stderr)

"""`bndoctor explain CODE`: every code a user can meet is explained."""

from __future__ import annotations

import json

import pytest

from bndoctor.cli import main
from bndoctor.cli.explain import RUNTIME_CODES
from bndoctor.diagnose import CHECKS

BUILT_IN = [code for code, check in CHECKS.items() if check.fn.__module__ == "bndoctor.diagnose.builtin"]


@pytest.mark.parametrize("code", BUILT_IN + list(RUNTIME_CODES))
def test_every_code_is_explained(capsys, code):
    assert main(["explain", code.lower(), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["code"] == code and len(data["text"]) > 40 and data["title"]


def test_every_built_in_check_says_why_or_what_to_do():
    assert len(BUILT_IN) == 19
    for code in BUILT_IN:
        doc = CHECKS[code].fn.__doc__ or ""
        assert len(doc.split()) >= 8, code


def test_an_unknown_code_lists_the_known_ones(capsys):
    assert main(["explain", "BN999"]) == 2
    err = capsys.readouterr().err
    assert "unknown finding code 'BN999'" in err and "BN101" in err


def test_explain_without_a_code_lists_every_code_with_its_title(capsys):
    assert main(["explain"]) == 0
    out = capsys.readouterr().out
    for code in [*BUILT_IN, *RUNTIME_CODES]:
        assert code in out
    assert "BN501  NaN or Inf" in out and "bndoctor explain CODE" in out
    assert main(["explain", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["code"] for r in rows} == {*BUILT_IN, *RUNTIME_CODES} and all(r["title"] for r in rows)


def test_a_code_of_check_that_the_monitor_raises_too_explains_both(capsys):
    from bndoctor.cli import main
    from bndoctor.monitor.alerts import ALERTS

    assert main(["explain", "BN101"]) == 0
    text = capsys.readouterr().out
    assert "normalisation batch too small" in text and ALERTS["BN101"].explanation in text
    assert ALERTS["BN101"].fix in text and "(bndoctor check; found while a model trains)" in text

"""``gircse explain`` prints the model's soft-token distributions (text or JSON)."""
from __future__ import annotations

import json

import pytest

from gircse import cli
from gircse.cli import explain


def test_explain_prints_the_soft_token_distributions(monkeypatch, make_tiny, capsys):
    model = make_tiny("llama", k=3)
    monkeypatch.setattr(explain, "_load", lambda args: model)
    assert cli.main(["explain", "The Eiffel Tower is in Paris.", "--top", "4", "--json"]) == 0
    expected = model.explain("The Eiffel Tower is in Paris.", k=3, top=4)
    assert json.loads(capsys.readouterr().out) == [[[t, pytest.approx(p)] for t, p in step] for step in expected]
    assert cli.main(["explain", "The Eiffel Tower is in Paris.", "--instruction", "Find", "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    steps = model.explain("The Eiffel Tower is in Paris.", "Find", k=3, top=2)
    assert lines == ["s_%d: " % (i + 1) + "  ".join(f"{t!r} {p:.3f}" for t, p in step) for i, step in enumerate(steps)]
    with pytest.raises(SystemExit):
        cli.main(["explain", "  "])
    assert "the text is empty" in capsys.readouterr().err

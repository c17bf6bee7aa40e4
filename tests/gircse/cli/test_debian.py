"""``python -m gircse.data.debian`` (its command line is ``gircse.cli.debian``): option errors are one line
before anything loads; ``eval`` writes what ``gircse.data.debian.dev.evaluate`` gives."""
from __future__ import annotations

import pytest

from gircse.data.debian.dev import evaluate


@pytest.mark.parametrize("argv,message", [
    (["eval", "--k", "0"], "every K must be >= 1"),
    (["eval", "--k", "1,-2"], "every K must be >= 1"),
    (["eval", "--k", "1,x"], "expected comma-separated ints"),
    (["eval", "--limit", "0"], "argument --limit: must be >= 1"),
    (["eval", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
])
def test_eval_cli_bounds(argv, message, capsys, monkeypatch):
    import gircse
    from gircse.cli import debian

    monkeypatch.setattr(gircse, "load_default", lambda **kw: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(SystemExit) as exit_info:
        debian.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m gircse.data.debian eval: ") and message in err and err.count("\n") == 1


def test_eval_cli_runs_and_writes_json(make_tiny, monkeypatch, tmp_path, capsys):
    import json

    import gircse
    from gircse.cli import debian

    model = make_tiny("llama", k=2)
    monkeypatch.setattr(gircse, "load_default", lambda **kw: model)
    out = tmp_path / "dev.json"
    assert debian.main(["eval", "--k", "2,1", "--limit", "12", "--output", str(out)]) == 0
    written = json.loads(out.read_text())
    expected = evaluate(model, ks=(1, 2), limit=12)
    assert written["k"] == [1, 2] and written["retrieval"] == expected["retrieval"]
    assert debian.main(["eval", "--output", str(tmp_path / "missing" / "dev.json")]) == 2
    assert "does not exist" in capsys.readouterr().err

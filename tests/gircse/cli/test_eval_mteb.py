"""``gircse eval-mteb`` runs ``mteb.evaluate`` on the loaded model and files the results where asked."""
from __future__ import annotations

import json

import pytest

from gircse import cli, evaluation
from gircse.cli import eval_mteb


def test_eval_mteb_runs_mteb_evaluate(monkeypatch, make_tiny, tmp_path, capsys):
    mteb = pytest.importorskip("mteb")
    from ..test_mteb import INSTRUCTIONS, PAIRS, LocalSTS

    model = make_tiny("llama", k=2)
    monkeypatch.setattr(eval_mteb, "_load", lambda args: model)
    monkeypatch.setattr(mteb, "get_tasks", lambda tasks: [LocalSTS()])
    monkeypatch.setattr("gircse.mteb.load_instructions",
                        lambda: {name: {"query": v, "document": v} if isinstance(v, str) else v
                                 for name, v in INSTRUCTIONS.items()})
    folder = tmp_path / "results"
    assert cli.main(["eval-mteb", "--tasks", "GircseLocalSTS", "--output-folder", str(folder),
                     "--name", "local/tiny"]) == 0
    printed = json.loads(capsys.readouterr().out)
    a = model.encode([p[0] for p in PAIRS], INSTRUCTIONS["GircseLocalSTS"])
    b = model.encode([p[1] for p in PAIRS], INSTRUCTIONS["GircseLocalSTS"])
    expected = evaluation.spearman((a * b).sum(1), [p[2] for p in PAIRS])
    assert printed["main_score"]["GircseLocalSTS"]["test"] == [pytest.approx(expected, abs=1e-6)]
    assert list(folder.rglob("GircseLocalSTS.json"))  # results filed in the given folder


def test_eval_mteb_unknown_task(capsys, no_model):
    pytest.importorskip("mteb")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval-mteb", "--tasks", "NoSuchTaskAnywhere"])
    assert exit_info.value.code == 2 and "unknown task" in capsys.readouterr().err

"""``gircse eval`` prints what ``gircse.evaluation.evaluate`` gives; a bad task file exits 2 before the
model loads."""
from __future__ import annotations

import json

import pytest

from gircse import GIRCSE, cli, evaluation

from ..test_evaluation import _rows_by_type, write_task


def assert_same_metrics(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for k, metrics in expected.items():
        assert got[k] == pytest.approx(metrics, abs=1e-6), k


def test_eval_prints_the_evaluation_json(saved_tiny, tmp_path, capsys):
    task = write_task(tmp_path, _rows_by_type(8)["classification"])
    out = tmp_path / "result.json"
    assert cli.main(["eval", "--model", saved_tiny, "--task", task, "--output", str(out), "--k", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    expected = evaluation.evaluate(GIRCSE.from_pretrained(saved_tiny, k=3), task)
    assert printed["k"] == [3] and printed["model"] == saved_tiny
    assert_same_metrics(printed["metrics"], expected["metrics"])


def test_eval_reports_bad_rows_before_loading(tmp_path, capsys, no_model):
    task = write_task(tmp_path, [{"text1": "a", "text2": "b", "score": 1}, {"text1": "c", "text2": "d", "score": 2},
                                 {"text1": "c", "text2": "d", "score": "x"}])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--task", task])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"gircse eval: {task}:3: 'score' must be a finite number, got 'x'"
    with pytest.raises(SystemExit):
        cli.main(["eval", "--task", str(tmp_path / "missing.jsonl")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--task", task, "--batch-size", "0"])
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_eval_of_a_nan_model_is_an_error_not_perfect_scores(tmp_path, capsys, saved_nan_model):
    """NaN embeddings scored nDCG@10 = MRR = R@1 = 1.0 and Spearman 1.0; now the command fails in one line."""
    capsys.readouterr()  # the fixture's saving output
    for kind in ("retrieval", "sts"):
        task = write_task(tmp_path, _rows_by_type(8)[kind], name=f"{kind}.jsonl")
        out = tmp_path / f"{kind}.json"
        assert cli.main(["eval", "--model", saved_nan_model, "--task", task, "--output", str(out)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and not out.exists()
        assert captured.err.startswith("gircse eval: the model produced a non-finite") and captured.err.count("\n") == 1


def test_eval_task_file_errors_name_the_file_before_loading(tmp_path, capsys, no_model):
    task = write_task(tmp_path, _rows_by_type(8)["sts"])
    assert cli.main(["eval", "--task", task, "--output", task]) == 2
    assert f"--output {task} is the same file as --task" in capsys.readouterr().err
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text1": "café", "text2": "b", "score": 1}\n'.encode("latin-1"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--task", str(latin)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == f"gircse eval: {latin}:1: not UTF-8 text (byte 14 of the line: " \
        "invalid continuation byte); save the file as UTF-8\n"
    assert cli.main(["eval", "--task", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"gircse eval: task file {str(tmp_path)!r} is a directory; name a JSONL file\n"

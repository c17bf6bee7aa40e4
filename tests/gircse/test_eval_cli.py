"""gircse eval / scale / explain / eval-mteb: outputs equal the library calls; user errors exit 2 before the
model loads."""
from __future__ import annotations

import json

import pytest

from gircse import GIRCSE, cli, eval_cli, evaluation

from .test_evaluation import _rows_by_type, write_task


def assert_same_metrics(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for k, metrics in expected.items():
        assert got[k] == pytest.approx(metrics, abs=1e-6), k


@pytest.fixture
def saved_tiny(tmp_path, make_tiny):
    directory = str(tmp_path / "tiny-gircse")
    make_tiny("llama", k=2).save_pretrained(directory)
    return directory


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads a model (argument errors must come first)."""
    def refuse(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(eval_cli, "_load", refuse)


def test_subcommands_are_registered():
    parser = cli.build_parser()
    for argv, run in ((["eval", "--task", "t"], eval_cli.run_eval), (["scale", "--task", "t"], eval_cli.run_scale),
                      (["explain", "text"], eval_cli.run_explain), (["eval-mteb", "--tasks", "x"],
                                                                    eval_cli.run_eval_mteb)):
        assert parser.parse_args(argv).func is run
    assert parser.parse_args(["eval", "--task", "t", "--method", "two-stage", "--prompt-style", "reference"]).method \
        == "two-stage"


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


def test_scale_writes_json_and_png(saved_tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    task = write_task(tmp_path, _rows_by_type(8)["sts"])
    out = tmp_path / "scale.json"
    assert cli.main(["scale", "--model", saved_tiny, "--task", task, "--ks", "3,1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["k"] == [1, 3] and (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = evaluation.evaluate(GIRCSE.from_pretrained(saved_tiny), task, ks=[1, 3])
    assert_same_metrics(result["metrics"], expected["metrics"])
    assert "wrote" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--ks", "1,x"], "--ks must be comma-separated integers"),
    (["--ks", "0,2"], "--ks must list K values >= 1"),
    (["--method", "causal-eos"], "needs method gircse"),
])
def test_scale_argument_errors(tmp_path, capsys, no_model, argv, message):
    task = write_task(tmp_path, _rows_by_type(8)["sts"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["scale", "--task", task, *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_explain_prints_the_soft_token_distributions(monkeypatch, make_tiny, capsys):
    model = make_tiny("llama", k=3)
    monkeypatch.setattr(eval_cli, "_load", lambda args: model)
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


def test_eval_mteb_runs_mteb_evaluate(monkeypatch, make_tiny, tmp_path, capsys):
    mteb = pytest.importorskip("mteb")
    from .test_mteb import INSTRUCTIONS, PAIRS, LocalSTS

    model = make_tiny("llama", k=2)
    monkeypatch.setattr(eval_cli, "_load", lambda args: model)
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

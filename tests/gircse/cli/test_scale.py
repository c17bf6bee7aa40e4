"""``gircse scale`` writes the metrics for several K (JSON + PNG); argument errors exit 2 before the model
loads."""
from __future__ import annotations

import json

import pytest

from gircse import GIRCSE, cli, evaluation

from ..test_evaluation import _rows_by_type, write_task
from .test_eval import assert_same_metrics


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


def test_scale_outputs_that_clash_are_refused_before_loading(tmp_path, capsys, no_model):
    """``--output res.png`` wrote the JSON and then the plot over it (the plot defaults to --output with
    .png); an output that is the task file would destroy it."""
    pytest.importorskip("matplotlib")
    task = write_task(tmp_path, _rows_by_type(8)["sts"])
    cases = [
        (["--output", str(tmp_path / "res.png")], "--plot (--output with .png) {p} is the same file as --output"
         .format(p=tmp_path / "res.png")),
        (["--output", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.json")], "--plot {p} is the same file "
         "as --output".format(p=tmp_path / "r.json")),
        (["--output", task], "--output {t} is the same file as --task".format(t=task)),
        (["--output", str(tmp_path / "r.json"), "--plot", task], "is the same file as --task"),
    ]
    for argv, message in cases:
        assert cli.main(["scale", "--task", task, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("gircse scale: ") and message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "res.png").exists() and not (tmp_path / "r.json").exists()


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

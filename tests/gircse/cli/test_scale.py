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

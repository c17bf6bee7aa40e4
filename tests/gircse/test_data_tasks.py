"""The Debian dev tasks as task files: shipped files reproducible, and gircse.evaluation on them gives the
numbers of gircse.data.debian.dev.evaluate."""
from __future__ import annotations

import gzip

import pytest

from gircse import evaluation
from gircse.data.debian import CLASSIFICATION_INSTRUCTION, INSTRUCTION
from gircse.data.debian.dev import evaluate as dev_evaluate
from gircse.data.debian.tasks import build_task_files, main, task_path


def test_shipped_task_files_are_the_conversion_of_the_dev_sets(tmp_path):
    digests = build_task_files(str(tmp_path))
    for name in ("retrieval", "classification"):
        shipped = open(task_path(name), "rb").read()
        assert (tmp_path / f"task_{name}.jsonl.gz").read_bytes() == shipped
    retrieval, classification = evaluation.load_task(task_path("retrieval")), evaluation.load_task(
        task_path("classification"))
    assert retrieval.type == "retrieval" and len(retrieval) == 500
    assert {r["instruction"] for r in retrieval.rows} == {INSTRUCTION}
    assert len(evaluation._retrieval_inputs(retrieval)[0]) == 500  # corpus: the 500 descriptions
    assert classification.type == "classification" and len(classification) == 480
    assert {r["instruction"] for r in classification.rows} == {CLASSIFICATION_INSTRUCTION}
    assert main(["--out", str(tmp_path / "cli")]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(digests)
    with pytest.raises(ValueError, match="retrieval"):
        task_path("sts")


def _head(path, out, n):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    out.write_text("".join(lines), encoding="utf-8")
    return str(out)


def test_task_files_give_the_dev_evaluation_numbers(tmp_path, make_tiny):
    model = make_tiny("llama", k=3)
    n = 24
    dev = dev_evaluate(model, ks=(1, 3), limit=n)
    retrieval = evaluation.evaluate(model, _head(task_path("retrieval"), tmp_path / "r.jsonl", n), ks=(1, 3))
    classification = evaluation.evaluate(model, _head(task_path("classification"), tmp_path / "c.jsonl", n),
                                         ks=(1, 3))
    for k in ("1", "3"):
        for name, value in dev["retrieval"][k].items():
            assert retrieval["metrics"][k][name] == pytest.approx(value, abs=1e-6), (k, name)
        assert classification["metrics"][k]["knn_accuracy"] == pytest.approx(
            dev["classification"][k]["knn_accuracy"], abs=1e-6)

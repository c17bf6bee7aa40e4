"""``gircse search``: the same top-10 as brute force over ``encode``; errors before the model loads."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gircse import cli
from tests.gircse.corpus.corpus_data import TEXTS, corpus_rows, write_jsonl

INSTRUCTION = "Given a phrase, retrieve documents that contain it"
QUERIES = ["alpha beta gamma", "document 7", "delta"]


@pytest.fixture
def encoded(saved_tiny, tmp_path, restore_threads):
    out = str(tmp_path / "out")
    data = write_jsonl(tmp_path / "docs.jsonl", corpus_rows())
    assert cli.main(["encode-corpus", data, out, "--model", saved_tiny, "--shard-size", "6", "--no-progress"]) == 0
    return out


def _brute_force(directory, queries, top=10):
    from gircse import GIRCSE

    model = GIRCSE.from_pretrained(directory)
    scores = model.encode_queries(queries, INSTRUCTION) @ model.encode(TEXTS).T
    return [[(f"doc-{i:03d}", s[i]) for i in np.lexsort((np.arange(len(TEXTS)), -s))[:top]] for s in scores]


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_search_gives_the_brute_force_top_10(saved_tiny, encoded, capsys, backend):
    if backend == "faiss":
        pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'gircse[faiss]')")
    capsys.readouterr()
    assert cli.main(["search", encoded, QUERIES[0], "--instruction", INSTRUCTION, "--backend", backend]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    want = _brute_force(saved_tiny, QUERIES[:1])[0]
    assert [line.split("\t")[0] for line in lines] == [str(r) for r in range(1, 11)]
    assert [line.split("\t")[2] for line in lines] == [i for i, _ in want]
    np.testing.assert_allclose([float(line.split("\t")[1]) for line in lines], [s for _, s in want], atol=2e-4)
    assert cli.main(["search", encoded, *QUERIES, "--instruction", INSTRUCTION, "--top", "4", "--json",
                     "--backend", backend]) == 0
    result = json.loads(capsys.readouterr().out)
    for query, entry, want in zip(QUERIES, result, _brute_force(saved_tiny, QUERIES, 4)):
        assert entry["query"] == query and [h["id"] for h in entry["hits"]] == [i for i, _ in want]
        assert [h["rank"] for h in entry["hits"]] == [1, 2, 3, 4]
        np.testing.assert_allclose([h["score"] for h in entry["hits"]], [s for _, s in want], atol=1e-5)


def test_errors_before_loading(saved_tiny, encoded, tmp_path, capsys, no_model_loading, monkeypatch):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "spec.json").write_text("{}")
    cases = [
        ([str(tmp_path / "nowhere"), "q"], "no such directory"),
        ([str(tmp_path), "q"], "not a gircse corpus directory (no manifest.json)"),
        ([str(unfinished), "q"], "the encoding is not finished"),
        ([encoded, "q", " "], "query 2 is empty"),
        ([encoded, "q", "--model", str(tmp_path / "no-model")], "--model: no such directory"),
        ([encoded, "q", "--device", "nonsense"], "--device 'nonsense'"),
    ]
    from gircse.corpus import search

    for argv, message in cases:
        assert cli.main(["search", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("gircse search: ") and message in err and err.count("\n") == 1, (argv, err)
    monkeypatch.setattr(search, "faiss_available", lambda: False)
    assert cli.main(["search", encoded, "q", "--backend", "faiss"]) == 2
    assert "needs the faiss-cpu package" in capsys.readouterr().err
    # a model changed in place since the corpus was encoded would embed queries the corpus does not match
    with open(f"{saved_tiny}/gircse_config.json") as f:
        config = f.read()
    with open(f"{saved_tiny}/gircse_config.json", "w") as f:
        f.write(config.replace('"k": 2', '"k": 3'))
    assert cli.main(["search", encoded, "q"]) == 2
    assert "changed since the corpus was encoded" in capsys.readouterr().err

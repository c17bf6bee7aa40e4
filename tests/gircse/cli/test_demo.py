"""``gircse demo`` prints a semantic search and the soft tokens of the model it loads."""
from __future__ import annotations

import numpy as np
import pytest

from gircse import cli
from gircse.cli import demo


def test_demo_output_matches_the_model(monkeypatch, make_tiny, capsys):
    model = make_tiny("llama", k=2)
    monkeypatch.setattr(demo, "_load", lambda args: model)
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    scores = model.encode_queries(demo.DEMO_QUERIES, demo.DEMO_INSTRUCTION) @ model.encode_documents(demo.DEMO_DOCUMENTS).T
    for qi, query in enumerate(demo.DEMO_QUERIES):
        best = np.argsort(-scores[qi], kind="stable")[:2]
        block = out.split(f"query: {query}\n")[1].splitlines()[:2]
        for line, di in zip(block, best):
            assert line.strip().endswith(demo.DEMO_DOCUMENTS[di])
            assert float(line.split()[1]) == pytest.approx(scores[qi, di], abs=6e-4)
    hits = sum(int(scores[q].argmax() == d and (scores[q] == scores[q, d]).sum() == 1) for q, d in demo.DEMO_ANSWERS.items())
    assert f"top-1 correct: {hits}/5" in out
    explained = model.explain(demo.DEMO_DOCUMENTS[0], k=2, top=5)
    for step, tokens in enumerate(explained, start=1):
        assert f"  s_{step}: " + "  ".join(f"{tok!r} {p:.2f}" for tok, p in tokens) in out


def test_demo_counts_ties_against_the_answer(monkeypatch, make_tiny, capsys):
    """Constant embeddings (every score tied) answer nothing: 0/5, not the 1/5 an argmax gives query 0."""
    model = make_tiny("llama", k=2)
    model.encode = lambda texts, *a, **kw: np.ones((len(texts), 32), dtype=np.float32)
    model.method = "causal-eos"  # no explain section
    monkeypatch.setattr(demo, "_load", lambda args: model)
    assert cli.main(["demo"]) == 0
    assert "top-1 correct: 0/5" in capsys.readouterr().out

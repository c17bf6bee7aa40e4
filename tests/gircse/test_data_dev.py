"""Dev-task metrics by hand, and evaluate() on a tiny model (all K from one pass)."""
import math

import numpy as np
import pytest
import torch

from gircse.data.debian.dev import evaluate, format_table, knn_accuracy, retrieval_metrics


def test_retrieval_metrics_by_hand():
    # query 0: gold ranked 1st; query 1: 3rd; query 2: 12th (outside top 10)
    scores = torch.zeros(3, 12)
    scores[0, 0] = 1.0
    scores[1, 1], scores[1, 5], scores[1, 6] = 0.5, 0.9, 0.8
    scores[2] = torch.linspace(1, 0, 12)
    scores[2, 2] = -1.0
    m = retrieval_metrics(scores)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@10"] == pytest.approx(2 / 3)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3) / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / 3)


def test_knn_accuracy_separable_and_random():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 5
    x = np.concatenate([c + rng.normal(size=(20, 16)) for c in centers])
    labels = [str(i) for i in range(3) for _ in range(20)]
    assert knn_accuracy(x, labels) == 1.0
    assert knn_accuracy(rng.normal(size=(60, 16)), labels) < 0.7


def test_evaluate_tiny_model_all_k_in_one_pass(make_tiny):
    model = make_tiny("llama", k=4)
    calls = []
    original = model.encode
    model.encode = lambda *a, **kw: calls.append(kw["k"]) or original(*a, **kw)
    result = evaluate(model, ks=(1, 3), limit=24)
    assert calls == [3, 3, 3]  # queries, documents, classification texts: one pass each at max K
    assert result["k"] == [1, 3] and set(result["retrieval"]) == {"1", "3"}
    assert result["n_retrieval"] == 24 and result["n_classification"] == 24
    assert 0 <= result["retrieval"]["3"]["ndcg@10"] <= 1
    # z_1 from the K=3 pass equals a K=1 run
    k1 = evaluate(model, ks=(1,), limit=24)
    assert k1["retrieval"]["1"] == pytest.approx(result["retrieval"]["1"], abs=1e-6)
    assert "| 3 |" in format_table(result)
    base = evaluate(make_tiny("llama", method="causal-eos"), limit=12)
    assert base["k"] == [1]

"""Dev-task metrics by hand, and evaluate() on a tiny model (all K from one pass)."""
import math

import numpy as np
import pytest
import torch

from gircse.data.debian.dev import evaluate, format_table, gold_ranks, knn_accuracy, retrieval_metrics


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


def test_ties_count_against_the_gold_document():
    """A document tied with the gold one ranks above it; constant scores put every gold item last."""
    scores = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9], [0.3, 0.3, 0.3]])
    assert gold_ranks(scores).tolist() == [2, 2, 3]
    n = 40
    constant = retrieval_metrics(torch.ones(n, n))
    assert constant == {"mrr@10": 0.0, "ndcg@10": 0.0, "recall@1": 0.0, "recall@10": 0.0}
    # NaN scores never win either (a NaN gold is last, a NaN competitor counts against the gold).
    nan = torch.eye(3)
    nan[0, 0], nan[1, 2] = float("nan"), float("nan")
    assert gold_ranks(nan).tolist() == [3, 2, 1]
    assert gold_ranks(torch.tensor([[0.1, 0.7, 0.7]]), [2]).tolist() == [2]


def test_constant_embeddings_score_no_better_than_chance():
    """The metrics on constant embeddings (every score tied) are at most what random guessing gets;
    random embeddings land near chance."""
    n, labels = 60, [str(i % 6) for i in range(60)]
    chance_r1, chance_r10 = 1 / n, 10 / n
    metrics = retrieval_metrics(np.ones((n, 8)) @ np.ones((n, 8)).T)
    assert metrics["recall@1"] <= chance_r1 and metrics["recall@10"] <= chance_r10
    assert knn_accuracy(np.ones((n, 8)), labels) <= 1 / 6
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(n, 16)), rng.normal(size=(n, 16))
    assert retrieval_metrics(q @ d.T)["recall@10"] < 3 * chance_r10
    assert knn_accuracy(rng.normal(size=(n, 16)), labels) < 0.4


def test_knn_ties_count_against_the_true_label():
    # With k=1 every item's nearest neighbours tie between its own label and another: all are wrong
    # (items 0 and 1 take item 2, "b"; item 2 takes an "a"; item 3 is orthogonal to all three, a tie).
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert knn_accuracy(x, ["a", "a", "b", "b"], k=1) == 0.0
    # Without ties the same items are right where their own label is nearest: 0 and 1.
    x = np.array([[1.0, 0.0], [1.0, 0.01], [1.0, -0.1], [0.0, 1.0]])
    assert knn_accuracy(x, ["a", "a", "b", "b"], k=1) == 0.5
    # Equal votes for two labels: wrong (the true label must be strictly ahead).
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert knn_accuracy(x, ["a", "a", "b"], k=2) == 0.0
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_accuracy(x, ["a", "a", "b"], k=0)


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


def test_evaluate_bounds(make_tiny):
    model = make_tiny("llama", k=2)
    for ks, error in (((0,), ValueError), ((-1, 3), ValueError), ((), ValueError), ((1.5,), TypeError),
                      ("13", TypeError)):
        with pytest.raises(error):
            evaluate(model, ks=ks, limit=4)
    for limit in (0, -2):
        with pytest.raises(ValueError, match="limit must be >= 1"):
            evaluate(model, ks=(1,), limit=limit)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, ks=(1,), limit=4, batch_size=0)
    # numpy integers are ints
    result = evaluate(model, ks=np.array([1, 2]), limit=np.int64(12), batch_size=np.int32(6))
    assert result["k"] == [1, 2] and result["n_retrieval"] == 12

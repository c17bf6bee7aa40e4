"""gircse.evaluation: metrics by hand and against scipy / scikit-learn, ties against the gold item, task-file
errors naming the line, and evaluate() on fake and tiny models."""
from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

from gircse import evaluation as ev
from gircse.data.jsonl import DataError


def write_task(tmp_path, rows, name="task.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------- metrics
def test_retrieval_metrics_by_hand_multiple_relevant():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1],    # relevant 1, 3: ranks 2 and 4
                           [0.1, 0.2, 0.3, 0.4]])   # relevant 3: rank 1
    m = ev.retrieval_metrics(scores, [[1, 3], [3]])
    idcg2 = 1 + 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx(((1 / math.log2(3) + 1 / math.log2(5)) / idcg2 + 1) / 2)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["recall@1"] == pytest.approx((0 + 1) / 2)
    assert m["recall@10"] == pytest.approx(1.0) and m["recall@100"] == pytest.approx(1.0)


@pytest.mark.parametrize("relevant,expected", [
    ([9], {"ndcg@10": 1 / math.log2(11), "mrr@10": 1 / 10, "recall@1": 0.0, "recall@10": 1.0, "recall@100": 1.0}),
    ([10], {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@1": 0.0, "recall@10": 0.0, "recall@100": 1.0}),
    ([9, 10], {"ndcg@10": (1 / math.log2(11)) / (1 + 1 / math.log2(3)), "mrr@10": 1 / 10, "recall@1": 0.0,
               "recall@10": 0.5, "recall@100": 1.0}),
    # 12 relevant at ranks 1..12: the ideal DCG counts 10 hits, so the ranking is perfect
    (list(range(12)), {"ndcg@10": 1.0, "mrr@10": 1.0, "recall@1": 1 / 12, "recall@10": 10 / 12, "recall@100": 1.0}),
], ids=["rank10", "rank11", "ranks10-11", "12-relevant"])
def test_retrieval_cutoff_at_rank_10(relevant, expected):
    """Document i ranks i + 1: the first relevant at rank 10 still counts for @10, at rank 11 it does not."""
    scores = torch.linspace(1.0, 0.0, 20)[None]
    assert ev.retrieval_metrics(scores, [relevant]) == pytest.approx(expected)


def test_retrieval_ties_count_against_the_relevant_document():
    # the relevant document (0) tied with one non-relevant document: rank 2, not 1
    m = ev.retrieval_metrics(torch.tensor([[0.5, 0.5, 0.1]]), [[0]])
    assert m["recall@1"] == 0 and m["mrr@10"] == pytest.approx(0.5)
    # two relevant documents tied with each other and nothing else: ranks 1 and 2, a perfect ranking
    assert ev.retrieval_metrics(torch.tensor([[0.5, 0.5, 0.1]]), [[0, 1]])["ndcg@10"] == pytest.approx(1.0)
    # constant scores over 30 documents: every relevant document ranks last (30th)
    constant = ev.retrieval_metrics(torch.zeros(30, 30), [[i] for i in range(30)])
    assert constant == {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@1": 0.0, "recall@10": 0.0, "recall@100": 1.0}


def test_retrieval_metrics_match_the_debian_dev_metrics_without_ties():
    from gircse.data.debian.dev import retrieval_metrics as dev_metrics

    scores = torch.randn(40, 40, generator=torch.Generator().manual_seed(0))
    ours, dev = ev.retrieval_metrics(scores, [[i] for i in range(40)]), dev_metrics(scores)
    for name, value in dev.items():
        assert ours[name] == pytest.approx(value, abs=1e-6)


def test_retrieval_metrics_reject_bad_relevance():
    with pytest.raises(ValueError, match=r"relevant\[1\]"):
        ev.retrieval_metrics(torch.zeros(2, 3), [[0], []])
    with pytest.raises(ValueError, match="one row per relevant list"):
        ev.retrieval_metrics(torch.zeros(2, 3), [[0]])


def test_retrieval_metrics_reject_a_document_listed_twice():
    """Relevant ids are a set (MTEB's qrels map each document once): [0, 0] would count one hit twice
    (nDCG@10 1.226); refused, and so are non-int ids."""
    with pytest.raises(ValueError, match=r"relevant\[0\] lists document 0 more than once"):
        ev.retrieval_metrics(np.array([[1.0, 0.0]]), [[0, 0]])
    with pytest.raises(ValueError, match=r"relevant\[0\] must list .* \(ints\)"):
        ev.retrieval_metrics(np.array([[1.0, 0.0]]), [[True]])
    assert ev.retrieval_metrics(np.array([[1.0, 0.0]]), [[np.int64(0)]])["ndcg@10"] == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_metrics_refuse_non_finite_scores(bad):
    """A NaN (or infinite) score has no rank: every metric is an error, not a score (NaN rows scored 1.0)."""
    with pytest.raises(ValueError, match="scores has 1 non-finite value"):
        ev.retrieval_metrics(np.array([[bad, 0.0], [0.0, 1.0]]), [[0], [1]])
    with pytest.raises(ValueError, match="predicted has 1 non-finite"):
        ev.spearman([1.0, bad, 3.0], [0, 1, 2])
    with pytest.raises(ValueError, match="gold has 1 non-finite"):
        ev.spearman([1.0, 2.0, 3.0], [0, bad, 2])
    with pytest.raises(ValueError, match="scores has 1 non-finite"):
        ev.average_precision([bad, 0.5], [1, 0])
    embeddings = np.eye(4)
    embeddings[2, 1] = bad
    labels = ["a", "a", "b", "b"]
    for metric in (ev.knn_accuracy, ev.logistic_regression_accuracy, ev.clustering_v_measure):
        with pytest.raises(ValueError, match="embeddings has 1 non-finite value"):
            metric(embeddings, labels)


def test_spearman_against_scipy_and_constant():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = np.round(a + rng.normal(size=50))  # many ties in the gold scores
    assert ev.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert ev.spearman(np.ones(50), b) == 0.0


def test_average_precision_against_sklearn_and_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    scores, labels = rng.normal(size=60), (rng.random(60) < 0.3).astype(int)
    assert ev.average_precision(scores, labels) == pytest.approx(metrics.average_precision_score(labels, scores))
    assert ev.average_precision([1.0, 1.0], [1, 0]) == pytest.approx(0.5)  # the tied negative ranks first
    # constant scores: positives after every negative, below the prevalence (chance)
    constant = ev.average_precision(np.zeros(60), labels)
    positives, n = labels.sum(), len(labels)
    assert constant == pytest.approx(np.mean([(i + 1) / (n - positives + i + 1) for i in range(positives)]))
    assert constant < labels.mean()


def test_v_measure_against_sklearn_and_kmeans_recovers_clusters():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    true, pred = rng.integers(0, 4, 80), rng.integers(0, 3, 80)
    assert ev.v_measure(true, pred) == pytest.approx(metrics.v_measure_score(true, pred), abs=1e-12)
    assert ev.v_measure([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    x, labels = _blobs(rng, spread=10.0)  # far apart: no k-means++ seeding falls into a merged cluster
    assert ev.clustering_v_measure(x, labels) == pytest.approx(1.0)
    assert ev.clustering_v_measure(np.ones((60, 4)), labels) == 0.0  # one cluster: homogeneity 0


def _blobs(rng, n_per=20, d=16, spread=3.0):
    centers = rng.normal(size=(3, d)) * spread
    x = np.concatenate([c + rng.normal(size=(n_per, d)) for c in centers])
    return x, [f"c{i}" for i in range(3) for _ in range(n_per)]


def test_knn_accuracy_matches_dev_and_ties_count_against():
    from gircse.data.debian.dev import knn_accuracy as dev_knn

    rng = np.random.default_rng(3)
    x, labels = _blobs(rng)
    noise = rng.normal(size=x.shape)
    assert ev.knn_accuracy(x, labels) == dev_knn(x, labels) == 1.0
    assert ev.knn_accuracy(noise, labels) == pytest.approx(dev_knn(noise, labels))
    # constant embeddings: every other row is a tied neighbour; a row's own label has one vote fewer
    assert ev.knn_accuracy(np.ones((60, 4)), labels) == 0.0


def test_logistic_regression_matches_sklearn_probabilities():
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(4)
    x = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(90, 8)), dtype=torch.float32), dim=-1)
    y = torch.tensor(rng.integers(0, 3, 90))
    weight, bias = ev._fit_logistic_regression(x, y, 3)
    ours = torch.softmax(x.double() @ weight + bias, dim=-1).numpy()
    reference = linear_model.LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(ours, reference.predict_proba(x.numpy()), atol=1e-4)


def test_logistic_regression_accuracy_separable_random_constant():
    rng = np.random.default_rng(5)
    x, labels = _blobs(rng)
    assert ev.logistic_regression_accuracy(x, labels) == 1.0
    assert ev.logistic_regression_accuracy(rng.normal(size=x.shape), labels) < 0.7
    assert ev.logistic_regression_accuracy(np.ones((60, 4)), labels) == 0.0  # equal scores: a miss, not a hit


# ---------------------------------------------------------------------- task files
def test_load_task_types(tmp_path):
    retrieval = ev.load_task(write_task(tmp_path, [
        {"query": "q1", "pos": ["d1"], "neg": ["d2"], "instruction": "Find"}, {"corpus": ["d3", "d4"]},
        {"query": "q2", "pos": ["d2", "d1"], "extra": 1}, {"corpus": "d1"}], "r.jsonl"))
    assert retrieval.type == "retrieval" and len(retrieval) == 2 and retrieval.corpus == ["d3", "d4", "d1"]
    corpus, relevant = ev._retrieval_inputs(retrieval)
    assert corpus == ["d1", "d2", "d3", "d4"] and relevant == [[0], [0, 1]]
    assert ev.load_task(write_task(tmp_path, [{"text1": "a", "text2": "b", "score": 1},
                                              {"text1": "c", "text2": "d", "score": 2.5}])).type == "sts"
    assert ev.load_task(write_task(tmp_path, [{"text1": "a", "text2": "b", "label": 1},
                                              {"text1": "c", "text2": "d", "label": 0}])).type == "pair"
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({"text": "x", "label": 3}) + "\n\n" + json.dumps({"text": "y", "label": 4}) + "\n")
    task = ev.load_task(gz)
    assert task.type == "classification" and [r["_line"] for r in task.rows] == [1, 3]


@pytest.mark.parametrize("rows, message", [
    (['{"query": "q", "pos": ["d"]}', '{"query": "q2", "pos": '], r":2: invalid JSON"),
    ([{"query": "q", "pos": ["d"]}, {"text": "t", "label": "x"}], r":2: a classification row in a retrieval task "
                                                                   r"\(line 1 decides"),
    ([{"query": "q", "pos": []}], r":1: 'pos' needs at least 1"),
    ([{"text1": "a", "text2": "b", "score": "high"}], r":1: 'score' must be a finite number"),
    ([{"text1": "a", "text2": "b", "score": 1}, {"text1": "a", "text2": "b"}], r":2: missing 'score'"),
    ([{"text1": "a", "text2": "b", "label": 2}], r":1: 'label' must be 0 or 1"),
    ([{"text1": "a", "text2": "b", "label": True}], r":1: 'label' must be 0 or 1 .* got True"),
    ([{"text1": "a", "text2": "b", "label": 1.0}], r":1: 'label' must be 0 or 1"),
    (['{"text1": "caf\\ud800e", "text2": "b", "score": 1}'], r":1: 'text1' is not valid Unicode: a lone surrogate"),
    (['{"query": "q", "pos": ["d"]}', '{"corpus": ["ok", "\\udcff"]}'], r":2: corpus\[1\] is not valid Unicode"),
    ([{"query": "q", "pos": ["d"], "neg": 0}], r":1: 'neg' must be a list of strings, got int"),
    ([{"query": "q", "pos": ["d"], "neg": {}}], r":1: 'neg' must be a list of strings, got dict"),
    ([{"query": "q", "pos": ["d", "e"], "neg": ["e"]}], r":1: 'e' is in both 'pos' and 'neg'"),
    (['{"text": "a", "label": "x", "instruction": "\\ud800"}'], r":1: 'instruction' is not valid Unicode"),
    ([{"text1": "a", "text2": " ", "label": 1}], r":1: 'text2' must be a non-empty string"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": None}], r":2: 'label' must be a non-empty string or an int"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": "1"}], r":2: labels mix strings and ints"),
    ([{"text": "a", "label": "x", "instruction": 5}], r":1: 'instruction' must be a non-empty string"),
    ([{"title": "no task keys"}], r":1: cannot tell the task type"),
    ([[1, 2]], r":1: expected a JSON object"),
    ([{"text": "a", "label": "x"}, {"corpus": "d"}], r":2: 'corpus' rows belong to retrieval tasks"),
    ([{"corpus": "d"}], r"no task rows"),
    ([{"text1": "a", "text2": "b", "score": 1}, {"text1": "c", "text2": "d", "score": 1}], r"different scores"),
    ([{"text1": "a", "text2": "b", "label": 1}], r"both label 0 and label 1"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], r"at least 2 different labels"),
])
def test_load_task_errors_name_the_line(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        ev.load_task(write_task(tmp_path, rows))


def test_load_task_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.load_task(tmp_path / "nope.jsonl")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        ev.load_task(tmp_path)


def test_load_task_file_errors_name_the_file(tmp_path):
    """Not UTF-8 (a latin-1 file) and a .gz that is not gzip data: errors naming the file, not a bare codec error."""
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text1": "café", "text2": "b", "score": 1}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.jsonl:1: not UTF-8 text"):
        ev.load_task(latin)
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_text('{"text1": "a", "text2": "b", "score": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"fake.jsonl.gz: not a readable gzip file"):
        ev.load_task(fake)


# ---------------------------------------------------------------------- evaluate
class FakeModel:
    """``encode`` of a GIRCSE-like model from a function text -> vector; records every call."""

    def __init__(self, vector, method="causal-eos", k=1):
        self.vector, self.method, self.k, self.calls = vector, method, k, []

    def encode(self, texts, instruction=None, *, k=None, batch_size=32, return_all_steps=False,
               convert_to_numpy=True, show_progress_bar=None):
        self.calls.append((list(texts), instruction, k))
        out = torch.stack([torch.as_tensor(self.vector(t), dtype=torch.float32) for t in texts])
        return out[:, None] if return_all_steps else out


TOPICS = ["cats", "dogs", "fish", "birds"]


def _topic_vector(text):
    return [float(topic in text) for topic in TOPICS] + [1e-3]


def _rows_by_type(n=12):
    retrieval = [{"query": f"{TOPICS[i % 4]} query {i}", "pos": [f"{TOPICS[i % 4]} doc {i}"],
                  "instruction": "Find the doc"} for i in range(4)]
    retrieval += [{"corpus": [f"filler {j}" for j in range(20)]}]
    sts = [{"text1": f"{TOPICS[i % 4]} a", "text2": f"{TOPICS[i % 4]} b" if i % 2 else f"{TOPICS[(i + 1) % 4]} b",
            "score": float(i % 2)} for i in range(n)]
    pair = [{**{k: v for k, v in r.items() if k != "score"}, "label": int(r["score"])} for r in sts]
    classification = [{"text": f"about {TOPICS[i % 4]} number {i}", "label": TOPICS[i % 4]} for i in range(n)]
    return {"retrieval": retrieval, "sts": sts, "pair": pair, "classification": classification}


@pytest.mark.parametrize("kind", ["retrieval", "sts", "pair", "classification"])
def test_evaluate_perfect_and_constant_embeddings(tmp_path, kind):
    path = write_task(tmp_path, _rows_by_type()[kind])
    perfect = ev.evaluate(FakeModel(_topic_vector), path)
    assert perfect["type"] == kind and perfect["k"] == [1] and set(perfect["metrics"]["1"]) == set(ev.METRICS[kind])
    main = ev.METRICS[kind][0]
    assert perfect["metrics"]["1"][main] == pytest.approx(1.0)
    constant = ev.evaluate(FakeModel(lambda t: [1.0, 2.0, 3.0]), path)["metrics"]["1"]
    chance = {"retrieval": 1 / 24, "sts": 0.0, "pair": 0.5, "classification": 0.25}[kind]
    assert constant[main] <= chance  # ties count against the gold item: never above chance, never 1.0


def test_evaluate_instructions(tmp_path):
    rows = _rows_by_type()["retrieval"]
    rows[1] = {k: v for k, v in rows[1].items() if k != "instruction"}
    model = FakeModel(_topic_vector)
    ev.evaluate(model, write_task(tmp_path, rows), instruction="Default", document_instruction="Doc")
    (queries, q_instr, _), (docs, d_instr, _) = model.calls
    assert q_instr == ["Find the doc", "Default", "Find the doc", "Find the doc"]
    assert d_instr == "Doc" and len(docs) == 4 + 20
    model = FakeModel(_topic_vector)
    ev.evaluate(model, write_task(tmp_path, _rows_by_type()["sts"]), instruction="Same")
    (texts, instructions, _), = model.calls  # text1 and text2 in one pass, both instructed
    assert len(texts) == 24 and instructions == ["Same"] * 24


def test_evaluate_rejects_several_k_for_one_step_methods(tmp_path):
    path = write_task(tmp_path, _rows_by_type()["sts"])
    with pytest.raises(ValueError, match="needs method 'gircse'"):
        ev.evaluate(FakeModel(_topic_vector), path, ks=[1, 3])
    two_stage = FakeModel(_topic_vector, method="two-stage", k=7)
    assert ev.evaluate(two_stage, path)["k"] == [7] and two_stage.calls[0][2] == 7


def test_evaluate_tiny_gircse_all_k_from_one_pass(tmp_path, make_tiny):
    model = make_tiny("llama", k=4)
    path = write_task(tmp_path, _rows_by_type(8)["classification"])
    calls = []
    original = model.encode
    model.encode = lambda *a, **kw: calls.append(kw["k"]) or original(*a, **kw)
    result = ev.evaluate(model, path, ks=[3, 1])
    assert calls == [3] and result["k"] == [1, 3]
    single = ev.evaluate(model, path, ks=[1])
    for name, value in single["metrics"]["1"].items():
        assert result["metrics"]["1"][name] == pytest.approx(value, abs=1e-6)

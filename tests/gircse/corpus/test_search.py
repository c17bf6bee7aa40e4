"""``gircse.corpus.search.top_k``: chunked exact top-k equals brute force; FAISS gives the same hits."""
from __future__ import annotations

import numpy as np
import pytest

from gircse.corpus.search import faiss_available, resolve_backend, top_k
from gircse.corpus.store import ShardedMatrix


def _brute_force(queries, matrix, top):
    """Cosine scores of every row; best first, ties by the lower row."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    m = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    scores = (q @ m.T).astype(np.float32)
    rows = np.stack([np.lexsort((np.arange(len(m)), -s))[:top] for s in scores])
    return np.take_along_axis(scores, rows, 1), rows


def _data(n=50, d=8, seed=0):
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((n, d)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    matrix[[7, 31, 44]] = matrix[12]  # repeated documents: equal scores, ordered by row
    return rng.standard_normal((3, d)).astype(np.float32), matrix


@pytest.mark.parametrize("chunk_rows", [1, 7, 50, 1000])
def test_chunked_exact_equals_brute_force(chunk_rows):
    queries, matrix = _data()
    queries[1] = matrix[12] * 2.0  # a query on the repeated document: a four-way tie at the top
    parts = ShardedMatrix([matrix[:20], matrix[20:23], matrix[23:]])
    for top in (1, 4, 10, 50, 80):
        scores, rows = top_k(queries, parts, top, backend="exact", chunk_rows=chunk_rows)
        want_scores, want_rows = _brute_force(queries, matrix, min(top, 50))
        assert np.array_equal(rows, want_rows), top
        np.testing.assert_allclose(scores, want_scores, atol=1e-6)
    assert list(top_k(queries, matrix, 4, backend="exact")[1][1]) == [7, 12, 31, 44]


def test_unnormalized_rows_are_scored_by_cosine():
    queries, matrix = _data()
    scaled = matrix * np.random.default_rng(3).uniform(0.1, 10, (len(matrix), 1)).astype(np.float32)
    scores, rows = top_k(queries, scaled, 10, backend="exact", normalized=False, chunk_rows=9)
    want_scores, want_rows = _brute_force(queries, matrix, 10)
    assert np.array_equal(rows[[0, 2]], want_rows[[0, 2]])  # query 1 has ties that scaling may reorder
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu is not installed (pip install 'gircse[faiss]')")
@pytest.mark.parametrize("chunk_rows", [7, 1000])
def test_faiss_gives_the_exact_hits(chunk_rows):
    queries, matrix = _data(n=300, d=16, seed=5)
    exact = top_k(queries, ShardedMatrix([matrix[:100], matrix[100:]]), 10, backend="exact", chunk_rows=chunk_rows)
    faiss = top_k(queries, ShardedMatrix([matrix[:100], matrix[100:]]), 10, backend="faiss", chunk_rows=chunk_rows)
    assert np.array_equal(exact[1], faiss[1])
    np.testing.assert_allclose(exact[0], faiss[0], atol=1e-5)
    assert resolve_backend("auto") == "faiss"


def test_backend_and_argument_errors(monkeypatch):
    queries, matrix = _data()
    with pytest.raises(ValueError, match="backend must be one of"):
        top_k(queries, matrix, 3, backend="annoy")
    with pytest.raises(ValueError, match=r"queries must be \[m, 8\]"):
        top_k(queries[:, :4], matrix, 3, backend="exact")
    with pytest.raises(ValueError, match="top must be >= 1"):
        top_k(queries, matrix, 0, backend="exact")
    from gircse.corpus import search

    monkeypatch.setattr(search, "faiss_available", lambda: False)
    assert resolve_backend("auto") == "exact"
    with pytest.raises(ImportError, match="pip install 'gircse\\[faiss\\]'"):
        resolve_backend("faiss")

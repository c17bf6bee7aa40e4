"""Exact top-k search over a corpus matrix, chunk by chunk (bounded memory), with numpy or FAISS.

Both backends score every row (cosine similarity: the query is L2-normalized, and so are the rows when the
corpus was not), keep each chunk's best candidates, and merge them with one rule: higher score first, then
the lower row. Memory: one chunk of rows and ``[queries, chunk]`` scores, whatever the corpus size.
"""
from __future__ import annotations

import importlib.util

import numpy as np

__all__ = ["BACKENDS", "faiss_available", "top_k"]

BACKENDS = ("auto", "exact", "faiss")


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def resolve_backend(backend: str) -> str:
    """"auto": FAISS when ``faiss`` (the optional ``faiss-cpu`` package) is installed, else numpy."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "faiss" if faiss_available() else "exact"
    if backend == "faiss" and not faiss_available():
        raise ImportError("backend 'faiss' needs the faiss-cpu package: pip install 'gircse[faiss]'")
    return backend


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def _best(scores: np.ndarray, rows: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query row, the ``top`` candidates by (score descending, row ascending)."""
    keep = min(top, scores.shape[1])
    out_scores = np.empty((scores.shape[0], keep), np.float32)
    out_rows = np.empty((scores.shape[0], keep), np.int64)
    for q in range(scores.shape[0]):
        s, r = scores[q], rows[q]
        if len(s) > keep:  # every candidate tying with the keep-th best, so the tie rule sees them all
            threshold = np.partition(s, len(s) - keep)[len(s) - keep]
            mask = s >= threshold
            s, r = s[mask], r[mask]
        order = np.lexsort((r, -s))[:keep]
        out_scores[q], out_rows[q] = s[order], r[order]
    return out_scores, out_rows


def _chunk_candidates(queries, block, first, top, backend):
    if backend == "faiss":
        import faiss

        scores, rows = faiss.knn(queries, np.ascontiguousarray(block), min(top, len(block)),
                                 metric=faiss.METRIC_INNER_PRODUCT)
        return scores, rows.astype(np.int64) + first
    scores = queries @ block.T
    rows = np.broadcast_to(np.arange(first, first + len(block), dtype=np.int64), scores.shape)
    return _best(scores, rows, top)


def top_k(queries: np.ndarray, matrix, top: int, *, backend: str = "auto", chunk_rows: int = 65536,
          normalized: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rows)``, each ``[m, min(top, n)]``: the rows of ``matrix`` (``[n, d]``: a ``ShardedMatrix``
    or an array) most similar to each of the ``m`` queries, best first.

    ``backend``: "exact" (numpy matrix products), "faiss" (``faiss.knn``, FAISS's exact brute force, per chunk),
    or "auto" (FAISS when installed). ``normalized``: the rows are unit length already (the corpus default);
    otherwise each chunk is normalized on the fly, so scores are always cosine similarities."""
    from ..validation import as_int

    top = as_int("top", top, minimum=1)
    chunk_rows = as_int("chunk_rows", chunk_rows, minimum=1)
    backend = resolve_backend(backend)
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if queries.ndim != 2 or queries.shape[1] != matrix.shape[1]:
        raise ValueError(f"queries must be [m, {matrix.shape[1]}] (the corpus dimension), got {queries.shape}")
    queries = np.ascontiguousarray(_normalize(queries))
    chunks = matrix.chunks(chunk_rows) if hasattr(matrix, "chunks") else (
        (start, matrix[start:start + chunk_rows]) for start in range(0, len(matrix), chunk_rows))
    best_scores = np.empty((len(queries), 0), np.float32)
    best_rows = np.empty((len(queries), 0), np.int64)
    for first, block in chunks:
        block = np.asarray(block, dtype=np.float32)
        if not normalized:
            block = _normalize(block)
        scores, rows = _chunk_candidates(queries, block, first, top, backend)
        best_scores, best_rows = _best(np.concatenate([best_scores, scores], axis=1),
                                       np.concatenate([best_rows, rows], axis=1), top)
    return best_scores, best_rows

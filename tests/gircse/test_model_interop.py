"""sentence-transformers-style use of a GIRCSE model: encode(sentences, prompt=..., batch_size=...,
normalize_embeddings=..., convert_to_tensor=...), encode_query / encode_document."""
from __future__ import annotations

import numpy as np
import pytest
import torch

QUERIES = ["tallest peak on Earth", "how do plants make food"]
DOCS = ["Photosynthesis converts light into chemical energy.", "Mount Everest is the highest mountain.",
        "The stock market fell.", "a", "Regular exercise lowers the risk of heart disease and improves sleep."]


def test_sentence_transformers_keywords(make_tiny):
    model = make_tiny("qwen2", k=3)
    prompted = model.encode(QUERIES, prompt="query: ")
    np.testing.assert_allclose(prompted, model.encode(["query: " + q for q in QUERIES]), atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        model.encode(QUERIES, "Find", prompt="query: ")
    with pytest.raises(TypeError, match="prompt must be a str"):
        model.encode(QUERIES, prompt=3)
    tensor = model.encode(DOCS, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.shape == (5, 32)
    raw = model.encode(DOCS, normalize_embeddings=False, convert_to_tensor=True)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), tensor, atol=1e-6, rtol=0)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(5))
    single = model.encode("one sentence", convert_to_tensor=True)
    assert single.shape == (32,)


def test_embeddings_identical_across_batch_sizes(make_tiny):
    model = make_tiny("mistral", k=3)
    reference = model.encode(DOCS, batch_size=len(DOCS))
    for batch_size in (1, 2, 3):
        np.testing.assert_allclose(model.encode(DOCS, batch_size=batch_size), reference, atol=2e-5)


def test_encode_query_and_encode_document(make_tiny):
    model = make_tiny("llama", k=2)
    np.testing.assert_allclose(model.encode_query(QUERIES, "Find the answer"),
                               model.encode_queries(QUERIES, "Find the answer"), atol=1e-6)
    np.testing.assert_allclose(model.encode_document(DOCS), model.encode_documents(DOCS), atol=1e-6)
    np.testing.assert_allclose(model.encode_document(DOCS), model.encode(DOCS), atol=1e-6)


def test_works_where_sentence_transformers_code_expects_a_model(make_tiny):
    util = pytest.importorskip("sentence_transformers.util")
    model = make_tiny("llama", k=2)

    def search(st_model, queries, corpus):  # written against the sentence-transformers API
        q = st_model.encode_query(queries, convert_to_tensor=True, normalize_embeddings=True, batch_size=2)
        d = st_model.encode_document(corpus, convert_to_tensor=True, normalize_embeddings=True, batch_size=2)
        return util.semantic_search(q, d, top_k=3)

    hits = search(model, QUERIES, DOCS)
    scores = model.similarity(model.encode_queries(QUERIES), model.encode_documents(DOCS))
    for row, query_hits in zip(scores, hits):
        assert [h["corpus_id"] for h in query_hits] == list(np.argsort(-row)[:3])
        np.testing.assert_allclose([h["score"] for h in query_hits], np.sort(row)[::-1][:3], atol=1e-5)

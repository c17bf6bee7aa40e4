"""Algorithm 1 with a KV cache against the uncached oracle, batch invariance, pooling, baselines' attention."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gircse.baselines import bidirectional_attention_mask, bidirectional_mean, causal_eos_state
from gircse.generation import (decoder_of, generate_soft_tokens, generate_soft_tokens_uncached,
                               left_padded_position_ids, pool_steps, soft_token_embedding_of)

from .conftest import FAMILIES, tiny_causal_lm

TEXTS = ["a short one", "a considerably longer sentence about the weather in the mountains today",
         "medium length text here"]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_matches_uncached_algorithm(family, make_tiny):
    gircse = make_tiny(family)
    batch = gircse.tokenize(TEXTS, "Retrieve the passage")
    assert batch["attention_mask"][:, 0].min() == 0, "the batch must contain left padding"
    with torch.no_grad():
        cached, cached_prefill = generate_soft_tokens(gircse.model, None, **batch, k=5, return_prefill_state=True)
        uncached, uncached_prefill = generate_soft_tokens_uncached(gircse.model, None, **batch, k=5,
                                                                   return_prefill_state=True)
    assert cached.shape == (3, 5, 32)
    # fp32 round-off only: the cached 1-row steps and the full re-forward use different GEMM shapes,
    # hence different BLAS kernels and summation orders (up to ~4e-5 on O(1) states, MKL on AMD EPYC).
    torch.testing.assert_close(cached, uncached, atol=6e-5, rtol=1e-5)
    torch.testing.assert_close(cached_prefill, uncached_prefill, atol=6e-5, rtol=1e-5)
    # The steps carry signal: consecutive generated states differ.
    assert (cached[:, 1:] - cached[:, :-1]).abs().amax() > 1e-2


def test_cached_generation_gradients_match_uncached(make_tiny):
    """Training backprops through the KV cache: same gradients as the uncached algorithm."""
    gircse = make_tiny("qwen2")
    batch = gircse.tokenize(TEXTS[:2])
    params = dict(gircse.model.named_parameters())
    weights = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))

    def grads(generate):
        gircse.model.zero_grad()
        out = generate(gircse.model, soft_token_embedding_of(gircse.model), **batch, k=4)
        (out * weights).sum().backward()
        return {name: p.grad.clone() for name, p in params.items() if p.grad is not None}

    cached, uncached = grads(generate_soft_tokens), grads(generate_soft_tokens_uncached)
    assert cached.keys() == uncached.keys() and "lm_head.weight" in cached
    for name in cached:
        # fp32 (RMSNorm upcasts, long reductions): compare relative to the tensor's gradient scale.
        scale = uncached[name].abs().max().item()
        err = (cached[name] - uncached[name]).abs().max().item()
        assert err <= 1e-4 * scale + 1e-6, (name, err, scale)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["gircse", "causal-eos", "bidirectional-avg"])
def test_batch_invariance(family, method, make_tiny):
    """A text alone == the same text in a batch with longer and shorter texts (fp32, tight)."""
    gircse = make_tiny(family, method=method)
    alone = gircse.encode([TEXTS[2]], "Find it", normalize_embeddings=False)
    in_batch = gircse.encode(TEXTS, "Find it", normalize_embeddings=False, batch_size=3)
    np.testing.assert_allclose(in_batch[2], alone[0], atol=2e-5, rtol=1e-5)


def test_return_all_steps_semantics(make_tiny):
    gircse = make_tiny("llama", k=4)
    steps = gircse.encode(TEXTS, k=4, return_all_steps=True, normalize_embeddings=False)
    assert steps.shape == (3, 4, 32)
    final = gircse.encode(TEXTS, k=4, normalize_embeddings=False)
    np.testing.assert_allclose(steps[:, -1], final, atol=1e-6)
    # z_j is exactly the embedding a k=j run gives (later steps never change earlier states).
    for j in (1, 2):
        np.testing.assert_allclose(steps[:, j - 1], gircse.encode(TEXTS, k=j, normalize_embeddings=False),
                                   atol=1e-6)
    normalized = gircse.encode(TEXTS, k=4, return_all_steps=True)
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=-1), 1.0, atol=1e-5)


def test_pool_steps_is_running_mean():
    g = torch.arange(24.0).reshape(1, 4, 6)
    torch.testing.assert_close(pool_steps(g), g.mean(1))
    all_steps = pool_steps(g, return_all_steps=True)
    for k in range(1, 5):
        torch.testing.assert_close(all_steps[:, k - 1], g[:, :k].mean(1))
    with pytest.raises(ValueError):
        pool_steps(g[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_bidirectional_mask_lets_tokens_see_later_tokens(family):
    """With the 4-D mask a token's state depends on later tokens; with the default causal mask it does not."""
    model = tiny_causal_lm(family)
    decoder = decoder_of(model)
    ids_a = torch.tensor([[5, 900, 901, 902, 903]])
    ids_b = ids_a.clone()
    ids_b[0, -1] = 4000  # change only the last token
    mask = torch.ones_like(ids_a)
    positions = left_padded_position_ids(mask)
    for implementation in ("sdpa", "eager"):
        model.config._attn_implementation = implementation
        with torch.no_grad():
            causal = [decoder(input_ids=i, attention_mask=mask, position_ids=positions).last_hidden_state
                      for i in (ids_a, ids_b)]
            dtype = None if implementation == "sdpa" else torch.float32
            full = [decoder(input_ids=i, attention_mask=bidirectional_attention_mask(mask, dtype),
                            position_ids=positions).last_hidden_state for i in (ids_a, ids_b)]
        torch.testing.assert_close(causal[0][:, :-1], causal[1][:, :-1])
        assert (full[0][:, 0] - full[1][:, 0]).abs().max() > 1e-3, implementation
    model.config._attn_implementation = "sdpa"


def test_bidirectional_mask_ignores_padding(make_tiny):
    gircse = make_tiny("mistral", method="bidirectional-avg")
    batch = gircse.tokenize(TEXTS)
    with torch.no_grad():
        pooled = bidirectional_mean(gircse.model, **batch)
        alone = bidirectional_mean(gircse.model, **gircse.tokenize([TEXTS[0]]))
    torch.testing.assert_close(pooled[0], alone[0], atol=2e-5, rtol=1e-5)
    assert bidirectional_attention_mask(batch["attention_mask"]).dtype == torch.bool


def test_causal_eos_appends_eos_and_takes_its_state(make_tiny):
    gircse = make_tiny("llama", method="causal-eos")
    batch = gircse.tokenize(TEXTS)
    assert (batch["input_ids"][:, -1] == gircse.tokenizer.eos_token_id).all()
    plain = gircse.tokenizer(TEXTS[1])["input_ids"]
    ids = torch.tensor([plain + [gircse.tokenizer.eos_token_id]])
    with torch.no_grad():
        expected = decoder_of(gircse.model)(input_ids=ids).last_hidden_state[:, -1]
        got = causal_eos_state(gircse.model, **gircse.tokenize([TEXTS[1]]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,reentrant", [("llama", False), ("qwen2", False), ("llama", True)])
def test_generation_under_gradient_checkpointing(family, reentrant, make_tiny):
    """transformers drops a shared cache inside checkpointed layers; the per-call replay-safe caches
    keep it: same values as the uncached algorithm, same gradients as without checkpointing, and the
    layers really were replayed."""
    gircse = make_tiny(family)
    batch = gircse.tokenize(TEXTS[:2])
    weights = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = generate_soft_tokens_uncached(gircse.model, None, **batch, k=3)

    def run():
        gircse.model.zero_grad()
        out = generate_soft_tokens(gircse.model, None, **batch, k=3)
        (out * weights).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in gircse.model.named_parameters()}

    plain_out, plain_grads = run()
    gircse.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    gircse.model.train()
    attention_calls = []
    hook = gircse.model.model.layers[0].self_attn.register_forward_hook(lambda *a: attention_calls.append(1))
    if reentrant:  # reentrant checkpointing would lose the gradients through the cache: switched off, warned
        import gircse.generation as generation

        generation._warned_reentrant = False
        with pytest.warns(RuntimeWarning, match="reentrant"):
            ckpt_out, ckpt_grads = run()
    else:
        ckpt_out, ckpt_grads = run()
    hook.remove()
    assert len(attention_calls) == 2 * (1 + 3), "each of the 4 decoder calls runs forward + a backward replay"
    torch.testing.assert_close(ckpt_out, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ckpt_out, plain_out, atol=1e-6, rtol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # The switch is local to the call: layers are back to transformers' default afterwards.
    assert all("_can_checkpoint_with_cache" not in vars(m) for m in gircse.model.modules())
    layer_func = gircse.model.model.layers[0]._gradient_checkpointing_func
    assert layer_func.keywords["use_reentrant"] is reentrant


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_cached_generation_with_sliding_window_layers(family):
    """Inputs longer than the sliding window: the sliding-window cache layers still match the oracle."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    torch.manual_seed(0)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=6)).eval()
    else:  # layer 0 full attention, layer 1 sliding
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=6,
                                             max_window_layers=1)).eval()
    from gircse.prompts import left_pad

    input_ids, attention_mask = left_pad([list(range(5, 25)), list(range(30, 40))], 0)
    with torch.no_grad():
        cached = generate_soft_tokens(model, None, input_ids, attention_mask, 5)
        uncached = generate_soft_tokens_uncached(model, None, input_ids, attention_mask, 5)
        alone = generate_soft_tokens(model, None, input_ids[1:, 10:], attention_mask[1:, 10:], 5)
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached[1], alone[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefill_rows", [None, 2])
def test_static_cache_without_autograd_matches_the_training_cache_bitwise(family, prefill_rows, make_tiny):
    """encode (no autograd) fills one preallocated buffer per layer in place; training rebuilds a
    replay-safe cache per call with torch.cat. Same keys and values reach attention: same bits
    (GradCache relies on it: its no-grad embeddings must be those the graph pass recomputes), with one
    prefill and with chunked prefills (the training side stacks the chunks' left-padded keys)."""
    import gircse.generation as generation

    gircse = make_tiny(family)
    batch = gircse.tokenize(TEXTS, "Retrieve the passage")
    layers = []
    original = generation._step_cache

    def spy(cache, past_length):
        layers.append(type(cache.layers[0]))
        return original(cache, past_length)

    generation._step_cache = spy
    try:
        with torch.no_grad():
            static = generate_soft_tokens(gircse.model, None, **batch, k=4, prefill_rows=prefill_rows)
        assert set(layers) == {generation._StaticLayer}
        layers.clear()
        with torch.enable_grad():
            replay_safe = generate_soft_tokens(gircse.model, None, **batch, k=4, prefill_rows=prefill_rows)
        assert set(layers) == {generation._ReplaySafeLayer} and replay_safe.requires_grad
    finally:
        generation._step_cache = original
    assert torch.equal(static, replay_safe.detach())


@pytest.mark.parametrize("family,attention", [("llama", "sdpa"), ("qwen2", "eager"), ("mistral", "sdpa")])
def test_chunked_prefill_matches_one_prefill(family, attention, make_tiny):
    """``prefill_rows``: the prefill runs in row chunks cut to each chunk's own longest row, the steps on
    all rows at once. In float64 (soft tokens from the materialized formula; the op computes in fp32 /
    bf16) the states and the gradients through the stacked keys/values equal one prefill's to 1e-10:
    the chunks change no arithmetic, only GEMM shapes. With the op in fp32 they agree to round-off
    (the tiny random models amplify it, up to ~1e-4 through 4 steps)."""
    gircse = make_tiny(family)
    gircse.model.config._attn_implementation = attention
    texts = TEXTS + ["one more row, of middling length"]
    batch = gircse.tokenize(texts, "Retrieve the passage")
    order = batch["attention_mask"].sum(1).argsort(descending=True)  # sorted, as encode sorts
    batch = {name: t[order] for name, t in batch.items()}
    with torch.no_grad():
        whole32 = generate_soft_tokens(gircse.model, None, **batch, k=4)
        chunked32 = generate_soft_tokens(gircse.model, None, **batch, k=4, prefill_rows=2)
    torch.testing.assert_close(chunked32, whole32, atol=3e-4, rtol=1e-4)
    model = gircse.model.double()
    # transformers' eager attention in float64 turns a padded query row's mask into -inf (finfo.min
    # added twice) and NaN, chunked or not: the float64 check runs with SDPA.
    model.config._attn_implementation = "sdpa"
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    soft_token = lambda h: torch.softmax(h @ head.T, dim=-1) @ embeddings
    params = [p for p in model.parameters() if p.requires_grad]
    outs, grads = [], []
    for rows in (None, 1, 2, 3):
        with torch.no_grad():
            outs.append(generate_soft_tokens(model, soft_token, **batch, k=4, prefill_rows=rows))
        if rows in (None, 2):
            out = generate_soft_tokens(model, soft_token, **batch, k=4, prefill_rows=rows)
            grads.append(torch.autograd.grad(out.pow(2).sum(), params))
    for chunked in outs[1:]:
        torch.testing.assert_close(chunked, outs[0], atol=1e-10, rtol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="prefill_rows"):
        generate_soft_tokens(model, soft_token, **batch, k=4, prefill_rows=0)
    with pytest.raises(ValueError, match="capturable"):
        generate_soft_tokens(model, soft_token, **batch, k=4, prefill_rows=2, capturable=True)


def test_static_cache_writes_windows_and_rejects_overflow():
    from gircse.generation import _place, _StaticLayer
    from transformers.cache_utils import Cache

    layer = _StaticLayer(batch=2, capacity=4)
    cache = Cache(layers=[layer])
    _place(cache, slice(0, 1), 1, 1)  # a chunk of row 0 whose prefill is 2 columns long, right-aligned
    keys, _ = layer.update(torch.ones(1, 2, 2, 3), torch.ones(1, 2, 2, 3))
    assert keys.shape == (1, 2, 2, 3) and layer.get_seq_length() == 0
    _place(cache, slice(None), 0, 3)  # a step over both rows: all columns so far, row 1 never written
    keys, values = layer.update(torch.full((2, 2, 1, 3), 2.0), torch.full((2, 2, 1, 3), 2.0))
    assert keys.shape == (2, 2, 4, 3) and layer.get_seq_length() == 3
    assert keys[0, :, 0].eq(0).all() and keys[0, :, 1:3].eq(1).all() and keys[:, :, 3].eq(2).all()
    assert keys[1, :, :3].eq(0).all()  # unwritten columns are zero, never garbage
    _place(cache, slice(None), 0, 4)
    with pytest.raises(RuntimeError, match="capacity 4"):
        layer.update(torch.ones(2, 2, 1, 3), torch.ones(2, 2, 1, 3))


@pytest.mark.parametrize("family,steps_read_mask", [("llama", False), ("qwen2", False), ("mistral", True)])
def test_decode_steps_skip_transformers_mask_construction(family, steps_read_mask, make_tiny, monkeypatch):
    """Decode steps hand transformers a prebuilt 4-D mask, so it never reads the padding mask back to
    the host (a GPU synchronization per step); sliding-window models (the tiny Mistral) keep the 2-D
    mask so transformers applies the window."""
    import transformers.masking_utils as masking_utils

    gircse = make_tiny(family)
    batch = gircse.tokenize(TEXTS, "Find it")
    reads = []
    original = masking_utils.fast_all
    monkeypatch.setattr(masking_utils, "fast_all", lambda t: reads.append(1) or original(t))
    counts = []
    with torch.no_grad():
        for k in (1, 4):
            reads.clear()
            generate_soft_tokens(gircse.model, None, **batch, k=k)
            counts.append(len(reads))
    assert (counts[1] > counts[0]) is steps_read_mask, counts


def test_cached_generation_with_eager_attention_matches_uncached(make_tiny):
    gircse = make_tiny("qwen2")
    gircse.model.config._attn_implementation = "eager"
    batch = gircse.tokenize(TEXTS, "Retrieve the passage")
    with torch.no_grad():
        cached = generate_soft_tokens(gircse.model, None, **batch, k=4)
        uncached = generate_soft_tokens_uncached(gircse.model, None, **batch, k=4)
    torch.testing.assert_close(cached, uncached, atol=6e-5, rtol=1e-5)


@pytest.mark.parametrize("family,attention", [("llama", "sdpa"), ("qwen2", "sdpa"), ("qwen2", "eager"),
                                              ("mistral", "sdpa")])
def test_capturable_generation_reads_nothing_back_and_matches(family, attention, make_tiny, monkeypatch):
    """``capturable=True`` (CUDA-graph capture of the whole generation): no left-padding check and no
    transformers mask construction reading the padding mask back to the host, for the prefill and every
    step; the same states as the default path to fp32 round-off, padded rows included. Sliding-window
    models (the tiny Mistral) keep transformers' own masks, which do read the mask."""
    import gircse.generation as generation
    import transformers.masking_utils as masking_utils

    gircse = make_tiny(family)
    gircse.model.config._attn_implementation = attention
    batch = gircse.tokenize(TEXTS, "Retrieve the passage")
    assert batch["attention_mask"][:, 0].min() == 0, "the batch must contain left padding"
    with torch.no_grad():
        default = generate_soft_tokens(gircse.model, None, **batch, k=4)
        reads = []
        original = masking_utils.fast_all
        monkeypatch.setattr(masking_utils, "fast_all", lambda t: reads.append(1) or original(t))
        monkeypatch.setattr(generation, "check_left_padded", lambda mask: reads.append("padding check"))
        capturable, prefill = generate_soft_tokens(gircse.model, None, **batch, k=4, capturable=True,
                                                   return_prefill_state=True)
    assert (len(reads) > 0) is (family == "mistral"), reads
    assert "padding check" not in reads
    assert torch.isfinite(capturable).all() and torch.isfinite(prefill).all()
    torch.testing.assert_close(capturable, default, atol=2e-5, rtol=1e-5)

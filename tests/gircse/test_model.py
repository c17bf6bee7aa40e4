"""The GIRCSE object: save/load with a LoRA adapter, explain, input errors, truncation, encode details."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

import gircse
from gircse import GIRCSE
from gircse import loading

from .conftest import tiny_causal_lm

TEXTS = ["the cat sat on the mat", "stock prices fell sharply today after the announcement", "rain"]


def _lora(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(3)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the model
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft_model.eval()


def test_save_and_load_with_lora_adapter(tiny_base_dir, tmp_path):
    tiny_base_dir = str(tiny_base_dir)
    base = GIRCSE.from_pretrained(tiny_base_dir, k=3, max_length=64)
    assert base.base_model == tiny_base_dir and base.k == 3 and base.method == "gircse"
    before = base.encode(TEXTS, "Find it")
    tuned = GIRCSE(_lora(base.model), base.tokenizer, k=3, max_length=64, base_model=tiny_base_dir)
    expected = tuned.encode(TEXTS, "Find it")
    assert np.abs(expected - before).max() > 1e-3, "the adapter must matter"

    out = tmp_path / "saved"
    tuned.save_pretrained(str(out))
    files = set(os.listdir(out))
    assert {"gircse_config.json", "adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    config = json.loads((out / "gircse_config.json").read_text())
    assert config["method"] == "gircse" and config["k"] == 3 and config["max_length"] == 64
    assert config["base_model"] == tiny_base_dir and "{instruction}" in config["query_format"]

    loaded = GIRCSE.from_pretrained(str(out))
    assert hasattr(loaded.model, "peft_config") and loaded.k == 3 and loaded.max_length == 64
    np.testing.assert_allclose(loaded.encode(TEXTS, "Find it"), expected, atol=1e-5)
    # Overrides beat the saved values.
    assert GIRCSE.from_pretrained(str(out), k=2, method="causal-eos").k == 2


def test_save_in_memory_model_writes_base_weights(make_tiny, tmp_path):
    model = make_tiny("qwen2", k=2)
    expected = model.encode(TEXTS)
    model.save_pretrained(str(tmp_path / "m"))
    assert os.path.isfile(tmp_path / "m" / "base" / "model.safetensors")
    loaded = GIRCSE.from_pretrained(str(tmp_path / "m"))
    np.testing.assert_allclose(loaded.encode(TEXTS), expected, atol=1e-5)
    # A peft model with no base reference cannot be saved meaningfully.
    tuned = GIRCSE(_lora(tiny_causal_lm("llama")), model.tokenizer)
    with pytest.raises(ValueError, match="base reference"):
        tuned.save_pretrained(str(tmp_path / "n"))


def test_explain_top_tokens_match_full_softmax(make_tiny):
    model = make_tiny("mistral")
    steps = model.explain("the cat sat on the mat", k=3, top=5)
    assert len(steps) == 3 and all(len(s) == 5 for s in steps)
    # Oracle: full softmax over the vocabulary for the state that produced each soft token.
    from gircse.generation import generate_soft_tokens

    batch = model.tokenize(["the cat sat on the mat"])
    with torch.no_grad():
        generated, prefill = generate_soft_tokens(model.model, None, **batch, k=3, return_prefill_state=True)
        queries = torch.cat([prefill[:, None], generated[:, :-1]], 1)[0]
        probs = torch.softmax(model.model.lm_head(queries), -1)
    top_p, top_i = probs.topk(5, dim=-1)
    for j, step in enumerate(steps):
        assert [tok for tok, _ in step] == [model.tokenizer.decode([int(i)]) for i in top_i[j]]
        np.testing.assert_allclose([p for _, p in step], top_p[j].numpy(), rtol=1e-4)
        assert all(a >= b for (_, a), (_, b) in zip(step, step[1:]))
    assert len(make_tiny("mistral", k=2).explain("the cat", top=1)) == 2  # default: the model's own K
    with pytest.raises(ValueError, match="generates none"):
        make_tiny("llama", method="causal-eos").explain("x")


def test_input_errors(make_tiny):
    model = make_tiny("llama")
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        model.encode(["ok", ""])
    with pytest.raises(ValueError, match="empty"):
        model.encode(["   "])
    with pytest.raises(TypeError, match=r"texts\[0\] must be a str"):
        model.encode([3])
    with pytest.raises(TypeError, match="list of str"):
        model.encode(None)
    for bad_k in (0, -1):
        with pytest.raises(ValueError, match="k"):
            model.encode(["ok"], k=bad_k)
    with pytest.raises(TypeError, match="k"):
        model.encode(["ok"], k=1.5)
    with pytest.raises(ValueError, match="method"):
        make_tiny("llama", method="mean")
    with pytest.raises(ValueError, match="batch_size"):
        model.encode(["ok"], batch_size=0)
    with pytest.raises(TypeError, match="instruction"):
        model.encode(["ok"], instruction=5)


def test_inputs_that_would_embed_something_else_are_refused(make_tiny):
    """Each of these used to embed without a word: an empty instruction ("Instruct: \\nQuery: rain", as
    the server refuses it), a set (no order: row i matches no particular text), a truthy non-bool flag
    ("no" normalized), a lone surrogate (a TypeError deep inside the tokenizer)."""
    model = make_tiny("llama", k=2)
    for empty in ("", "   ", "\n"):
        with pytest.raises(ValueError, match="instruction is empty .* pass None for no instruction"):
            model.encode("rain", empty)
    with pytest.raises(ValueError, match=r"instruction\[1\] is empty"):
        model.encode(["rain", "snow"], ["Find it", " "])
    with pytest.raises(TypeError, match="ordered sequence .* got a set"):
        model.encode({"rain", "snow"})
    with pytest.raises(TypeError, match="ordered sequence .* got a frozenset"):
        model.encode(frozenset({"rain"}))
    with pytest.raises(TypeError, match="ordered sequence .* got a dict"):
        model.encode({"rain": 1})
    for flag in ("normalize_embeddings", "convert_to_numpy", "convert_to_tensor", "return_all_steps",
                 "show_progress_bar"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got str 'no'"):
            model.encode(["rain"], **{flag: "no"})
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode: a lone surrogate '\\ud800' at character 3"):
        model.encode(["rain", "caf\ud800e"])
    with pytest.raises(ValueError, match=r"instruction is not valid Unicode"):
        model.encode(["rain"], "Find \udcff")
    with pytest.raises(ValueError, match=r"texts\[0\] is not valid Unicode"):
        model.explain("caf\ud800e")
    np.testing.assert_array_equal(model.encode(("rain", "snow")), model.encode(["rain", "snow"]))  # ordered: fine


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_an_error_not_a_vector(make_tiny, bad):
    """A broken model (here a NaN / inf final-norm weight) gives no embeddings at all: a ValueError naming
    the first text, not NaN rows that a metric would score or a server would write as bare NaN."""
    model = make_tiny("llama", k=2)
    with torch.no_grad():
        model.model.model.norm.weight[3] = bad
    for kwargs in ({}, {"normalize_embeddings": False}, {"return_all_steps": True}, {"batch_size": 1}):
        with pytest.raises(ValueError, match=r"non-finite \(NaN or infinite\) embedding for "
                                             r".*\(the first: texts\[\d\]\)"):
            model.encode(TEXTS, **kwargs)


@pytest.mark.parametrize("prompt_style", ["gircse", "reference"])
@pytest.mark.parametrize("method", ["gircse", "causal-eos", "bidirectional-avg"])
def test_count_tokens_is_what_the_model_reads(make_tiny, method, prompt_style):
    """The server's usage numbers: per text, the real (unpadded) positions ``tokenize`` gives the model,
    with this style's special tokens, the EOS methods' EOS and truncation to max_length."""
    model = make_tiny("llama", method=method, max_length=16, prompt_style=prompt_style)
    texts = ["rain", "the cat sat on the mat", " ".join(["market"] * 40)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the long text's truncation warning
        for instruction in (None, "Retrieve it"):
            mask = model.tokenize(texts, instruction)["attention_mask"]
            assert model.count_tokens(texts, instruction) == mask.sum(dim=1).tolist()
    assert model.count_tokens(texts)[2] == 16
    with pytest.raises(ValueError, match="instruction alone"):
        model.count_tokens(["rain"], "a very long instruction " * 10)


@pytest.mark.parametrize("method", ["gircse", "causal-eos"])
def test_truncation_keeps_instruction(make_tiny, method):
    model = make_tiny("llama", method=method, max_length=16)
    instruction = "Retrieve documents about finance"
    long_text = " ".join(["market"] * 100)
    prefix_ids = model.tokenizer("Instruct: " + instruction + "\nQuery:")["input_ids"]
    with pytest.warns(UserWarning, match="exceed max_length=16 tokens"):
        ids = model.tokenize([long_text], instruction)["input_ids"][0].tolist()
    assert len(ids) == 16
    assert ids[:len(prefix_ids)] == prefix_ids
    text_part = ids[len(prefix_ids):-1] if method == "causal-eos" else ids[len(prefix_ids):]
    assert model.tokenizer.decode(text_part).split() == ["market"] * len(text_part)
    if method == "causal-eos":
        assert ids[-1] == model.tokenizer.eos_token_id
    # Short inputs are untouched; a too-long instruction is a clear error.
    assert model.tokenize(["rain"], instruction)["attention_mask"].sum() < 16
    with pytest.raises(ValueError, match="instruction alone"):
        model.tokenize(["rain"], "a very long instruction " * 10)
    model.encode([long_text, "short"], instruction)  # runs within max_length


def test_encode_shapes_order_and_types(make_tiny, capsys):
    model = make_tiny("qwen2", k=2)
    many = model.encode(TEXTS)
    assert many.shape == (3, 32) and many.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(many, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(model.encode(TEXTS[::-1])[::-1], many, atol=2e-5)
    single = model.encode(TEXTS[0])
    assert single.shape == (32,)
    np.testing.assert_allclose(single, many[0], atol=2e-5)
    assert model.encode([]).shape == (0, 32)
    tensor = model.encode(TEXTS, convert_to_numpy=False, batch_size=1, show_progress_bar=True)
    assert isinstance(tensor, torch.Tensor) and not tensor.requires_grad
    assert "encode" in capsys.readouterr().err
    np.testing.assert_allclose(model.encode_queries(TEXTS, "Find"), model.encode(TEXTS, "Find"), atol=1e-6)
    np.testing.assert_allclose(model.encode_documents(TEXTS), many, atol=1e-6)
    assert model.encode(["x"], return_all_steps=True, k=3).shape == (1, 3, 32)
    assert make_tiny("llama", method="bidirectional-avg").encode(["x"], return_all_steps=True).shape == (1, 1, 32)


class ReferenceSoftTokens(torch.nn.Module):
    """The op's spec (``gircse_kernels.reference``, plain autograd) bound to a causal LM's weights."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, hidden):
        from gircse_kernels import reference

        head = self.lm.get_output_embeddings()
        return reference.soft_token_embedding(hidden, head.weight, self.lm.get_input_embeddings().weight,
                                              getattr(head, "bias", None))


def oracle_gradients(model, batch, k, weights):
    """Parameter gradients of ``sum(weights * z_1..z_k)`` through uncached Algorithm 1 with the op's
    reference: the oracle for forward()'s gradients."""
    from gircse.generation import base_causal_lm, generate_soft_tokens_uncached, pool_steps

    model.zero_grad(set_to_none=True)
    ste = ReferenceSoftTokens(base_causal_lm(model.model))
    emb = pool_steps(generate_soft_tokens_uncached(model.model, ste, **batch, k=k), return_all_steps=True)
    (emb * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_gradients_equal(grads, expected, rtol=3e-4):
    """Relative to each tensor's gradient scale. fp32 round-off: the fused op's backward (fp32
    accumulators over V = 49152) differs from the materializing reference by up to ~1.1e-4 here, the
    cached path from the uncached one by ~5e-6."""
    assert grads.keys() == expected.keys() and grads
    for name, g in grads.items():
        scale = expected[name].abs().max().item()
        assert scale > 0, name  # every parameter that should get a gradient gets a non-zero one
        assert (g - expected[name]).abs().max().item() <= rtol * scale + 1e-7, name


def test_forward_gradients_equal_the_reference(make_tiny):
    """forward()'s gradients (fused op, KV cache) equal those of uncached Algorithm 1 with the op's
    reference, for every parameter, including the LM head (reached only through the op)."""
    model = make_tiny("qwen2", k=3)  # untied: W and E get separate gradients
    model.train()
    batch = model.tokenize(TEXTS)
    weights = torch.randn(3, 3, 32, generator=torch.Generator().manual_seed(0))
    emb = model(**batch, return_all_steps=True)
    assert emb.shape == (3, 3, 32) and emb.requires_grad
    (emb * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.model.named_parameters() if p.grad is not None}
    assert "lm_head.weight" in grads and "model.embed_tokens.weight" in grads
    assert_gradients_equal(grads, oracle_gradients(model, batch, 3, weights))


def test_load_default_with_and_without_shipped_adapter(monkeypatch, tmp_path, make_tiny):
    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append(name)
        return "loaded"

    monkeypatch.setattr(GIRCSE, "from_pretrained", staticmethod(fake_from_pretrained))
    monkeypatch.setattr(loading, "DEFAULT_ADAPTER_DIR", str(tmp_path / "missing"))
    with pytest.warns(UserWarning, match="untrained"):
        assert gircse.load_default() == "loaded"
    assert calls == ["smollm2-135m"]
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / loading.CONFIG_FILE).write_text("{}")
    monkeypatch.setattr(loading, "DEFAULT_ADAPTER_DIR", str(shipped))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        gircse.load_default()
    assert calls[-1] == str(shipped)


def test_smollm2_alias_resolves_to_packaged_gguf():
    path, gguf = loading.resolve_model_source("SmolLM2-135M")
    assert os.path.isfile(os.path.join(path, gguf)) and gguf.endswith(".gguf")
    assert loading.resolve_model_source("some/dir") == ("some/dir", None)


def test_per_text_instructions(make_tiny):
    """Training rows carry their own instruction: a list gives one (or None) per text."""
    model = make_tiny("llama", k=2)
    mixed = model.encode(TEXTS, ["Find news", None, "Find weather"])
    np.testing.assert_allclose(mixed[0], model.encode([TEXTS[0]], "Find news")[0], atol=2e-5)
    np.testing.assert_allclose(mixed[1], model.encode([TEXTS[1]])[0], atol=2e-5)
    np.testing.assert_allclose(mixed[2], model.encode([TEXTS[2]], "Find weather")[0], atol=2e-5)
    with pytest.raises(ValueError, match="2 instructions for 3 texts"):
        model.encode(TEXTS, ["a", "b"])


def test_no_full_vocabulary_logits(make_tiny):
    """encode / forward / explain never call the LM head: soft tokens go through the fused op and
    explain streams the vocabulary in chunks, so no [B, V] tensor is built."""
    model = make_tiny("qwen2", k=2)

    def forbidden(*args, **kwargs):
        raise AssertionError("the LM head must not be called")

    model.model.lm_head.forward = forbidden
    model.encode(TEXTS)
    model.explain(TEXTS[0], k=2, top=3)


def test_lora_parameters_receive_gradients_through_generation(make_tiny):
    model = make_tiny("llama", k=3)
    model.model = _lora(model.model)
    model.train()
    batch = model.tokenize(TEXTS[:2], "Find it")
    weights = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    (model(**batch, return_all_steps=True) * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.model.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in grads) and any("lora_A" in n for n in grads)
    assert_gradients_equal(grads, oracle_gradients(model, batch, 3, weights))


@pytest.mark.parametrize("method", ["gircse", "causal-eos", "bidirectional-avg"])
def test_bfloat16_model_encodes(make_tiny, method):
    model = make_tiny("llama", method=method, k=2)
    reference = model.encode(TEXTS)
    model.model.to(torch.bfloat16)
    low = model.encode(TEXTS)
    assert low.dtype == np.float32
    assert (low * reference).sum(axis=1).min() > 0.95  # cosine with the fp32 embedding


def test_top_soft_token_probs_follow_the_ops_order_temperature_then_softcap():
    """Against the op's reference: with E the identity, ``reference.soft_token_embedding`` returns the
    probabilities themselves (temperature first, then the softcap, as the op computes them)."""
    from gircse.model import top_soft_token_probs
    from gircse_kernels import SoftTokenEmbedding, reference

    gen = torch.Generator().manual_seed(0)
    vocab, d = 300, 16
    weight, bias = torch.randn(vocab, d, generator=gen), torch.randn(vocab, generator=gen)
    hidden = torch.randn(4, d, generator=gen) * 0.4  # logits ~ N(0, 2.6): the softcap bends, never saturates
    for temperature, softcap in ((0.5, 4.0), (3.0, 0.5), (1.0, None), (0.25, None)):
        ste = SoftTokenEmbedding(weight, torch.eye(vocab), bias, temperature=temperature, softcap=softcap)
        probs, ids = top_soft_token_probs(hidden, ste, top=7, chunk=64)  # several chunks
        full = reference.soft_token_embedding(hidden, weight, torch.eye(vocab), bias,
                                              temperature=temperature, softcap=softcap)
        expected_p, expected_ids = full.topk(7, dim=1)
        assert torch.equal(ids, expected_ids), (temperature, softcap)
        torch.testing.assert_close(probs, expected_p, rtol=1e-5, atol=1e-7)


def test_forward_handles_right_padding(make_tiny):
    """The tokenizers' default pads on the right: forward gives what left padding gives."""
    for method in ("gircse", "causal-eos", "bidirectional-avg"):
        model = make_tiny("llama", method=method, k=2)
        left = model.tokenize(TEXTS)
        lengths = left["attention_mask"].sum(1)
        right_ids = torch.full_like(left["input_ids"], 7)
        right_mask = torch.zeros_like(left["attention_mask"])
        for row, n in enumerate(lengths.tolist()):
            right_ids[row, :n] = left["input_ids"][row, -n:]
            right_mask[row, :n] = 1
        assert right_mask[:, -1].min() == 0
        with torch.no_grad():
            expected = model(**left)
            got = model(input_ids=right_ids, attention_mask=right_mask)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5, msg=method)
    with pytest.raises(ValueError, match="row 1 has no real token"):
        model(input_ids=right_ids, attention_mask=torch.tensor([[1] * right_ids.shape[1], [0] * right_ids.shape[1],
                                                                [1] * right_ids.shape[1]]))
    # The tokenizer's own padding (right by default) too.
    model = make_tiny("qwen2", k=2)
    enc = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert model.tokenizer.padding_side == "right" and enc["attention_mask"][:, -1].min() == 0
    with torch.no_grad():
        torch.testing.assert_close(model(enc["input_ids"], enc["attention_mask"]),
                                   model(**model.tokenize(TEXTS)), atol=2e-5, rtol=1e-5)


def test_generation_functions_refuse_right_padding(make_tiny):
    from gircse.baselines import causal_eos_state
    from gircse.generation import generate_soft_tokens

    model = make_tiny("llama", k=2)
    ids, mask = torch.tensor([[5, 6, 7], [5, 6, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="left padded"):
        generate_soft_tokens(model.model, None, ids, mask, 2)
    with pytest.raises(ValueError, match="left padded"):
        causal_eos_state(model.model, ids, mask)


def test_k_beyond_the_position_range_fails_early(make_tiny):
    model = make_tiny("llama", k=2)  # max_position_embeddings = 512
    for call in (lambda: model.encode(TEXTS, k=512), lambda: model.encode(TEXTS, k=10**9),
                 lambda: model.explain(TEXTS[0], k=600), lambda: make_tiny("llama", k=1000)):
        with pytest.raises(ValueError, match="512 positions"):
            call()
    model.model.config.max_position_embeddings = 24  # a short range keeps the "exactly fits" run cheap
    batch = model.tokenize(TEXTS)
    length = int(batch["attention_mask"].sum(1).max())
    with pytest.raises(ValueError, match=f"{length} input tokens \\+ k={25 - length} soft tokens exceed"):
        model(**batch, k=25 - length)
    with torch.no_grad():
        assert model(**batch, k=24 - length).shape == (3, 32)  # exactly fits
    eos = make_tiny("llama", method="causal-eos", max_length=30)
    eos.model.config.max_position_embeddings = 24
    with pytest.raises(ValueError, match="30 input tokens exceed the model's 24 positions"):
        eos.encode([" ".join(["word"] * 40)])


def test_truncation_warns_once_per_model(make_tiny):
    model = make_tiny("llama", k=2, max_length=8)
    long_text = " ".join(["market"] * 50)
    with pytest.warns(UserWarning, match="1 of 2 inputs exceed max_length=8 tokens") as record:
        model.encode([TEXTS[2], long_text])
        model.encode([long_text])
    assert len([w for w in record if "max_length" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_tiny("llama", k=2).encode(TEXTS)  # nothing truncated: no warning


def test_numpy_scalars_are_accepted(make_tiny):
    model = make_tiny("llama", k=np.int64(2), max_length=np.int32(64))
    assert type(model.k) is int and type(model.max_length) is int
    expected = model.encode(TEXTS, k=3, batch_size=2)
    np.testing.assert_array_equal(model.encode(TEXTS, k=np.int64(3), batch_size=np.int16(2)), expected)
    steps = model.explain(TEXTS[0], k=np.uint8(2), top=np.int64(3))
    assert steps == model.explain(TEXTS[0], k=2, top=3)
    for bad in (True, 2.0, "2", None):
        with pytest.raises(TypeError, match="k"):
            model.encode(TEXTS, k=bad) if bad is not None else model._check_k(bad)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["gircse", "causal-eos", "bidirectional-avg"])
def test_bf16_guarantees(make_tiny, family, method):
    """What encode guarantees per dtype (see GIRCSE.encode). fp32: a text embeds the same alone or in
    any batch, to round-off (test_model_generation.test_batch_invariance). bf16: the batch changes the
    result (different GEMM shapes and padded lengths round differently at every layer, and the K steps
    feed it back), here by cosine >= 0.99; the same call repeats bit for bit, and with batch_size=1 a
    text's embedding does not depend on the other texts."""
    model = make_tiny(family, method=method, k=4)
    model.model.to(torch.bfloat16)
    texts = TEXTS + ["a considerably longer sentence about the weather in the mountains, with many words"]
    together = model.encode(texts, "Find it", batch_size=4)
    np.testing.assert_array_equal(model.encode(texts, "Find it", batch_size=4), together)
    one_by_one = model.encode(texts, "Find it", batch_size=1)
    for i, text in enumerate(texts):
        alone = model.encode([text], "Find it")[0]
        np.testing.assert_array_equal(one_by_one[i], alone)
        assert float(alone @ together[i]) >= 0.99, (i, float(alone @ together[i]))

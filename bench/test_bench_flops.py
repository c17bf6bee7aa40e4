"""FLOPs: the paper's Table 6 from ``gircse.flops``, cross-checked on SmolLM2 with FlopCounterMode.

No timing here: the analytic counts, their agreement with the paper's published Mistral-7B figures,
and their agreement with ``torch.utils.flop_counter.FlopCounterMode`` counting the matrix products the
package really runs on SmolLM2 (eager attention so the attention matmuls are visible, the soft-token
op on the chunked PyTorch backend so its matmuls are visible; the C++ and Triton backends are opaque
to the counter but compute the same products).
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.flop_counter import FlopCounterMode

from gircse import flops

MODELS = ("mistral-7b", "qwen2-7b", "qwen2.5-0.5b", "smollm2-135m")
LABEL = {"causal-eos": "Causal-EOS / Bidirectional-Avg", True: "GIRCSE, KV cache", False: "GIRCSE, no cache"}


def _paper_value(row) -> float | None:
    if row["n"] != 512:
        return flops.PAPER_TABLE6_CAUSAL_EOS.get(row["n"]) if row["method"] == "causal-eos" else None
    if row["method"] == "causal-eos":
        return flops.PAPER_TABLE6_MISTRAL_N512[("causal-eos", None)]
    kind = "gircse-cache" if row["cache"] else "gircse-nocache"
    return flops.PAPER_TABLE6_MISTRAL_N512[(kind, row["k"])]


def test_table6(report):
    mistral = flops.PRESETS["mistral-7b"]
    c = 2 * (mistral.decoder_linear_params + mistral.lm_head_params)
    section = report.section("flops", "FLOPs and memory per sequence (the paper's Table 6)", (
        "`gircse.flops` for any transformers config. **Paper convention**: every token position costs "
        "c = 2 x (decoder linear + LM-head parameters), no attention term, the LM head at every position; "
        "Causal-EOS c N, GIRCSE with cache c (N + K), without cache c [(K + 1) N + K (K + 1) / 2]; "
        "`+ mixture` adds the soft-token mixture 2 V d_e per step. **Executed**: the matrix products this "
        "package runs (decoder linears, dense attention QK^T and AV, no LM head for the baselines, "
        "2 V (d + d_e) per soft-token step), what FlopCounterMode measures (cross-check below). "
        f"Mistral-7B: c = {c:.4e} against the paper's 1.431e10 (7.33 T / 512): our figures are "
        f"{(c / (7.33e12 / 512) - 1) * 100:+.2f}% from the paper's. Biases (none in Mistral), norms, rotary "
        "and SiLU add about 0.03% (O(d) per position); the remaining ~0.6% (about 43M parameters' worth, or "
        "86 MFLOP per position) is not explained by any term linear in N that we know of, and is inside the "
        "2% target. KV cache: bytes per sequence in bf16 at the end of encoding (N + K positions for GIRCSE, "
        "whether cached or recomputed; N for the baselines); weights in bf16."))
    table = section.table("table6", "TFLOPs per sequence", [
        ("model", "model"), ("n", "N", "int"), ("method", "method"), ("k", "K"),
        ("paper", "paper (TFLOPs)", "ratio"), ("ours", "ours, paper convention", "tera"),
        ("diff", "vs paper", "pct"), ("mixture", "+ mixture", "tera"), ("executed", "executed", "tera"),
        ("ratio", "ratio to Causal-EOS (paper conv.)", "ratio"),
        ("ratio_executed", "ratio (executed)", "ratio"), ("kv_mib", "KV cache MiB (bf16)", "mib"),
        ("weights_gib", "weights GiB (bf16)", "ratio")])
    for model in MODELS:
        shape = flops.PRESETS[model]
        for row in flops.paper_table6(model):
            cache = row["cache"]
            method, k = row["method"], row["k"] or 1
            kw = dict(cache=bool(cache)) if method == "gircse" else {}
            base = flops.encode_flops(model, "causal-eos", row["n"])
            base_exec = flops.encode_flops(model, "causal-eos", row["n"], convention="executed")
            executed = flops.encode_flops(model, method, row["n"], k, convention="executed", **kw)
            paper = _paper_value(row) if model == "mistral-7b" else None
            memory = flops.encode_memory(model, method, row["n"], k, **kw)
            table.add(model=model, n=row["n"], method=LABEL["causal-eos" if method != "gircse" else cache],
                      k=row["k"], paper=paper, ours=row["tflops"] * 1e12,
                      diff=None if paper is None else row["tflops"] / paper - 1,
                      mixture=flops.encode_flops(model, method, row["n"], k, mixture=True, **kw),
                      executed=executed, ratio=row["tflops"] * 1e12 / base, ratio_executed=executed / base_exec,
                      kv_mib=memory["kv_cache"] / 2**20, weights_gib=shape.weight_bytes(2) / 2**30)
            if paper is not None:
                report.record_check("flops", f"Table 6 {model} N={row['n']} {table.rows[-1]['method']} K={row['k']}",
                                    abs(row["tflops"] / paper - 1), 0.02)


@contextlib.contextmanager
def _eager_attention(model):
    config = model.config
    old = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = old


def test_flop_counter_agreement(smollm2, report, size):
    """The executed convention against FlopCounterMode on the real SmolLM2 (real text, no padding)."""
    from gircse.baselines import bidirectional_mean, causal_eos_state
    from gircse.generation import (base_causal_lm, generate_soft_tokens, generate_soft_tokens_uncached,
                                   soft_token_embedding_of)

    model = base_causal_lm(smollm2.model)
    shape = flops.DecoderShape.from_config(model.config)
    assert shape == flops.PRESETS["smollm2-135m"], shape
    batch, n, k = (2, 8, 2) if size == "quick" else (2, 64, 5)
    ids = torch.randint(100, shape.vocab_size, (batch, n), generator=torch.Generator().manual_seed(0))
    ids = ids.to(smollm2.device)
    mask = torch.ones_like(ids)
    op = soft_token_embedding_of(model, backend="torch")
    runs = {("causal-eos", True): lambda: causal_eos_state(model, ids, mask),
            ("bidirectional-avg", True): lambda: bidirectional_mean(model, ids, mask),
            ("gircse", True): lambda: generate_soft_tokens(model, op, ids, mask, k),
            ("gircse", False): lambda: generate_soft_tokens_uncached(model, op, ids, mask, k)}
    section = report.section("flops", "FLOPs and memory per sequence (the paper's Table 6)")
    table = section.table("counter", f"FlopCounterMode on SmolLM2-135M (B = {batch}, N = {n}, K = {k})", [
        ("method", "method"), ("counted", "FlopCounterMode GFLOPs", "giga"),
        ("analytic", "gircse.flops executed GFLOPs", "giga"), ("agreement", "analytic / counted", "ratio"),
        ("paper", "paper convention GFLOPs", "giga")],
        note="Eager attention and the chunked PyTorch op (both visible to the counter); no grad.")
    with _eager_attention(model), torch.no_grad():
        for (method, cache), run in runs.items():
            counter = FlopCounterMode(display=False)
            with counter:
                run()
            counted = counter.get_total_flops()
            kw = dict(cache=cache) if method == "gircse" else {}
            analytic = flops.encode_flops(shape, method, n, k, convention="executed", batch=batch, **kw)
            label = LABEL[cache] if method == "gircse" else method
            table.add(method=label, counted=counted, analytic=analytic, agreement=analytic / counted,
                      paper=flops.encode_flops(shape, method, n, k, batch=batch, **kw))
            report.record_check("flops", f"FlopCounterMode SmolLM2 {label}", abs(analytic / counted - 1), 1e-9)
            assert analytic == counted, (label, analytic, counted)

"""Model level on SmolLM2-135M: encode throughput of GIRCSE and the baselines, and a decode-step profile.

``model`` section: one batch of B texts of exactly N real tokens (Debian package descriptions from the
shipped dev set, cut into N-token pieces, so there is no padding and the FLOPs are known exactly),
through ``GIRCSE.forward`` in inference mode (what ``encode`` runs per batch): GIRCSE with the KV
cache for each K, the uncached K + 1-forward oracle, Causal-EOS (N tokens + EOS) and
Bidirectional-Avg. Each row's time ratio to Causal-EOS stands next to the ratio ``gircse.flops``
predicts (executed convention), so the distance to ideal is visible; ``gap`` = measured / predicted.

``profile`` section: where a decode step's time goes (torch.profiler, self CPU time per op class),
for the inference path's static KV cache and for the ``torch.cat`` cache the inference path used
before (the one training still uses), side by side.

Correctness first: the cached GIRCSE embeddings of the batch against the uncached oracle, and the
static-cache path against the ``torch.cat`` path.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os

import pytest
import torch

from bench.checks import MODEL_REL_TOL, check_close
from bench.harness import measure_machine, time_methods
from gircse import flops
from torch.profiler import record_function

from gircse.generation import (base_causal_lm, generate_soft_tokens, generate_soft_tokens_uncached, pool_steps,
                               soft_token_embedding_of)

SETTINGS = {  # batch, lengths, K (cached), K (uncached, per length), repetitions, profile (B, N, K, runs)
    "quick": dict(batch=2, lengths=(16,), ks=(1, 3), uncached={16: (1, 3)}, reps=1, profile=(2, 16, 3, 1)),
    "default": dict(batch=8, lengths=(32, 128), ks=(1, 5, 20), uncached={32: (1, 5), 128: (1, 5)}, reps=2,
                    profile=(8, 128, 5, 1)),
    "full": dict(batch=32, lengths=(32, 128, 512), ks=(1, 3, 5, 10, 20),
                 uncached={32: (1, 3, 5, 10, 20), 128: (1, 3, 5, 10, 20), 512: (1, 3, 5)}, reps=3,
                 profile=(32, 512, 10, 2)),
}
DEV_SET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gircse", "data", "debian",
                       "dev_retrieval.jsonl.gz")


def real_token_batch(tokenizer, batch: int, length: int, device) -> torch.Tensor:
    """``[batch, length]`` token ids: package descriptions, concatenated and cut into equal pieces."""
    stream: list[int] = []
    with gzip.open(DEV_SET, "rt", encoding="utf-8") as f:
        for line in f:
            stream += tokenizer(json.loads(line)["pos"][0], add_special_tokens=False)["input_ids"]
            if len(stream) >= batch * length:
                break
    if len(stream) < batch * length:
        raise RuntimeError(f"{DEV_SET} has fewer than {batch * length} tokens")
    return torch.tensor(stream[:batch * length], device=device).view(batch, length)


def encoder(model, method: str, ids: torch.Tensor, k: int = 1, cache: bool = True):
    """A zero-argument callable embedding the batch ``ids`` the way ``encode`` does (no grad)."""
    mask = torch.ones_like(ids)
    if method == "causal-eos":
        eos = torch.full_like(ids[:, :1], model.tokenizer.eos_token_id)
        ids = torch.cat([ids, eos], dim=1)
        mask = torch.ones_like(ids)
    saved_method = model.method

    def run():
        with torch.inference_mode():
            if method == "gircse" and not cache:
                return pool_steps(generate_soft_tokens_uncached(model.model, None, ids, mask, k))
            model.method = method
            try:
                return model(ids, mask, k=k)
            finally:
                model.method = saved_method
    return run


def roofline_seconds(shape, method: str, n: int, k: int, cache: bool, batch: int, flop_rate: float,
                     bandwidth: float, dtype_bytes: int) -> float:
    """Lower bound on the time from this machine's measured rates: every call takes at least its FLOPs
    at ``flop_rate`` (what Causal-EOS's prefill reached) and, for the one-position decode steps, the
    bytes it must move (``gircse.flops.decode_step_bytes``: all the weights, the KV cache) at
    ``bandwidth`` (a copy's). At small batch the steps are bound by the weight reads, not the FLOPs."""
    if method != "gircse" or not cache:
        kw = dict(cache=cache) if method == "gircse" else {}
        return flops.encode_flops(shape, method, n, k, convention="executed", batch=batch, **kw) / flop_rate
    seconds = batch * flops.forward_flops(shape, n) / flop_rate
    for j in range(1, k + 1):
        step_flops = batch * (flops.forward_flops(shape, 1, n + j) + flops.soft_token_flops(shape))
        step_bytes = flops.decode_step_bytes(shape, batch, n + j - 1, dtype_bytes=dtype_bytes)
        seconds += max(step_flops / flop_rate, step_bytes / bandwidth)
    return seconds


def copy_bandwidth(nbytes: int, device) -> float:
    """Bytes/s of ``dst.copy_(src)`` over ``nbytes`` (read + write counted), best of 3."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = time_methods({"copy": lambda: dst.copy_(src)}, reps=3, device=device)["copy"].seconds
    return 2 * nbytes / seconds


@pytest.fixture(scope="module")
def settings(size):
    return SETTINGS[size]


def test_bench_encode(smollm2, report, settings):
    model, device = smollm2, smollm2.device
    shape = flops.DecoderShape.from_config(base_causal_lm(model.model).config)
    batch = settings["batch"]
    section = report.section("model", f"Model level: encode throughput on SmolLM2-135M (batch {batch})", (
        "One batch of real text (Debian package descriptions cut into pieces of exactly N tokens; no "
        "padding) through `GIRCSE.forward` in inference mode, as `encode` runs it; "
        f"dtype {next(model.parameters()).dtype}. `predicted` = the FLOPs ratio to Causal-EOS "
        "(`gircse.flops`, executed convention: what the package computes, attention included); `gap` = "
        "measured ratio / predicted ratio (1.00 = the time ratio the FLOPs promise). `predicted (roofline)`: "
        "each call at least its FLOPs at the rate Causal-EOS reached and, for the one-position decode steps, "
        "at least the bytes they must move (all weights and the KV cache, `gircse.flops.decode_step_bytes`) "
        "at copy bandwidth: at small batch a step is bound by reading the weights, not by its FLOPs. "
        "Time: best of the "
        "round-robin repetitions after a first, memory-measuring call; peak extra memory: that call's peak "
        "RSS (CPU) or allocated memory (CUDA) above what was held before."))
    table = section.table("encode", "Encode throughput", [
        ("n", "N", "int"), ("method", "method"), ("k", "K"), ("seconds", "s / batch", "s"),
        ("texts_per_s", "texts/s", "rate"), ("tokens_per_s", "input tokens/s", "rate"),
        ("ratio", "time / Causal-EOS", "ratio"), ("predicted", "predicted (FLOPs)", "ratio"),
        ("gap", "gap", "ratio"), ("roofline", "predicted (roofline)", "ratio"),
        ("roofline_gap", "gap to roofline", "ratio"), ("gflops", "GFLOPs / batch", "giga"),
        ("peak_mib", "peak MiB", "mib"),
        ("cpu_busy", "cpu busy", "ratio")])
    dtype_bytes = next(model.parameters()).element_size()
    bandwidth = copy_bandwidth(shape.weight_bytes(dtype_bytes), device)
    section.text += (f" Roofline: this run's copy bandwidth {bandwidth / 1e9:.1f} GB/s (a copy of the "
                     "weights' size) and the FLOP rate Causal-EOS reached at each N.")
    for n in settings["lengths"]:
        ids = real_token_batch(model.tokenizer, batch, n, device)
        runs = {("causal-eos", None, True): encoder(model, "causal-eos", ids),
                ("bidirectional-avg", None, True): encoder(model, "bidirectional-avg", ids)}
        runs.update({("gircse", k, True): encoder(model, "gircse", ids, k) for k in settings["ks"]})
        runs.update({("gircse", k, False): encoder(model, "gircse", ids, k, cache=False)
                     for k in settings["uncached"][n]})
        # Correctness first: the cached path against the uncached oracle at the largest shared K.
        k_check = max(set(settings["ks"]) & set(settings["uncached"][n]))
        cached, uncached = runs[("gircse", k_check, True)](), runs[("gircse", k_check, False)]()
        check_close(report, "model", f"SmolLM2 N={n} GIRCSE K={k_check} cached vs uncached", cached, uncached,
                    rel_tol=MODEL_REL_TOL[cached.dtype])
        timed = time_methods(runs, reps=settings["reps"], warmup=False, device=device)
        eos_time = timed[("causal-eos", None, True)].seconds
        eos_flops = flops.encode_flops(shape, "causal-eos", n + 1, convention="executed", batch=batch)
        flop_rate = eos_flops / eos_time
        for (method, k, cache), m in timed.items():
            length = n + (method == "causal-eos")
            kw = dict(cache=cache) if method == "gircse" else {}
            predicted = flops.encode_flops(shape, method, length, k or 1, convention="executed", batch=batch, **kw)
            label = {"causal-eos": "Causal-EOS", "bidirectional-avg": "Bidirectional-Avg"}.get(
                method, "GIRCSE, KV cache" if cache else "GIRCSE, no cache")
            ratio, ideal = m.seconds / eos_time, predicted / eos_flops
            roofline = roofline_seconds(shape, method, length, k or 1, cache, batch, flop_rate, bandwidth,
                                        dtype_bytes) / eos_time
            table.add(n=n, method=label, k=k, seconds=m.seconds, texts_per_s=batch / m.seconds,
                      tokens_per_s=batch * n / m.seconds, ratio=ratio, predicted=ideal, gap=ratio / ideal,
                      roofline=roofline, roofline_gap=ratio / roofline, gflops=predicted, peak_mib=m.peak_mib,
                      cpu_busy=m.cpu_busy)


# ---------------------------------------------------------------------- encode cost: real documents
DOCUMENTS = {"quick": dict(n=8, ks=(2,), reps=1, per_batch=False),
             "default": dict(n=128, ks=(5, 20), reps=2, per_batch=False),
             "full": dict(n=128, ks=(1, 5, 10, 20), reps=3, per_batch=True)}


def dev_documents(n: int) -> list[str]:
    docs = []
    with gzip.open(DEV_SET, "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["pos"][0])
            if len(docs) == n:
                return docs
    raise RuntimeError(f"{DEV_SET} has fewer than {n} documents")


def test_bench_encode_documents(smollm2, report, size):
    """What a user pays: ``encode`` of real documents with every default (batch size, decode group, dtype,
    max_length 128 as the shipped model), GIRCSE against Causal-EOS on the same backbone, each also
    against the model-level roofline (``gircse.cost``) on this machine's measured GEMM rate and read
    bandwidth."""
    from gircse import cost
    from gircse.generation import base_causal_lm as causal_lm

    s = DOCUMENTS[size]
    model, device = smollm2, smollm2.device
    docs = dev_documents(s["n"])
    dtype = next(model.parameters()).dtype
    saved = model.method, model.k, model.max_length
    model.max_length = 128
    shape = flops.DecoderShape.from_config(causal_lm(model.model).config)
    machine = measure_machine(dtype, device)
    lengths = [len(ids) for ids in model._prompt_token_ids(docs, None)]  # GIRCSE's; Causal-EOS adds its EOS

    def encoding(method, k, **kw):
        def run():
            model.method = method
            return model.encode(docs, k=k, **kw)
        return run

    runs = {("causal-eos", None, "default"): encoding("causal-eos", 1)}
    for k in s["ks"]:
        runs[("gircse", k, "default")] = encoding("gircse", k)
        if s["per_batch"]:
            runs[("gircse", k, "steps per prefill batch")] = encoding("gircse", k, decode_batch_size=32)
    try:
        group = model._decode_group_rows(32, None, max(lengths), max(s["ks"]))
        # Correctness first: the decode groups against steps run per prefill batch (fp32: round-off).
        model.method = "gircse"
        grouped, per_batch = model.encode(docs, k=s["ks"][0]), model.encode(docs, k=s["ks"][0], decode_batch_size=32)
        check_close(report, "encode-cost", f"decode groups of {group} vs steps per prefill batch (K={s['ks'][0]})",
                    torch.from_numpy(grouped), torch.from_numpy(per_batch), rel_tol=MODEL_REL_TOL[dtype])
        timed = time_methods(runs, reps=s["reps"], warmup=False, device=device)
    finally:
        model.method, model.k, model.max_length = saved
    dtype_bytes = next(model.parameters()).element_size()
    eos_calls = cost.encode_calls(shape, "causal-eos", lengths, dtype_bytes=dtype_bytes, batch_size=32)
    eos_ideal = cost.ideal_seconds(eos_calls, machine)
    eos = timed[("causal-eos", None, "default")].seconds
    section = report.section("encode-cost", f"Model level: encode {s['n']} real documents (SmolLM2-135M, {dtype})", (
        f"`model.encode(docs, k=K)` with every default (batch size 32, max_length 128, the automatic decode "
        f"group: {group} texts per K-step batch), {s['n']} Debian package descriptions from the dev set "
        f"(mean {sum(lengths) / len(lengths):.0f} tokens). `ideal`: the model-level roofline (`gircse.cost`) "
        f"of the same calls on real tokens only, each call at max(FLOPs / GEMM rate, bytes / read bandwidth), "
        f"with this run's measured {machine.gemm_flops / 1e9:.0f} GFLOP/s ({str(dtype).replace('torch.', '')} "
        f"GEMM, {torch.get_num_threads() if device.type == 'cpu' else 'all'} threads) and "
        f"{machine.bandwidth / 1e9:.1f} GB/s (read). `steps per prefill batch`: the K steps on each batch of 32 "
        "(the behaviour before decode groups). Time: best of the round-robin repetitions."))
    table = section.table("encode-documents", "Encode real documents", [
        ("method", "method"), ("k", "K"), ("way", "K steps on"), ("seconds", "s", "s"),
        ("texts_per_s", "texts/s", "rate"), ("ratio", "time / Causal-EOS", "ratio"),
        ("ideal_ratio", "ideal / Causal-EOS ideal", "ratio"), ("ideal", "ideal s", "s"),
        ("vs_ideal", "time / ideal", "ratio"), ("peak_mib", "peak MiB", "mib")])
    for (method, k, way), m in timed.items():
        calls = eos_calls if method == "causal-eos" else cost.encode_calls(
            shape, "gircse", lengths, k, dtype_bytes=dtype_bytes, batch_size=32,
            decode_rows=group if way == "default" else 32)
        ideal = cost.ideal_seconds(calls, machine)
        table.add(method="Causal-EOS" if method == "causal-eos" else "GIRCSE", k=k,
                  way="-" if method == "causal-eos" else (f"{group} texts" if way == "default" else "32 texts"),
                  seconds=m.seconds, texts_per_s=len(docs) / m.seconds, ratio=m.seconds / eos,
                  ideal_ratio=ideal / eos_ideal, ideal=ideal, vs_ideal=m.seconds / ideal, peak_mib=m.peak_mib)


# ---------------------------------------------------------------------- decode-step profile
OP_RANGE = "bench.soft_token_op"
CATEGORIES = (  # (label, predicate on the op name); the first match wins
    ("soft-token op", lambda n: n == OP_RANGE),
    ("attention (SDPA)", lambda n: "scaled_dot_product" in n or "flash_attention" in n or n == "aten::bmm"),
    ("linear layers (GEMM)", lambda n: n in ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul")),
    ("copies: cat, copy_, casts (KV cache, masks)", lambda n: n in ("aten::cat", "aten::copy_", "aten::_to_copy",
                                                                   "aten::index_put_", "aten::clone")),
    ("elementwise: norms, rotary, SiLU, residual", lambda n: n.split("::")[-1].rstrip("_") in (
        "mul", "add", "pow", "mean", "rsqrt", "neg", "silu", "sum", "div", "sub", "exp", "cos", "sin",
        "where", "masked_fill", "logical_and", "logical_or", "bitwise_and", "eq", "ge", "le", "gt", "lt")),
)
OTHER, OVERHEAD = "other aten ops", "Python and dispatch (wall - ops)"


def profile_decode_steps(fn) -> list[dict[str, float]]:
    """Per decode step of ``fn()`` (a generation): {category: self CPU seconds, "step": wall seconds},
    from the ops under each ``gircse.decode_step`` profiler range that generation marks."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def walk(event, out):
        for child in event.cpu_children:
            if child.name == OP_RANGE:  # the whole op, whatever it runs inside
                out[CATEGORIES[0][0]] += child.cpu_time_total / 1e6
                continue
            if child.name.startswith(("aten::", "gircse::")):
                label = next((lab for lab, pred in CATEGORIES if pred(child.name)), OTHER)
                out[label] += child.self_cpu_time_total / 1e6
            walk(child, out)

    steps = []
    for event in prof.events():
        if event.name == "gircse.decode_step":
            out = {label: 0.0 for label, _ in CATEGORIES} | {OTHER: 0.0}
            walk(event, out)
            inside_ops = sum(out.values())
            out["step"] = event.cpu_time_total / 1e6
            out[OVERHEAD] = max(out["step"] - inside_ops, 0.0)
            steps.append(out)
    return steps


@contextlib.contextmanager
def _cat_cache(model):
    """The pre-static-cache inference path: grad mode on (so generation takes the torch.cat cache) with
    every parameter frozen (so nothing is recorded for backward)."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def test_profile_decode_step(smollm2, report, settings):
    model = smollm2
    batch, n, k, profiled_runs = settings["profile"]
    ids = real_token_batch(model.tokenizer, batch, n, model.device)
    mask = torch.ones_like(ids)
    if model.device.type != "cpu":
        pytest.skip("the profile reads CPU self times; on CUDA use the device trace (not implemented here)")

    op = soft_token_embedding_of(model.model)

    def op_in_range(state):
        with record_function(OP_RANGE):
            return op(state)

    def generation(steps, cat):
        def run():
            with (_cat_cache(model.model) if cat else torch.inference_mode()):
                return generate_soft_tokens(model.model, op_in_range, ids, mask, steps)
        return run

    with torch.inference_mode():
        static_out = generation(k, False)()
    with torch.no_grad():
        cat_out = generation(k, True)()
    check_close(report, "profile", f"static vs torch.cat KV cache (B={batch}, N={n}, K={k})", static_out, cat_out,
                rel_tol=0.0)
    per_step = {}
    for name, cat in (("static cache (inference path)", False), ("torch.cat cache (previous path)", True)):
        generation(k, cat)()  # warm
        runs = [profile_decode_steps(generation(k, cat)) for _ in range(profiled_runs)]
        # Per category, the median over the steps of the fastest run (by total step time).
        steps = min(runs, key=lambda r: sum(s["step"] for s in r))
        per_step[name] = {c: sorted(s[c] for s in steps)[len(steps) // 2] for c in steps[0]}
    section = report.section("profile", f"Where a decode step goes (SmolLM2-135M, B = {batch}, N = {n})", (
        f"torch.profiler self CPU time per op class inside each `gircse.decode_step` range of a K = {k} "
        f"generation (median over the steps of the fastest of {profiled_runs} profiled run(s)); `{OVERHEAD}` is "
        "the step's time not spent inside an op (Python, module calls, transformers' mask and cache "
        "bookkeeping, dispatch). The static KV cache (one buffer per layer, written in place) is what "
        "inference runs now; the `torch.cat` cache copies "
        "every layer's whole past at every step (training keeps it: it must preserve each step's keys for "
        "backward and gradient-checkpoint replays). Steps are profiled, so they run a little slower than "
        "in the throughput table."))
    columns = [("category", "per step")] + [(f"c{i}", name, "ms") for i, name in enumerate(per_step)]
    table = section.table("decode-step", "Decode step, ms", columns)
    for category in [lab for lab, _ in CATEGORIES] + [OTHER, OVERHEAD, "step"]:
        table.add(category="whole step (wall)" if category == "step" else category,
                  **{f"c{i}": step[category] for i, step in enumerate(per_step.values())})

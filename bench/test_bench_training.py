"""Training level on SmolLM2-135M: seconds per optimizer step and peak memory.

One optimizer step of ``gircse train`` (LoRA r=64 / alpha=32 on all linear layers, ICR loss for
GIRCSE, InfoNCE for Causal-EOS, AdamW, gradient clipping at 1.0) on the same rows for:

* GIRCSE with the cached differentiable generation (prefill once, K one-position steps through the
  KV cache, the graph kept through it) -- what ``gircse train`` runs;
* GIRCSE the reference implementation's way: K + 1 full forwards with grad (the uncached Algorithm 1,
  ``generate_soft_tokens_uncached``);
* Causal-EOS (one forward, the EOS state);

each directly and with GradCache (embed without a graph, loss on the embeddings, re-embed chunk by
chunk with the graph). Correctness first, in fp32 on a smaller batch: the cached generation's LoRA
gradients against the uncached one's, and GradCache's against the direct computation's.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gzip
import json
import os

import torch

import gircse.model as gircse_model
from bench.checks import check_close
from bench.harness import measure_machine, time_methods
from gircse import cost, flops
from gircse.cpu_bf16 import native_bf16
from gircse.generation import base_causal_lm, generate_soft_tokens_uncached
from gircse.training import TrainConfig
from gircse.training.trainer import (PREFILL_ROWS, _batch_texts, apply_lora, batch_gradients,
                                     frozen_linear_weights_in_bf16, trainable_parameters)

# bf16: autocast where the device has native bf16 GEMMs (CUDA; AVX512-BF16 / AMX CPUs), else fp32 (an AVX2-only
# CPU's bf16 matmul is emulated, ~50x slower than fp32: gircse.cpu_bf16).
SETTINGS = {  # rows per step, hard negatives per row, max_length, K, GradCache chunk, repetitions, bf16
    "quick": dict(rows=2, negatives=0, max_length=40, k=2, chunk=2, reps=1, bf16=False),
    "default": dict(rows=4, negatives=0, max_length=48, k=5, chunk=4, reps=1, bf16=True),
    "full": dict(rows=16, negatives=1, max_length=128, k=5, chunk=8, reps=2, bf16=True),
}
TRAIN_SET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gircse", "data", "debian",
                         "train.jsonl.gz")
WAYS = {  # name: (method, cached generation)
    "GIRCSE, cached generation": ("gircse", True),
    "GIRCSE, K+1 full passes (uncached)": ("gircse", False),
    "Causal-EOS": ("causal-eos", True),
}


def training_rows(n: int) -> list[dict]:
    rows = []
    with gzip.open(TRAIN_SET, "rt", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                return rows
    raise RuntimeError(f"{TRAIN_SET} has fewer than {n} rows")


@contextlib.contextmanager
def way(model, method: str, cached: bool):
    """Run ``model`` as ``method``; ``cached=False`` swaps the generation for the uncached oracle
    (same signature, K + 1 forwards with grad: the reference implementation's way)."""
    saved = model.method, gircse_model.generate_soft_tokens
    model.method = method
    if not cached:
        gircse_model.generate_soft_tokens = generate_soft_tokens_uncached
    try:
        yield
    finally:
        model.method, gircse_model.generate_soft_tokens = saved


def lora_copy(smollm2, config: TrainConfig):
    """A LoRA-wrapped copy of the session's SmolLM2 (the original stays adapter-free), with random
    LoRA B matrices so every adapter weight gets a gradient (B = 0 at init gives dA = 0)."""
    model = copy.deepcopy(smollm2)
    apply_lora(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainable_parameters(model).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model.train()


def flat_grads(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params.values()])


def gradients(model, rows, config, method, cached) -> tuple[torch.Tensor, torch.Tensor]:
    params = trainable_parameters(model)
    model.zero_grad(set_to_none=True)
    with way(model, method, cached):
        loss, _ = batch_gradients(model, rows, config)
    return loss, flat_grads(params)


def bf16_here(device: torch.device) -> bool:
    return device.type == "cuda" or native_bf16()


def test_bench_training(smollm2, report, size):
    s = dict(SETTINGS[size])
    s["bf16"] = s["bf16"] and bf16_here(smollm2.device)
    config = TrainConfig(method="gircse", k=s["k"], batch_size=s["rows"], num_negatives=s["negatives"],
                         max_length=s["max_length"], bf16=s["bf16"], max_grad_norm=1.0, progress=False)
    model = lora_copy(smollm2, config)
    model.max_length, model.k = config.max_length, config.k
    rows = training_rows(s["rows"])

    # Correctness first (fp32, two rows, no hard negatives): cached == uncached, GradCache == direct.
    small = dataclasses.replace(config, bf16=False, batch_size=2, num_negatives=0)
    check_rows = rows[:2]
    for method, label in (("gircse", "GIRCSE"), ("causal-eos", "Causal-EOS")):
        loss, direct = gradients(model, check_rows, small, method, True)
        if method == "gircse":
            loss_u, uncached = gradients(model, check_rows, small, method, False)
            check_close(report, "training", "GIRCSE cached vs uncached: loss", loss, loss_u, rel_tol=1e-4)
            # fp32 round-off of GEMMs of other shapes, through 30 layers and K feedback steps, then
            # multiplied by 1/tau = 50 in the InfoNCE logits: ~1e-3 of the gradient's scale.
            check_close(report, "training", "GIRCSE cached vs uncached: LoRA gradients", direct, uncached,
                        rel_tol=5e-3)
        # GradCache's chunks of 2 texts run forwards of 2 rows where the direct path runs one of all 4: the
        # same arithmetic on GEMMs of other shapes (tests/gircse/test_training.py checks the equality on a
        # tiny model; test_model_generation.py shows row chunks change nothing in float64). GIRCSE's K
        # feedback steps amplify that fp32 round-off: 1.2e-4 measured on the AMX Xeon, Causal-EOS < 1e-4.
        loss_gc, gradcache = gradients(model, check_rows, dataclasses.replace(small, embed_chunk=2), method, True)
        check_close(report, "training", f"{label} GradCache vs direct: loss", loss_gc, loss, rel_tol=1e-5)
        check_close(report, "training", f"{label} GradCache vs direct: LoRA gradients", gradcache, direct,
                    rel_tol=1e-3 if method == "gircse" else 1e-4)

    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-5)

    def optimizer_step(method, cached, chunk):
        step_config = dataclasses.replace(config, method=method, embed_chunk=chunk)

        def run():
            optimizer.zero_grad(set_to_none=True)
            with way(model, method, cached):
                batch_gradients(model, rows, step_config)
            torch.nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm)
            optimizer.step()
        return run

    runs = {(name, chunk): optimizer_step(method, cached, chunk)
            for chunk in (None, s["chunk"]) for name, (method, cached) in WAYS.items()}
    timed = time_methods(runs, reps=s["reps"], warmup=False, device=model.device)
    texts = s["rows"] * (2 + s["negatives"])
    section = report.section("training", "Training level: one optimizer step on SmolLM2-135M", (
        f"{s['rows']} rows per step ({texts} texts: queries, positives and {s['negatives']} hard negative(s) "
        f"per row), max_length {s['max_length']}, K = {s['k']}, LoRA r = 64 / alpha = 32 on all linear layers, "
        f"AdamW, clipping at 1.0, {'bf16 autocast' if s['bf16'] else 'fp32 (no native bf16 GEMM here)'}; GradCache chunk {s['chunk']} "
        "texts. Time: best of the round-robin repetitions after a first (memory-measuring) step; peak "
        "memory: the step's peak RSS above what was held before it (CPU) or peak allocated (CUDA). Ratios "
        "are to Causal-EOS with the same GradCache setting."))
    table = section.table("steps", "Seconds per optimizer step and peak memory", [
        ("way", "way"), ("gradcache", "GradCache"), ("seconds", "s / step", "s"),
        ("ratio", "time / Causal-EOS", "ratio"), ("peak_mib", "peak MiB", "mib"),
        ("mem_ratio", "memory / Causal-EOS", "ratio"), ("cpu_busy", "cpu busy", "ratio")])
    for (name, chunk), m in timed.items():
        eos = timed[("Causal-EOS", chunk)]
        mem_ratio = None if m.peak_mib is None or not eos.peak_mib else m.peak_mib / eos.peak_mib
        table.add(way=name, gradcache="-" if chunk is None else f"chunk {chunk}", seconds=m.seconds,
                  ratio=m.seconds / eos.seconds, peak_mib=m.peak_mib, mem_ratio=mem_ratio, cpu_busy=m.cpu_busy)
    del model, optimizer


# ---------------------------------------------------------------------- one micro-batch against its ideal
MICRO_BATCH = {  # rows (each with its positive and hard negatives), negatives per row, max_length, K, reps
    "quick": dict(rows=2, negatives=1, max_length=40, k=2, reps=1),
    "default": dict(rows=16, negatives=1, max_length=128, k=5, reps=1),
    "full": dict(rows=16, negatives=1, max_length=128, k=5, reps=3),
}


def test_bench_training_step(smollm2, report, size):
    """Issue 25's comparison: the gradients of one contrastive micro-batch of the shipped Debian set
    (``batch_gradients``, as ``gircse train --bf16`` runs it: frozen weights cast to bf16 once, autocast),
    GIRCSE against Causal-EOS on the same rows and adapter, each also against the model-level roofline
    (``gircse.cost.training_calls``: forward and backward FLOPs and bytes of every call) and its memory
    against ``gircse.cost.training_memory``."""
    s = MICRO_BATCH[size]
    device = smollm2.device
    bf16 = bf16_here(device)
    config = TrainConfig(method="gircse", k=s["k"], batch_size=s["rows"], num_negatives=s["negatives"],
                         max_length=s["max_length"], bf16=bf16, progress=False)
    model = lora_copy(smollm2, config)
    model.max_length, model.k = config.max_length, config.k
    rows = training_rows(s["rows"])
    shape = flops.DecoderShape.from_config(base_causal_lm(model.model).config)
    compute_dtype = torch.bfloat16 if bf16 else torch.float32
    machine = measure_machine(compute_dtype, device)
    texts, instructions, _ = _batch_texts(rows, config)
    model.method = "gircse"  # GIRCSE's token counts; the roofline adds Causal-EOS's EOS itself
    lengths = [len(ids) for ids in model._prompt_token_ids(texts, instructions)]

    def micro_batch(method):
        step_config = dataclasses.replace(config, method=method)

        def run():
            model.zero_grad(set_to_none=True)
            model.method = method
            with frozen_linear_weights_in_bf16(model, bf16):
                batch_gradients(model, rows, step_config)
        return run

    saved = model.method
    try:
        timed = time_methods({m: micro_batch(m) for m in ("causal-eos", "gircse")}, reps=s["reps"], warmup=False,
                             device=device)
    finally:
        model.method = saved
    dtype_bytes = 2 if bf16 else 4
    section = report.section("training-step", "Model level: one training micro-batch (SmolLM2-135M)", (
        f"`batch_gradients` of {s['rows']} rows of the shipped Debian training set ({len(texts)} texts: "
        f"queries, positives, {s['negatives']} hard negative(s) per row; mean {sum(lengths) / len(lengths):.0f} "
        f"tokens), max_length {s['max_length']}, K = {s['k']}, LoRA r = {config.lora_r} on all linear layers, "
        f"{'bf16 (frozen weights cast once, autocast)' if bf16 else 'fp32 (no native bf16 GEMM here)'}, as "
        f"`gircse train` runs it: one forward for all texts, prefills of {PREFILL_ROWS} texts. `ideal`: "
        f"`gircse.cost.training_calls`, forward and backward, each call at max(FLOPs / GEMM rate, bytes / read "
        f"bandwidth) with this run's measured {machine.gemm_flops / 1e9:.0f} GFLOP/s and "
        f"{machine.bandwidth / 1e9:.1f} GB/s; `model memory`: `gircse.cost.training_memory` (weights, adapter "
        "state, activations kept for backward, KV cache) less the weights and adapter state the process "
        "already holds. Peak: the call's peak RSS above what was held before it (CPU) or peak allocated (CUDA)."))
    table = section.table("micro-batch", "One micro-batch's gradients", [
        ("method", "method"), ("seconds", "s", "s"), ("ratio", "time / Causal-EOS", "ratio"),
        ("ideal", "ideal s", "s"), ("ideal_ratio", "ideal / Causal-EOS ideal", "ratio"),
        ("vs_ideal", "time / ideal", "ratio"), ("peak_mib", "peak MiB", "mib"),
        ("mem_ratio", "memory / Causal-EOS", "ratio"), ("model_mib", "model memory MiB", "mib"),
        ("cpu_busy", "cpu busy", "ratio")])
    ideals = {}
    for method in timed:
        calls = cost.training_calls(shape, method, lengths, s["k"], lora_rank=config.lora_r,
                                    dtype_bytes=dtype_bytes, prefill_rows=PREFILL_ROWS)
        ideals[method] = cost.ideal_seconds(calls, machine)
    eos = timed["causal-eos"]
    for method, m in timed.items():
        need = cost.training_memory(shape, method, lengths, s["k"], lora_rank=config.lora_r, dtype_bytes=dtype_bytes)
        mem_ratio = None if m.peak_mib is None or not eos.peak_mib else m.peak_mib / eos.peak_mib
        table.add(method="Causal-EOS" if method == "causal-eos" else "GIRCSE", seconds=m.seconds,
                  ratio=m.seconds / eos.seconds, ideal=ideals[method],
                  ideal_ratio=ideals[method] / ideals["causal-eos"], vs_ideal=m.seconds / ideals[method],
                  peak_mib=m.peak_mib, mem_ratio=mem_ratio,
                  model_mib=(need["activations"] + need["kv_cache"]) / 2**20, cpu_busy=m.cpu_busy)
    del model

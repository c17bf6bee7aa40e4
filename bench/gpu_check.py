"""One-shot GPU check of the Triton backend: correctness at real shapes, CUDA graphs, timings vs the roofline.

For the day a GPU is available (about 15 minutes of device time in all, on a bare machine without
network): one command, sized to fit that budget with Triton compilation included (not yet run on a
GPU: the time is an estimate), that writes
``DIR/gpu_check.md`` and ``DIR/gpu_check.json``:

    PYTHONPATH=. GIRCSE_NO_JIT=1 python3 bench/gpu_check.py --out DIR   # no C++ JIT build: GPU only

0. the Triton kernels of every call below compiled ahead in parallel processes (the JIT would compile
   them one by one on first use), into Triton's cache, with the JIT's exact specialization;
1. environment and calibration: GPU, SMs, L2; measured HBM copy bandwidth, L2 bandwidth (a copy that
   fits in L2) and the bf16 GEMM rate -- the machine model of ``gircse_kernels.triton.roofline``;
2. correctness at the real LM-head shapes (SmolLM2-135M 49152x576 tied, Qwen2.5-0.5B 151936x896 tied,
   Mistral-7B 32000x4096, Qwen2-7B 152064x3584), bf16 and fp32, forward and every gradient, tied and
   untied, a bias with -inf entries: each against an fp64 truth with the shared oracle
   (``tests/gircse_kernels/op_cases.ATOL``: error <= same-dtype PyTorch error + ATOL * scale);
3. CUDA graphs: the op's K-step soft-token loop captured once and replayed on new inputs (must equal
   eager), and the real ``gircse.generation.generate_soft_tokens`` loop on a small random Llama;
4. timings side by side in one run: the Triton op, naive PyTorch (materialized softmax), vocabulary-
   chunked PyTorch (online softmax over 8192-row chunks, 16-bit GEMMs) and
   ``scaled_dot_product_attention`` where a fused backend takes the shape; as time, % of the measured
   HBM bandwidth (one pass over W and E) and TFLOP/s, next to the roofline prediction (the model's
   assumptions and the model recalibrated with the measured bandwidths);
5. if time is left, a sweep of the design choices the roofline model cannot settle (``SWEEP``), each timed
   next to its prediction: tiles of the narrow tied models at B = 32 (an L2 cliff), the GEMM path's chunk
   size at B = 128 (L2 reuse vs launches), then the decode forward's tiles.

Sections past ``--budget-s`` are skipped and say so. ``--device cpu --small`` runs the same logic on tiny
shapes under the Triton interpreter (what the CPU-side tests exercise); its timings mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
import traceback

MODELS = {  # (V, d, d_e, tied): the LM heads of the issue
    "SmolLM2-135M": (49152, 576, 576, True),
    "Qwen2.5-0.5B": (151936, 896, 896, True),
    "Mistral-7B": (32000, 4096, 4096, False),
    "Qwen2-7B": (152064, 3584, 3584, False),
}
BATCHES = (1, 8, 32, 128, 512, 4096)
SMALL_MODELS = {"tiny-tied": (300, 48, 48, True), "tiny-wide": (257, 200, 72, False)}
SMALL_BATCHES = (1, 64)
PASSES = ("forward", "dh-backward", "full-backward")
DEFAULT_BUDGET_S = 420.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_check.md and gpu_check.json")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: run the logic under TRITON_INTERPRET=1 (implies --small)")
    parser.add_argument("--small", action="store_true", help="tiny shapes instead of the real LM heads")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="wall-clock budget; later sections are skipped past it (default %(default)s)")
    parser.add_argument("--models", nargs="+", help="subset of the model shapes (default: all)")
    parser.add_argument("--batches", type=int, nargs="+", help="subset of the batch sizes")
    parser.add_argument("--sections", nargs="+",
                        default=["precompile", "calibration", "correctness", "graphs", "timings", "sweep"],
                        choices=["precompile", "calibration", "correctness", "graphs", "timings", "sweep"])
    args = parser.parse_args(argv)
    if args.device == "cpu":
        args.small = True
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    models = SMALL_MODELS if args.small else MODELS
    unknown = sorted(set(args.models or ()) - set(models))
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {sorted(models)}")
    args.model_shapes = {k: v for k, v in models.items() if not args.models or k in args.models}
    args.batch_sizes = tuple(args.batches or (SMALL_BATCHES if args.small else BATCHES))
    if any(b < 1 for b in args.batch_sizes):
        parser.error("--batches must be positive")
    return args


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def timed(fn, device, *, min_total_s=0.02, max_reps=20):
    """Median wall time of ``fn()`` in seconds after one warm-up call (CUDA events on the GPU)."""
    import torch

    fn()
    if device == "cpu":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    torch.cuda.synchronize()
    times, total = [], 0.0
    while len(times) < 3 or (total < min_total_s and len(times) < max_reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        total += times[-1]
    return sorted(times)[len(times) // 2]


def make_inputs(vocab, d, de, dtype, device, *, rows, tied, bias, mask=None, seed=0, logit_scale=3.0):
    """Inputs like ``tests/gircse_kernels/op_cases.make_inputs``, generated on the device (fast at 7B sizes):
    unit-norm rows scaled so |logits| ~ logit_scale, a random bias with ``mask`` entries at -inf."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(rows, d, generator=g, device=device)
    weight = torch.randn(vocab, d, generator=g, device=device)
    hidden = hidden / hidden.norm(dim=-1, keepdim=True) * logit_scale ** 0.5
    weight = weight / weight.norm(dim=-1, keepdim=True) * logit_scale ** 0.5
    embed = weight if tied else torch.randn(vocab, de, generator=g, device=device)
    b = torch.randn(vocab, generator=g, device=device) if bias or mask is not None else None
    if mask is not None:
        from tests.gircse_kernels.op_cases import vocab_mask

        b[vocab_mask(mask, vocab).to(device)] = float("-inf")
    out = [t if t is None else t.to(dtype) for t in (hidden, weight, embed, b)]
    if tied:
        out[2] = out[1]
    return out


# ----------------------------------------------------------------------------------------------
# 0. parallel precompilation (the JIT compiles serially, on first use)
# ----------------------------------------------------------------------------------------------
def planned_launches(pass_name, rows, vocab, d, de, tied, dtype_name, bias, sms, upcast=False, blocks=None):
    """The Triton launches one call of the op makes (meta tensors; the GEMM path's per-chunk kernels
    included), so their exact JIT specializations can be compiled ahead, in parallel. ``blocks``: plan
    under a sweep alternative instead, ``(BLOCKS key, choice)`` (see ``overriding``)."""
    with overriding(blocks=blocks):
        return _planned_launches(pass_name, rows, vocab, d, de, tied, dtype_name, bias, sms, upcast)


def _planned_launches(pass_name, rows, vocab, d, de, tied, dtype_name, bias, sms, upcast):
    import torch

    from gircse_kernels.triton import gemm_path, host
    from gircse_kernels.triton.config import GEMM_GRAD_ROWS

    dtype = getattr(torch, dtype_name)
    meta = dict(dtype=dtype, device="meta")
    f32 = dict(dtype=torch.float32, device="meta")
    hidden, weight = torch.empty(rows, d, **meta), torch.empty(vocab, d, **meta)
    embed = weight if tied else torch.empty(vocab, de, **meta)
    lse, grad_out = torch.empty(rows, **f32), torch.empty(rows, de, **meta)
    b = torch.empty(vocab, **meta) if bias else None
    kw = dict(temperature=1.0, softcap=None)
    cfg = host.config_for(hidden, weight, embed, sms=sms)
    if cfg.kind == "gemm":
        chunk = cfg.gemm_chunk_forward if pass_name == "forward" else cfg.gemm_chunk
        p = torch.empty(rows, chunk, **meta)
        launches = []
        for v0 in range(0, vocab, chunk):
            n = min(chunk, vocab - v0)
            z = torch.empty(rows, n, **f32)
            if pass_name == "forward":
                launches.append(gemm_path.chunk_softmax_launch(z, b, p[:, :n], lse, lse, lse, v0, **kw))
            else:
                db_part = None if b is None or pass_name != "full-backward" else \
                    torch.empty(-(-rows // GEMM_GRAD_ROWS), chunk, **f32)[:, :n]
                launches.append(gemm_path.chunk_grad_launch(z, z, b, lse, lse, p[:, :n], p[:, :n], db_part, v0, **kw))
        return launches
    if pass_name == "forward":
        return host.forward_launches(hidden, weight, embed, b, torch.empty(rows, de, **f32), lse, tied=tied,
                                     upcast=upcast, sms=sms, **kw)
    full = pass_name == "full-backward"
    return host.backward_launches(grad_out, hidden, weight, embed, b, lse, lse, tied=tied, need_hidden=True,
                                  need_weight=full, need_embed=full, need_bias=full and bias,
                                  merge_tied_grads=full and tied, grad_filter_eps=0.0, upcast=upcast, sms=sms,
                                  **kw)[0]


def _compile_planned(job):
    """Worker: compile one planned launch for the device's target (fills Triton's on-disk cache)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gircse_kernels.triton.aot import jit_specialization

    (*call, index, blocks), (backend, arch, warp) = job
    launch = planned_launches(*call, blocks=blocks)[index]
    signature, constexprs, attrs = jit_specialization(launch)
    try:
        triton.compile(ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget(backend, arch, warp),
                       options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
        return None
    except Exception as exc:  # the JIT will compile it on first use instead
        return f"{launch.name}: {type(exc).__name__}: {str(exc)[:200]}"


def precompile(calls, target, sms, budget_s):
    """Compile every distinct launch of ``calls`` ((pass, rows, V, d, d_e, tied, dtype, bias) tuples, or
    with a ninth element, a sweep alternative ``(BLOCKS key, choice)`` to plan under) in parallel
    processes, in order; returns (distinct kernels, failures, seconds)."""
    import concurrent.futures
    import multiprocessing

    from gircse_kernels.triton.aot import jit_specialization

    start = time.perf_counter()
    jobs, seen = [], set()
    for call in calls:
        call, blocks = (call[:8], call[8]) if len(call) > 8 else (call, None)
        for index, launch in enumerate(planned_launches(*call, sms, blocks=blocks)):
            sig, const, attrs = jit_specialization(launch)
            key = (launch.name, str(sig), str(sorted(map(str, const.items()))), str(attrs), launch.num_warps,
                   launch.num_stages)
            if key not in seen:
                seen.add(key)
                jobs.append(((*call, sms, index, blocks), target))
    failures = []
    workers = max(1, min(16, (os.cpu_count() or 2) - 1))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_compile_planned, job) for job in jobs]
        for future in futures:
            left = budget_s - (time.perf_counter() - start)
            try:
                error = future.result(timeout=max(left, 0.1))
            except concurrent.futures.TimeoutError:
                failures.append("precompile budget exhausted")
                for f in futures:
                    f.cancel()
                break
            if error:
                failures.append(error)
    return len(jobs), failures, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# 1. environment and calibration
# ----------------------------------------------------------------------------------------------
def environment(device):
    import torch
    import triton

    env = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
               device=device, interpreter=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                   l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
                   capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return env


def calibrate(device, small):
    """Measured HBM copy bandwidth (bytes read + written per second), L2 bandwidth (a copy that stays in
    L2), and the dense 16-bit GEMM rate (FLOP/s)."""
    import torch

    big = (1 << 20) if small else (1 << 31)  # bytes per buffer
    src = torch.empty(big // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    hbm = 2 * big / timed(lambda: dst.copy_(src), device)
    l2_bytes = (1 << 16) if small else (16 << 20)
    s2, d2 = src[: l2_bytes // 2], dst[: l2_bytes // 2]
    copies = 50

    def l2_copies():
        for _ in range(copies):
            d2.copy_(s2)
    if device == "cuda":  # back-to-back in one graph: no launch gaps between the short copies
        l2_copies()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            l2_copies()
        l2 = copies * 2 * l2_bytes / timed(graph.replay, device, min_total_s=0.05)
    else:
        l2 = copies * 2 * l2_bytes / timed(l2_copies, device)
    n = 256 if small else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    gemm = 2 * n**3 / timed(lambda: a @ a, device)
    return dict(hbm_bytes_per_s=hbm, l2_bytes_per_s=l2, gemm_flops=gemm)


def calibrated_hardware(calib, env):
    from gircse_kernels.triton import roofline as rl

    base = rl.H200 if "H200" in env.get("gpu", "H200") else rl.H100
    return dataclasses.replace(base, name=f"{env.get('gpu', 'this device')} (measured)",
                               num_sms=env.get("sms", base.num_sms), hbm_bytes_per_s=calib["hbm_bytes_per_s"],
                               l2_bytes_per_s=calib["l2_bytes_per_s"], flops_16bit=calib["gemm_flops"],
                               flops_fp32=calib["gemm_flops"] / 6,
                               l2_bytes=int(env.get("l2_mib", 0) * 2**20) or base.l2_bytes)


# ----------------------------------------------------------------------------------------------
# 2. correctness
# ----------------------------------------------------------------------------------------------
def correctness_cases(models, batches, small):
    """(model, rows, dtype, tied, mask, bias) cases: every model in bf16 at a decode and a larger batch
    (the fused kernels and the GEMM path), its tied / untied twin, a bias with -inf entries, fp32."""
    import torch

    cases = []
    small_b, large_b = min(batches), max(b for b in batches if b <= (64 if small else 512))
    for name, (vocab, d, de, tied) in models.items():
        cases.append((name, small_b, torch.bfloat16, tied, None, False))
        cases.append((name, large_b, torch.bfloat16, tied, "tail", True))
        cases.append((name, 16 if not small else small_b, torch.bfloat16, not tied and d == de, "sparse", True))
    first, last = list(models)[0], list(models)[-1]
    cases.append((first, small_b, torch.float32, models[first][3], None, True))
    cases.append((last, large_b, torch.float32, models[last][3], "head", True))
    return cases


def _leaves(inputs, dtype=None):
    """Fresh leaves requiring grad (cast to ``dtype``); a tied E stays the same tensor as W."""
    h, w, e, b = (None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in inputs)
    if inputs[2] is inputs[1]:
        e = w
    return h, w, e, b


def check_case(name, shape, rows, dtype, tied, mask, bias, device):
    """Forward and every gradient of the Triton backend vs an fp64 truth. Error bound: PyTorch's own
    same-dtype error plus ``op_cases.ATOL`` (looser than the test suite's oracle, which checks PyTorch's
    error against the truth instead of adding it: not yet run on a GPU at these real shapes)."""
    import torch

    from gircse_kernels import reference, soft_token_embedding
    from tests.gircse_kernels.op_cases import ATOL

    vocab, d, de, _ = shape
    de = d if tied else de
    inputs = make_inputs(vocab, d, de, dtype, device, rows=rows, tied=tied, bias=bias, mask=mask)
    go = torch.randn(rows, de, generator=torch.Generator(device=device).manual_seed(7), device=device)

    def output_and_grads(fn, leaves, cast):
        h, w, e, b = leaves
        unique = [h, w] + ([] if e is w else [e]) + ([] if b is None else [b])
        out = fn(h, w, e, b)
        return [out.detach(), *torch.autograd.grad(out, unique, go.to(cast))]

    def naive(h, w, e, b):
        z = h @ w.T + (0 if b is None else b)
        return torch.softmax(z.float(), -1).to(z.dtype) @ e

    actual = output_and_grads(lambda *t: soft_token_embedding(*t, backend="triton"), _leaves(inputs), dtype)
    truth = output_and_grads(reference.soft_token_embedding, _leaves(inputs, torch.float64), torch.float64)
    baseline = output_and_grads(naive, _leaves(inputs), dtype)
    names = ["output", "grad hidden", "grad lm_head_weight"] + ([] if tied else ["grad embed_weight"]) + \
        ([] if inputs[3] is None else ["grad lm_head_bias"])
    results = {}
    for what, got, true, ref in zip(names, actual, truth, baseline):
        scale = max(true.abs().max().item(), 0.05)
        err = (got.double() - true).abs().max().item()
        ref_err = (ref.double() - true).abs().max().item()
        bound = ref_err + ATOL[dtype] * scale
        results[what] = dict(error=err, pytorch_error=ref_err, bound=bound,
                             ok=bool(err <= bound and torch.isfinite(got).all()))
    return dict(model=name, rows=rows, dtype=str(dtype).replace("torch.", ""), tied=tied, mask=mask, bias=bias,
                path=_kind(rows, vocab, d, de, dtype, device), checks=results, ok=all(r["ok"] for r in results.values()))


def _kind(rows, vocab, d, de, dtype, device):
    import torch

    from gircse_kernels.triton.config import choose_config, num_sms

    return choose_config(rows, vocab, d, de, dtype, num_sms(torch.device(device))).kind


# ----------------------------------------------------------------------------------------------
# 3. CUDA graphs
# ----------------------------------------------------------------------------------------------
def graph_check_op_loop(device, shape, k=5, rows=4):
    """The op's K-step soft-token loop (h_{j+1} = tanh(A d_j): a stand-in decoder) captured in one CUDA graph
    and replayed on new inputs: must reproduce eager exactly."""
    import torch

    from gircse_kernels import soft_token_embedding

    vocab, d, de, tied = shape
    _, w, e, b = make_inputs(vocab, d, d if tied else de, torch.bfloat16, device, rows=rows, tied=tied, bias=True)
    mix = torch.randn(de, d, device=device, dtype=torch.bfloat16) / de ** 0.5

    def loop(h):
        outs = []
        for _ in range(k):
            soft = soft_token_embedding(h, w, e, b, backend="triton")
            h = torch.tanh(soft @ mix)
            outs.append(soft)
        return torch.stack(outs)

    static_h = torch.randn(rows, d, device=device, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loop(static_h)  # warm-up: compiles every kernel outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = loop(static_h)
    results = []
    for seed in (1, 2):
        fresh = torch.randn(rows, d, device=device, dtype=torch.bfloat16,
                            generator=torch.Generator(device=device).manual_seed(seed))
        static_h.copy_(fresh)
        graph.replay()
        eager = loop(fresh)
        results.append(bool(torch.equal(static_out, eager)))
    return dict(name="op K-step loop", k=k, rows=rows, ok=all(results), replays_equal_eager=results)


def graph_check_generation(device, k=4, rows=2, length=6):
    """``gircse.generation.generate_soft_tokens`` on a small random Llama (vocab 49152, d = 64), K steps
    captured in one CUDA graph and replayed on new input ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gircse.generation import generate_soft_tokens

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.2)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 49152, (rows, length), device=device)
    mask = torch.ones(rows, length, dtype=torch.long, device=device)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            generate_soft_tokens(model, None, ids, mask, k)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = generate_soft_tokens(model, None, ids, mask, k)
        fresh = torch.randint(3, 49152, (rows, length), device=device)
        ids.copy_(fresh)
        graph.replay()
        eager = generate_soft_tokens(model, None, fresh, mask, k)
    equal = bool(torch.equal(static_out, eager))
    return dict(name="gircse.generation K-step loop", k=k, rows=rows, ok=equal, replay_equals_eager=equal)


# ----------------------------------------------------------------------------------------------
# 4. timings
# ----------------------------------------------------------------------------------------------
def chunked_forward(h, w, e, b, chunk=8192):
    """Vocabulary-chunked PyTorch: online softmax over chunks, 16-bit GEMMs, fp32 statistics."""
    import torch

    rows = h.shape[0]
    m = torch.full((rows, 1), float("-inf"), device=h.device)
    total = torch.zeros(rows, 1, device=h.device)
    acc = torch.zeros(rows, e.shape[1], device=h.device)
    for lo in range(0, w.shape[0], chunk):
        z = (h @ w[lo:lo + chunk].T).float()
        if b is not None:
            z += b[lo:lo + chunk].float()
        new = torch.maximum(m, z.amax(1, keepdim=True))
        safe = torch.where(new == float("-inf"), 0.0, new)
        scale = torch.exp(m - safe)
        p = torch.exp(z - safe)
        acc = acc * scale + (p.to(h.dtype) @ e[lo:lo + chunk]).float()
        total = total * scale + p.sum(1, keepdim=True)
        m = new
    return (acc / total).to(e.dtype)


def sdpa_forward(h, w, e, b):
    """``scaled_dot_product_attention`` with the B rows as one query sequence over the vocabulary (keys W,
    values E, no copies), scale 1; the first fused backend that takes the shape (flash needs d = d_e <= 256),
    else (None, None)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = h[None, None], w[None, None], e[None, None]
    mask = None if b is None else b[None, None, None, :].expand(1, 1, h.shape[0], -1)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def call(backend=backend):
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)[0, 0]
        try:
            call()
        except RuntimeError:
            continue
        return backend.name.lower(), call
    return None, None


def timing_rows(models, batches, device, hardware_model, hardware_measured, clock, reserve_s):
    import torch

    from gircse_kernels.triton import roofline as rl

    rows_out = []
    for name, (vocab, d, de, tied) in models.items():
        for batch in batches:
            for pass_name in PASSES:
                if clock.left() < reserve_s:
                    rows_out.append(dict(model=name, rows=batch, pass_name=pass_name, skipped="budget"))
                    continue
                row = dict(model=name, rows=batch, pass_name=pass_name, kind=_kind(batch, vocab, d, de,
                                                                                   torch.bfloat16, device))
                try:
                    row.update(_time_cell(name, vocab, d, de, tied, batch, pass_name, device))
                except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - GPU only
                    row["error"] = f"out of memory: {exc}"[:200]
                    torch.cuda.empty_cache()
                pred = rl.predict(pass_name, batch, vocab, d, de, tied=tied, hardware=hardware_model)
                meas = rl.predict(pass_name, batch, vocab, d, de, tied=tied, hardware=hardware_measured)
                row.update(model_s=pred.seconds, model_measured_hw_s=meas.seconds, ideal_bytes=pred.ideal_bytes,
                           useful_flops=pred.useful_flops, ideal_s=pred.ideal_seconds)
                t = row.get("triton_s")
                if t:
                    row["hbm_fraction"] = pred.ideal_bytes / t / hardware_measured.hbm_bytes_per_s
                    row["tflops"] = pred.useful_flops / t / 1e12
                rows_out.append(row)
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows_out


def _time_cell(name, vocab, d, de, tied, batch, pass_name, device):
    import torch

    from gircse_kernels import soft_token_embedding

    de = d if tied else de
    h, w, e, b = make_inputs(vocab, d, de, torch.bfloat16, device, rows=batch, tied=tied, bias=False)
    out = {}
    go = torch.randn(batch, de, device=device, dtype=torch.bfloat16)

    def naive(h_, w_, e_, b_):
        return torch.softmax((h_ @ w_.T).float(), -1).to(h_.dtype) @ e_

    triton_op = lambda h_, w_, e_, b_: soft_token_embedding(h_, w_, e_, b_, backend="triton")  # noqa: E731
    impls = {"triton": triton_op, "naive": naive, "chunked": lambda *a: chunked_forward(*a)}
    if pass_name == "forward":
        sdpa_name, sdpa = sdpa_forward(h, w, e, b) if device == "cuda" else (None, None)
        if sdpa is not None:
            impls["sdpa"] = lambda *a: sdpa()
            out["sdpa_backend"] = sdpa_name
        with torch.no_grad():
            for key, fn in impls.items():
                out[f"{key}_s"] = timed(lambda fn=fn: fn(h, w, e, b), device)
        return out
    full = pass_name == "full-backward"
    hg = h.detach().requires_grad_(True)
    wg = w.detach().requires_grad_(full)
    eg = wg if tied else e.detach().requires_grad_(full)
    leaves = [hg] + ([wg] if full else []) + ([eg] if full and not tied else [])
    # (the chunked baseline's backward is autograd through every chunk: it keeps each chunk's softmax)
    for key, fn in impls.items():
        out[f"{key}_s"] = timed(lambda fn=fn: torch.autograd.grad(fn(hg, wg, eg, None), leaves, go), device)
    return out


# ----------------------------------------------------------------------------------------------
# 5. sweep
# ----------------------------------------------------------------------------------------------
# Design choices the roofline model cannot settle, timed side by side on the GPU, each next to its roofline
# prediction; the choice in use is timed first. (pass, rows, setting, alternatives):
#   "blocks": alternatives to the ``triton_config.BLOCKS`` entry the call uses (block_m, block_v, warps,
#       stages). The narrow tied models at B = 32 sit on an L2-residency cliff of the fused kernels (per-
#       program fp32 slice + re-read W tile vs L2): on the H200's side of it (32, 64) models 1.11x the
#       one-pass traffic for Qwen2.5-0.5B against 3.06x for the entry, on the H100's side 4x. The dh-only
#       backward at B = 1: with 16-row vocabulary tiles the model keeps each W tile in L2 for the dz W pass
#       (the 7B models: 1.0x the one-pass traffic instead of 1.5x, e.g. Qwen2-7B 510 us instead of 780 on
#       the H200), but the same tiles lose at B = 8 (2.6x), so a GPU must say first. The decode forward.
#   "gemm_chunk": the GEMM path's vocabulary chunk as a fraction of V (today about V / 2, bounded by
#       GEMM_BUFFER_BYTES). Smaller chunks keep a chunk's W (tied: also its E) in L2 for the GEMM that
#       reads it again, at the price of launches and per-chunk rescaling: at B = 128 the model has
#       Qwen2.5-0.5B's forward at 2.58x the one-pass traffic with V / 2 and 1.11x with V / 16, but slower
#       (248 -> 399 us on the H200), and V / 4 faster in time on both GPUs while still at 2.02x.
# Calls that do not run the setting at that B (the GEMM path for "blocks", the fused kernels for
# "gemm_chunk") are left out.
SWEEP = (
    ("forward", 32, "blocks", [(32, 64, 8, 3), (16, 64, 8, 3), (64, 64, 8, 3)]),
    ("dh-backward", 32, "blocks", [(32, 64, 8, 3), (32, 128, 8, 3), (16, 64, 8, 3)]),
    ("forward", 128, "gemm_chunk", [4, 8, 16]),
    ("dh-backward", 128, "gemm_chunk", [4, 8, 16]),
    ("dh-backward", 1, "blocks", [(16, 16, 8, 3), (16, 32, 8, 3)]),
    ("forward", 1, "blocks", [(16, 128, 4, 3), (16, 64, 8, 4), (16, 32, 4, 4)]),
)
SWEEP_KERNELS = {"forward": "forward", "dh-backward": "backward_hidden"}


def _chunk_rows(vocab: int, fraction: int) -> int:
    from gircse_kernels.triton import config as triton_config

    align = triton_config.GEMM_CHUNK_ALIGN
    return max(align, -(-vocab // fraction // align) * align)


@contextlib.contextmanager
def overriding(blocks=None, gemm_chunk=None):
    """Plans and launches under one sweep alternative: ``blocks`` = (BLOCKS key, choice) replaces that
    entry, ``gemm_chunk`` makes every GEMM-path chunk that many rows; everything is restored after.
    With neither, nothing is touched (the plain plans of the precompile section)."""
    from gircse_kernels.triton import config as triton_config

    if blocks is None and gemm_chunk is None:
        yield
        return
    saved_blocks, saved_chunk = dict(triton_config.BLOCKS), triton_config.gemm_chunk
    try:
        if blocks is not None:
            triton_config.BLOCKS[tuple(blocks[0])] = tuple(blocks[1])
        if gemm_chunk is not None:
            triton_config.gemm_chunk = lambda rows, vocab, bytes_per_element: gemm_chunk
        triton_config.choose_config.cache_clear()
        yield
    finally:
        triton_config.BLOCKS.clear()
        triton_config.BLOCKS.update(saved_blocks)
        triton_config.gemm_chunk = saved_chunk
        triton_config.choose_config.cache_clear()


def sweep_cells(models, num_sms):
    """The SWEEP entries that apply to ``models``: dicts of model, shape, pass, rows, setting, key and
    choices (the one in use first)."""
    import torch

    from gircse_kernels.triton import config as triton_config

    cells = []
    for pass_name, rows, setting, alternatives in SWEEP:
        for name, (vocab, d, de, tied) in models.items():
            de = d if tied else de
            cfg = triton_config.choose_config(rows, vocab, d, de, torch.bfloat16, num_sms)
            if (cfg.kind == "gemm") != (setting == "gemm_chunk"):
                continue
            if setting == "blocks":
                key = (SWEEP_KERNELS[pass_name], 2, "small" if rows <= 16 else "large",
                       triton_config.feature_mode(d, de))
                choices = [triton_config.BLOCKS[key]] + [a for a in alternatives if a != triton_config.BLOCKS[key]]
            else:
                key = ("gemm_chunk",)
                current = cfg.gemm_chunk_forward if pass_name == "forward" else cfg.gemm_chunk
                choices = list(dict.fromkeys([current] + [_chunk_rows(vocab, f) for f in alternatives]))
            cells.append(dict(model=name, shape=(vocab, d, de, tied), pass_name=pass_name, rows=rows, setting=setting,
                              key=key, choices=choices))
    return cells


def sweep(models, device, clock, reserve_s, hardware_model):
    from gircse_kernels.triton import roofline as rl

    results = []
    for cell in sweep_cells(models, hardware_model.num_sms):
        (vocab, d, de, tied), setting, key = cell["shape"], cell["setting"], cell["key"]
        for choice in cell["choices"]:
            row = dict(setting=setting, key=list(key), choice=list(choice) if setting == "blocks" else choice,
                       model=cell["model"], rows=cell["rows"], pass_name=cell["pass_name"],
                       current=choice == cell["choices"][0])
            if clock.left() < reserve_s:
                results.append(dict(row, skipped="budget"))
                continue
            override = dict(blocks=(key, choice)) if setting == "blocks" else dict(gemm_chunk=choice)
            with overriding(**override):
                row["model_s"] = rl.predict(row["pass_name"], row["rows"], vocab, d, de, tied=tied,
                                            hardware=hardware_model).seconds
                try:  # one alternative that fails to compile or run must not cost the rest of the report
                    row["seconds"] = _sweep_time(row["pass_name"], row["rows"], vocab, d, de, tied, device)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            results.append(row)
    return results


def _sweep_time(pass_name, rows, vocab, d, de, tied, device):
    import torch

    from gircse_kernels.triton import host

    h, w, e, _ = make_inputs(vocab, d, de, torch.bfloat16, device, rows=rows, tied=tied, bias=False)
    kw = dict(temperature=1.0, softcap=None, tied=tied)
    if pass_name == "forward":
        return timed(lambda: host.forward(h, w, e, None, **kw), device)
    out32, lse = host.forward(h, w, e, None, **kw)
    go = torch.randn(rows, de, device=device, dtype=torch.bfloat16)
    delta = (go.float() * out32).sum(-1)
    return timed(lambda: host.backward(go, h, w, e, None, lse, delta, **kw), device)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _ms(seconds):
    return "" if seconds is None else f"{seconds * 1e3:.3f}"


def markdown(report) -> str:
    env, calib = report["environment"], report.get("calibration") or {}
    lines = ["# One-shot GPU check of the Triton backend", "",
             f"Command: `{report['command']}`; wall time {report['wall_s']:.0f} s (budget {report['budget_s']:.0f} s).",
             "", "## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    if report.get("precompile"):
        pre = report["precompile"]
        lines.append(f"- precompiled {pre['kernels']} kernels in parallel in {pre['seconds']:.0f} s"
                     + (f" ({len(pre['failures'])} left to the JIT: {pre['failures'][:3]})" if pre["failures"] else ""))
    if calib:
        lines += ["", "## Calibration (measured)", "",
                  f"- HBM copy bandwidth: {calib['hbm_bytes_per_s'] / 1e12:.3g} TB/s (bytes read + written)",
                  f"- L2 copy bandwidth: {calib['l2_bytes_per_s'] / 1e12:.3g} TB/s",
                  f"- 16-bit GEMM: {calib['gemm_flops'] / 1e12:.3g} TFLOP/s"]
    lines += ["", "## Correctness (fp64 truth; bound = PyTorch same-dtype error + ATOL x scale)", ""]
    if report.get("correctness"):
        lines += ["| model | B | dtype | tied | mask | path | worst check | error | bound | ok |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in report["correctness"]:
            if "error" in c:
                lines.append(f"| {c['model']} | {c['rows']} | {c['dtype']} | {c['tied']} | {c['mask']} | | "
                             f"{c['error'][:80]} | | | FAILED |")
                continue
            worst = max(c["checks"].items(), key=lambda kv: kv[1]["error"] / max(kv[1]["bound"], 1e-30))
            lines.append(f"| {c['model']} | {c['rows']} | {c['dtype']} | {c['tied']} | {c['mask']} | {c['path']} | "
                         f"{worst[0]} | {worst[1]['error']:.3g} | {worst[1]['bound']:.3g} | "
                         f"{'yes' if c['ok'] else 'NO'} |")
    else:
        lines.append(_skipped(report, "correctness"))
    lines += ["", "## CUDA graphs", ""]
    for g in report.get("graphs") or []:
        lines.append(f"- {g['name']}: {'replay equals eager' if g.get('ok') else 'FAILED: ' + str(g.get('error', g))[:300]}")
    if not report.get("graphs"):
        lines.append(_skipped(report, "graphs"))
    lines += ["", "## Timings (ms; bf16; one run, side by side)", "",
              "hbm % = one pass over W and E / time / measured copy bandwidth; model = roofline with the stated "
              "assumptions; model* = the same with the measured bandwidths and GEMM rate.", "",
              "| model | B | pass | path | triton | naive | chunked | sdpa | hbm % | TFLOP/s | model | model* | ideal |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("timings") or []:
        if r.get("skipped"):
            lines.append(f"| {r['model']} | {r['rows']} | {r['pass_name']} | skipped ({r['skipped']}) |||||||||")
            continue
        sdpa = f"{_ms(r.get('sdpa_s'))} ({r['sdpa_backend']})" if r.get("sdpa_s") else ""
        lines.append(f"| {r['model']} | {r['rows']} | {r['pass_name']} | {r.get('kind', '')} | {_ms(r.get('triton_s'))} | "
                     f"{_ms(r.get('naive_s'))} | {_ms(r.get('chunked_s'))} | {sdpa} | "
                     f"{100 * r['hbm_fraction']:.0f} | {r['tflops']:.1f} | {_ms(r['model_s'])} | "
                     f"{_ms(r['model_measured_hw_s'])} | {_ms(r['ideal_s'])} |" if r.get("triton_s") else
                     f"| {r['model']} | {r['rows']} | {r['pass_name']} | {r.get('error', '')[:60]} |||||||||")
    if report.get("sweep"):
        lines += ["", "## Sweep of design choices (side by side; * = the choice in use)", "",
                  "| model | B | pass | setting | choice | ms | roofline ms |", "|---|---|---|---|---|---|---|"]
        for s in report["sweep"]:
            setting = tuple(s["key"]) if s["setting"] == "blocks" else "gemm_chunk (vocabulary rows)"
            choice = tuple(s["choice"]) if s["setting"] == "blocks" else s["choice"]
            lines.append(f"| {s['model']} | {s['rows']} | {s['pass_name']} | {setting} | "
                         f"{choice}{' *' if s['current'] else ''} | "
                         f"{_ms(s.get('seconds')) or s.get('skipped', '') or s.get('error', '')[:60]} | "
                         f"{_ms(s.get('model_s'))} |")
    if report.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def _skipped(report, section):
    return f"skipped: {report.get('skipped', {}).get(section, 'not requested')}"


def run(args) -> dict:
    """Run the requested sections within the budget; returns the report (also written to ``args.out``)."""
    import torch

    from gircse_kernels.triton import roofline as rl

    clock = Clock(args.budget_s)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --device cpu for the interpreter run)")
    report = dict(command=" ".join([os.path.basename(sys.argv[0]) or "gpu_check.py"] + (sys.argv[1:] or [])),
                  budget_s=args.budget_s, environment=environment(device), errors=[], skipped={})
    if "precompile" in args.sections and device == "cuda":
        import triton

        active = triton.runtime.driver.active.get_current_target()
        sms = report["environment"]["sms"]
        calls = {(p, b, v, d, de, tied, "bfloat16", False) for v, d, de, tied in args.model_shapes.values()
                 for b in args.batch_sizes for p in PASSES}
        for name, rows, dtype, tied, mask, bias in correctness_cases(args.model_shapes, args.batch_sizes, args.small):
            vocab, d, de, _ = args.model_shapes[name]
            calls |= {(p, rows, vocab, d, d if tied else de, tied, str(dtype).replace("torch.", ""),
                       bias or mask is not None) for p in ("forward", "full-backward")}
        # then the sweep's tile alternatives (each Triton JIT compile would otherwise eat the sweep's time)
        alternatives = [(c["pass_name"], c["rows"], *c["shape"], "bfloat16", False, (c["key"], choice))
                        for c in sweep_cells(args.model_shapes, sms) if c["setting"] == "blocks"
                        for choice in c["choices"][1:]] if "sweep" in args.sections else []
        target = (active.backend, active.arch, active.warp_size)
        count, failures, seconds = precompile(sorted(calls) + alternatives, target, sms, 0.35 * args.budget_s)
        report["precompile"] = dict(kernels=count, failures=failures, seconds=seconds)
    # Reserve time for the later sections so an early one cannot starve them.
    reserve = {"correctness": 0.55, "graphs": 0.5, "timings": 0.15, "sweep": 0.03}
    calib = None
    if "calibration" in args.sections:
        calib = calibrate(device, args.small)
        report["calibration"] = calib
    hardware_model = rl.H200 if "H100" not in report["environment"].get("gpu", "") else rl.H100
    hardware_measured = calibrated_hardware(calib, report["environment"]) if calib else hardware_model
    if args.small:  # the tiny shapes would not match the real machines' SM counts anyway
        hardware_model = dataclasses.replace(hardware_model, num_sms=4)
        hardware_measured = dataclasses.replace(hardware_measured, num_sms=4)

    if "correctness" in args.sections:
        report["correctness"] = []
        for case in correctness_cases(args.model_shapes, args.batch_sizes, args.small):
            if clock.left() < reserve["correctness"] * args.budget_s:
                report["skipped"]["correctness"] = "budget (some cases)"
                break
            name, rows, dtype, tied, mask, bias = case
            try:
                report["correctness"].append(check_case(name, args.model_shapes[name], rows, dtype, tied, mask, bias,
                                                        device))
            except Exception as exc:  # report and go on: one broken case must not hide the rest
                report["correctness"].append(dict(model=name, rows=rows, dtype=str(dtype), tied=tied, mask=mask,
                                                  ok=False, error=f"{type(exc).__name__}: {exc}"))
                report["errors"].append(traceback.format_exc(limit=3))
    if "graphs" in args.sections:
        if device != "cuda":
            report["skipped"]["graphs"] = "CUDA graphs need a GPU"
        elif clock.left() < reserve["graphs"] * args.budget_s:
            report["skipped"]["graphs"] = "budget"
        else:
            report["graphs"] = []
            first = next(iter(args.model_shapes.values()))
            for check in (lambda: graph_check_op_loop(device, first), lambda: graph_check_generation(device)):
                try:
                    report["graphs"].append(check())
                except Exception as exc:
                    report["graphs"].append(dict(name=getattr(check, "__name__", "graph"), ok=False,
                                                 error=f"{type(exc).__name__}: {exc}"))
    if "timings" in args.sections:
        report["timings"] = timing_rows(args.model_shapes, args.batch_sizes, device, hardware_model,
                                        hardware_measured, clock, reserve["timings"] * args.budget_s)
    if "sweep" in args.sections:
        if clock.left() < reserve["sweep"] * args.budget_s:
            report["skipped"]["sweep"] = "budget"
        else:
            report["sweep"] = sweep(args.model_shapes, device, clock, reserve["sweep"] * args.budget_s, hardware_model)
    report["wall_s"] = clock.elapsed()
    report["ok"] = all(c.get("ok") for c in report.get("correctness", [])) and \
        all(g.get("ok") for g in report.get("graphs") or [])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported
    report = run(args)
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

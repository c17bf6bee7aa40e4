"""Timings: the measurement itself, the calibration of the machine, the roofline's hardware, the timing cells.

How a cell is timed (``measure``, on CUDA events):

* a cell whose data (W, E, inputs, gradients) fits in ``FLUSH_BELOW_L2`` x the L2 (from the device's
  properties) is timed one call per event pair from a **cold L2**: a GPU spin (``torch.cuda._sleep``) lets
  the host queue the flush and the call, then ``FLUSH_BYTES_PER_L2`` x L2 bytes are written, then the call
  runs between its events. Back to back, such a call would find W in L2 (SmolLM2's tied 57 MB W against
  50-60 MB of L2), which the roofline does not assume.
* a shorter call than ``GRAPH_BELOW_S`` is timed as a **CUDA-graph replay of many calls** (about
  ``TARGET_S`` of work), so a 15 us decode step is not the host's ~50 us of Python per call;
* anything longer, one call per event pair (the host runs ahead of the GPU).

Backward cells time the backward alone: the forward runs once, with autograd, and each timed call is
``torch.autograd.grad(..., retain_graph=True)`` from that saved forward. A timing cell runs on a side
stream so that its saved forward and its backward share the stream a capture needs.
"""
from __future__ import annotations

import dataclasses
import math
import time

from .report import sticky_cuda_error

GRAPH_BELOW_S = 200e-6
TARGET_S = 2e-3
MAX_REPS = 200
FLUSH_BELOW_L2 = 2.0
FLUSH_BYTES_PER_L2 = 2.0
SLEEP_CYCLES = 400_000  # ~0.2 ms at 2 GHz: longer than the host needs to queue one call of the op
SAMPLES = 7
GRAPH_POOL_BYTES = 4e9  # at most this many output bytes live in one capture's pool


def measurement_plan(one_call_s: float, data_bytes: float, l2_bytes: float, output_bytes: float) -> tuple[str, int]:
    """("flush" | "graph" | "eager", calls per measurement) for a call of ``one_call_s`` (see the module docstring)."""
    if data_bytes <= FLUSH_BELOW_L2 * l2_bytes:
        return "flush", 1
    if one_call_s >= GRAPH_BELOW_S:
        return "eager", 1
    reps = max(2, min(MAX_REPS, math.ceil(TARGET_S / max(one_call_s, 1e-7)),
                      int(GRAPH_POOL_BYTES // max(output_bytes, 1))))
    return "graph", reps


def _event_pairs(n):
    import torch

    return [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]


def _elapsed(pairs) -> list[float]:
    import torch

    torch.cuda.synchronize()
    return sorted(start.elapsed_time(end) / 1e3 for start, end in pairs)


def _timed_calls(fn, reps: int, samples: int, before=None) -> list[float]:
    """Sorted seconds per call: ``samples`` event pairs around ``reps`` calls each (``before()`` outside them)."""
    pairs = _event_pairs(samples)
    for start, end in pairs:
        if before is not None:
            before()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
    return [t / reps for t in _elapsed(pairs)]


def measure(fn, device, *, data_bytes: float, l2_bytes: float, output_bytes: float, flush=None) -> dict:
    """Seconds per call of ``fn`` (the median) and how they were measured. ``flush()`` evicts L2 (a write of
    ``FLUSH_BYTES_PER_L2`` x L2 bytes); on CPU one wall-clock call, which means nothing but runs the code."""
    if device != "cuda":
        fn()
        start = time.perf_counter()
        fn()
        return dict(seconds=time.perf_counter() - start, method="cpu wall clock, one call")
    import torch

    fn()
    torch.cuda.synchronize()
    one = _timed_calls(fn, 1, 1)[0]
    method, reps = measurement_plan(one, data_bytes, l2_bytes, output_bytes)
    if method == "flush" and flush is not None:
        def cold():
            torch.cuda._sleep(SLEEP_CYCLES)
            flush()
        times = _timed_calls(fn, 1, SAMPLES, before=cold)
        return dict(seconds=times[len(times) // 2], best_s=times[0], method="cold L2, one call per event pair")
    if method == "graph":
        try:
            graph = _capture(fn, reps)
        except Exception as exc:  # some baseline does not capture: many eager calls per event pair instead
            if sticky_cuda_error(exc):
                raise
            times = _timed_calls(fn, reps, SAMPLES)
            return dict(seconds=times[len(times) // 2], best_s=times[0],
                        method=f"eager x{reps} (capture failed: {type(exc).__name__}: {str(exc)[:80]})")
        times = _timed_calls(graph.replay, 1, SAMPLES)
        del graph
        return dict(seconds=times[len(times) // 2] / reps, best_s=times[0] / reps, method=f"graph replay x{reps}")
    times = _timed_calls(fn, 1, SAMPLES)
    return dict(seconds=times[len(times) // 2], best_s=times[0], method="eager, one call per event pair")


def _capture(fn, reps):
    """A CUDA graph of ``reps`` calls of ``fn``, captured on the current stream (a side stream: see ``side_stream``)."""
    import torch

    stream = torch.cuda.current_stream()
    fn()  # warm-up on the capture stream
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(reps):
            fn()
    graph.replay()
    return graph


def side_stream(device):
    """A non-default stream for a timing cell (captures cannot run on the legacy default stream)."""
    import contextlib

    import torch

    if device != "cuda":
        return contextlib.nullcontext()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    return torch.cuda.stream(stream)


def flusher(device, l2_bytes):
    """``flush()``: writes ``FLUSH_BYTES_PER_L2`` x ``l2_bytes`` (None on CPU)."""
    if device != "cuda":
        return None
    import torch

    buffer = torch.empty(int(FLUSH_BYTES_PER_L2 * l2_bytes) // 4 + 1, dtype=torch.float32, device=device)
    return buffer.zero_


# -------------------------------------------------------------------------------------------------
# The machine
# -------------------------------------------------------------------------------------------------
def calibrate(device, small, *, l2_bytes):
    """Measured HBM copy bandwidth (bytes read + written per second), L2 bandwidth (back-to-back copies of a
    buffer that stays in L2, in one graph) and the dense 16-bit GEMM rate (FLOP/s)."""
    import torch

    big = (1 << 20) if small else (1 << 31)  # bytes per buffer
    src = torch.empty(big // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    in_l2 = (1 << 16) if small else min(16 << 20, int(l2_bytes) // 4)
    s2, d2 = src[: in_l2 // 2], dst[: in_l2 // 2]
    copies = 50
    n = 256 if small else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    if device != "cuda":
        def wall(fn):
            fn()
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        return dict(hbm_bytes_per_s=2 * big / wall(lambda: dst.copy_(src)),
                    l2_bytes_per_s=copies * 2 * in_l2 / wall(lambda: [d2.copy_(s2) for _ in range(copies)]),
                    gemm_flops=2 * n**3 / wall(lambda: a @ a))
    dst.copy_(src)
    hbm = 2 * big / _timed_calls(lambda: dst.copy_(src), 1, SAMPLES)[SAMPLES // 2]
    with side_stream(device):
        graph = _capture(lambda: d2.copy_(s2), copies)
        l2 = copies * 2 * in_l2 / _timed_calls(graph.replay, 1, SAMPLES)[SAMPLES // 2]
    a @ a
    gemm = 2 * n**3 / _timed_calls(lambda: a @ a, 1, SAMPLES)[SAMPLES // 2]
    return dict(hbm_bytes_per_s=hbm, l2_bytes_per_s=l2, gemm_flops=gemm)


def device_hardware(env: dict, calib: dict | None, *, small: bool):
    """The roofline's machine for this device: (model, measured). ``model`` takes the stated assumptions of
    ``roofline.H100`` (a GPU named H100) or ``roofline.H200`` with the device's own SM count and L2 size
    (``torch.cuda.get_device_properties``); ``measured`` also takes the calibrated HBM and L2 bandwidths
    and GEMM rate (None without a calibration). --small: 4 SMs, as the interpreter's configurations."""
    from gircse_kernels.triton import roofline as rl

    gpu = env.get("gpu", "")
    base = rl.H100 if "H100" in gpu else rl.H200
    model = dataclasses.replace(base, name=f"{base.name} assumptions" + (f" on {gpu}" if gpu else ""),
                                num_sms=4 if small else env.get("sms", base.num_sms),
                                l2_bytes=int(env.get("l2_bytes") or base.l2_bytes))
    if not calib:
        return model, None
    measured = dataclasses.replace(model, name=f"{gpu or 'this device'} (measured)",
                                   hbm_bytes_per_s=calib["hbm_bytes_per_s"], l2_bytes_per_s=calib["l2_bytes_per_s"],
                                   flops_16bit=calib["gemm_flops"], flops_fp32=calib["gemm_flops"] / 6)
    return model, measured


# -------------------------------------------------------------------------------------------------
# The cells: the Triton op against PyTorch baselines
# -------------------------------------------------------------------------------------------------
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


def naive(h, w, e, b):
    import torch

    return torch.softmax((h @ w.T).float(), -1).to(h.dtype) @ e


def cell_bytes(pass_name, rows, vocab, d, de, tied, size=2) -> tuple[float, float]:
    """(bytes a call must touch, bytes it returns): W and E (once when tied), the rows in and out, and for
    the full backward the weight gradients written."""
    weights = vocab * (d + (0 if tied else de)) * size
    rows_bytes = rows * (d + 2 * de) * size
    if pass_name == "forward":
        return weights + rows_bytes, rows * de * size
    if pass_name == "dh-backward":
        return weights + rows_bytes, rows * d * size
    return 2 * weights + rows_bytes, weights + rows * d * size


def time_cell(vocab, d, de, tied, rows, pass_name, device, *, l2_bytes, flush) -> dict:
    """The Triton op, naive PyTorch (materialized softmax), vocabulary-chunked PyTorch and (forward) SDPA, each
    measured by ``measure``: ``<impl>_s`` seconds, ``methods`` and ``errors`` per implementation."""
    import torch

    from gircse_kernels import soft_token_embedding

    from .oracle import make_inputs

    de = d if tied else de
    h, w, e, b = make_inputs(vocab, d, de, torch.bfloat16, device, rows=rows, tied=tied, bias=False)
    data, output = cell_bytes(pass_name, rows, vocab, d, de, tied)
    out = dict(methods={}, errors={})
    impls = {"triton": lambda *a: soft_token_embedding(*a, backend="triton"), "naive": naive, "chunked": chunked_forward}

    def record(key, fn):
        try:
            result = measure(fn, device, data_bytes=data, l2_bytes=l2_bytes, output_bytes=output, flush=flush)
            out[f"{key}_s"], out["methods"][key] = result["seconds"], result["method"]
        except Exception as exc:  # one baseline that fails (memory, a backend) must not cost the others
            if sticky_cuda_error(exc):
                raise
            out["errors"][key] = f"{type(exc).__name__}: {exc}"[:200]
            if device == "cuda" and isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()

    if pass_name == "forward":
        sdpa_name, sdpa = sdpa_forward(h, w, e, b) if device == "cuda" else (None, None)
        if sdpa is not None:
            impls["sdpa"] = lambda *a: sdpa()
            out["sdpa_backend"] = sdpa_name
        with torch.no_grad():
            for key, fn in impls.items():
                record(key, lambda fn=fn: fn(h, w, e, b))
        return out
    full = pass_name == "full-backward"
    go = torch.randn(rows, de, device=device, dtype=torch.bfloat16)
    hg = h.detach().requires_grad_(True)
    wg = w.detach().requires_grad_(full)
    eg = wg if tied else e.detach().requires_grad_(full)
    leaves = [hg] + ([wg] if full else []) + ([eg] if full and not tied else [])
    # (the chunked baseline's backward is autograd through every chunk: it keeps each chunk's softmax)
    for key, fn in impls.items():
        try:
            saved = fn(hg, wg, eg, None)  # the forward, once: each timed call is the backward alone
        except Exception as exc:
            if sticky_cuda_error(exc):
                raise
            out["errors"][key] = f"forward: {type(exc).__name__}: {exc}"[:200]
            continue
        record(key, lambda saved=saved: torch.autograd.grad(saved, leaves, go, retain_graph=True))
        del saved
    return out

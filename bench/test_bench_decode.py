"""Cached-decoding benchmark: one soft-token step (the op, no grad) at small batch sizes.

At B = 1..64 a step costs one read of W and E, so the figure of merit is bandwidth: bytes the step
must read / time, compared with a plain copy of the same W (and E) measured in the same run. On a GPU
this runs the Triton kernels (split-V configuration); on CPU the C++ path (``backend="auto"``).
Writes ``bench/results/decode_<device>.md``.
"""
from __future__ import annotations

import os
import time

import torch

from gircse_kernels import resolve_backend, soft_token_embedding
from gircse_kernels.triton_config import choose_config, num_sms

SHAPES = [(49152, 576), (151936, 896)]  # SmolLM2-135M, Qwen2-0.5B (both tied)
BATCHES = [1, 4, 16, 64]
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _time(fn, device, reps):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return best
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def test_decode_step_bandwidth(machine):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "triton" if device.type == "cuda" else "auto"
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.bfloat16, torch.float32]
    reps = 20 if device.type == "cuda" else 5
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine
    lines = [f"# Decode step (one soft token, no grad), tied weights: {name}", "",
             "bytes = what the step must read (W once, tied; hidden; output); copy = `dst.copy_(W)` "
             "timed in the same run (read + write, so its bandwidth counts 2x the bytes).", "",
             "| dtype | V | d | B | config | step ms | GB/s | copy GB/s | fraction of copy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dtype in dtypes:
        for vocab, d in SHAPES:
            g = torch.Generator().manual_seed(0)
            weight = (torch.randn(vocab, d, generator=g) / d ** 0.5).to(device=device, dtype=dtype)
            dst = torch.empty_like(weight)
            copy_s = _time(lambda: dst.copy_(weight), device, reps)
            copy_bw = 2 * weight.numel() * weight.element_size() / copy_s
            for rows in BATCHES:
                hidden = torch.randn(rows, d, generator=g).to(device=device, dtype=dtype)
                with torch.no_grad():
                    out = soft_token_embedding(hidden, weight, weight, backend=backend)
                    assert torch.isfinite(out).all()
                    seconds = _time(lambda: soft_token_embedding(hidden, weight, weight, backend=backend),
                                    device, reps)
                size = weight.element_size()
                moved = vocab * d * size + 2 * rows * d * size
                config = f"backend {resolve_backend(backend, device)[0]}"
                if device.type == "cuda":
                    cfg = choose_config(rows, vocab, d, d, dtype, num_sms(device))
                    config = f"{cfg.kind} M{cfg.block_m} x{cfg.num_splits} splits"
                bw = moved / seconds
                lines.append(f"| {str(dtype).replace('torch.', '')} | {vocab} | {d} | {rows} | {config} | "
                             f"{seconds * 1e3:.2f} | {bw / 1e9:.1f} | {copy_bw / 1e9:.1f} | {bw / copy_bw:.2f} |")
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"decode_{device.type}.md"), "w") as f:
        f.write(report)

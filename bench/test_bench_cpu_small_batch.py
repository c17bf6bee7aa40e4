"""Small batches on CPU: the C++ streaming path against the C++ tile path and the naive formula.

Run: ``pytest bench/test_bench_cpu_small_batch.py -q -s``. Writes ``bench/results/cpu_op_small_batch.md``.

Cached decoding embeds one soft token per sequence per step, so B is the number of sequences being
encoded together: 1 for a single query, a handful for a small request. The C++ backend has two
paths (``csrc/soft_token_embedding.cpp``): tile GEMMs through ATen/oneDNN, and for B <=
``stream_rows`` a streaming pass that reads each W / E row once. This report measures both, side by
side in one run, over B in {1, 2, 4, 8, 16}, and shows where the automatic threshold
(``stream_rows=-1``) sits; it is how that threshold was chosen. Tied weights, no bias, T = 1;
forward (no grad) and forward+backward (``out.backward(g)``, only ``h`` requires grad). Best of 5
calls after a warmup. No timing is asserted; the two paths' outputs are checked against each other.
"""
from __future__ import annotations

import pathlib

import pytest
import torch

from bench.conftest import best_of, machine_description
from gircse_kernels import cpu, soft_token_embedding

SHAPES = [(49152, 576), (151936, 896)]
BATCHES = [1, 2, 4, 8, 16]
RESULTS = pathlib.Path(__file__).parent / "results" / "cpu_op_small_batch.md"


def naive(h, w):
    return torch.softmax(h @ w.T, dim=-1) @ w


def cpu_path(stream_rows):
    def run(h, w):
        old = cpu.STREAM_ROWS
        cpu.STREAM_ROWS = stream_rows
        try:
            return soft_token_embedding(h, w, w, backend="cpu")
        finally:
            cpu.STREAM_ROWS = old
    return run


METHODS = {"naive": naive, "tiles": cpu_path(0), "stream": cpu_path(16), "auto": cpu_path(-1)}


def _timings(fn, h, w, g):
    with torch.no_grad():
        fwd = best_of(lambda: fn(h, w), reps=5)[0]

    def fwd_bwd():
        x = h.detach().requires_grad_(True)
        fn(x, w).backward(g)

    return fwd, best_of(fwd_bwd, reps=5)[0]


@pytest.mark.skipif(not cpu.available(), reason="C++ extension unavailable")
def test_bench_cpu_small_batch():
    torch.manual_seed(0)
    lines = [
        "# C++ CPU path at small batch: streaming vs tile GEMMs",
        "",
        f"Machine: {machine_description()}. `pytest "
        "bench/test_bench_cpu_small_batch.py -q -s`; best of 5 after a warmup, ms. `auto / naive` is the "
        "backend's default choice over the naive formula (forward; forward+backward).",
        "",
        "| dtype | V | d | B | naive fwd | tiles fwd | stream fwd | auto fwd | naive fwd+bwd | tiles fwd+bwd"
        " | stream fwd+bwd | auto fwd+bwd | auto / naive |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype in (torch.bfloat16, torch.float32):
        for vocab, d in SHAPES:
            w = (torch.randn(vocab, d) / d ** 0.5).to(dtype)
            for rows in BATCHES:
                h, g = torch.randn(rows, d).to(dtype), torch.randn(rows, d).to(dtype)
                with torch.no_grad():
                    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
                    torch.testing.assert_close(METHODS["stream"](h, w).float(), METHODS["tiles"](h, w).float(),
                                               rtol=tol, atol=tol)
                t = {name: _timings(fn, h, w, g) for name, fn in METHODS.items()}
                cells = [f"{t[m][0] * 1e3:.1f}" for m in METHODS] + [f"{t[m][1] * 1e3:.1f}" for m in METHODS]
                ratio = f"{t['auto'][0] / t['naive'][0]:.2f}; {t['auto'][1] / t['naive'][1]:.2f}"
                lines.append(f"| {str(dtype).replace('torch.', '')} | {vocab} | {d} | {rows} | "
                             + " | ".join(cells) + f" | {ratio} |")
                print(lines[-1], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")

"""Benchmark of the C++ CPU path of ``softmax(h W^T) E`` against plain-PyTorch formulations.

Run: ``pytest bench/test_bench_cpu_op.py -q -s`` (or a part: ``-k bf16``, ``-k "fp32 and V49152"``).
Prints a table per (dtype, shape) and writes it into ``bench/results/cpu_op.md`` (each replaces its
own section).
No timing is asserted; the outputs of the C++ path are checked against the naive formula.

Methods (tied weights E = W, as in SmolLM2 / Qwen2, no bias, temperature 1):
    naive    ``torch.softmax(h @ W.T, -1) @ W`` in the inputs' dtype (materializes [B, V])
    sdpa     ``F.scaled_dot_product_attention(h, W, W, scale=1)`` (one query block per B rows)
    chunked  online softmax over 8192-row vocabulary chunks in PyTorch (GEMMs in the inputs' dtype,
             fp32 running max / sum / accumulator)
    cpu      ``soft_token_embedding(..., backend="cpu")`` (gircse_kernels._C)
Forward+backward: ``out.backward(g)`` with only ``h`` requiring grad (d hidden), naive autograd vs cpu.

Timing is the best of 3 calls after a warmup, except for shapes whose forward exceeds ~40 GFLOP-
equivalents (marked ``*``): one cold call, to keep the run within a few minutes. SDPA is skipped at
the largest shape (it is the slowest baseline there and would take most of the run).
"""
from __future__ import annotations

import pathlib
import re

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import best_of, bf16_gemm_peak_tflops, machine_description, peak_memory_supported
from gircse_kernels import cpu, soft_token_embedding

SHAPES = [(49152, 576), (151936, 896)]
BATCHES = [1, 64, 256, 1024]
AMX_TFLOPS = 2.07  # the AMX bf16 GEMM rate the targets were set against (Sapphire Rapids)
RESULTS = pathlib.Path(__file__).parent / "results" / "cpu_op.md"


def naive(h, w):
    return torch.softmax(h @ w.T, dim=-1) @ w


def sdpa(h, w):
    return F.scaled_dot_product_attention(h[None, None], w[None, None], w[None, None], scale=1.0)[0, 0]


def chunked(h, w, chunk=8192):
    rows = h.shape[0]
    acc = torch.zeros(rows, w.shape[1])
    run_max = torch.full((rows, 1), float("-inf"))
    run_sum = torch.zeros(rows, 1)
    for lo in range(0, w.shape[0], chunk):
        tile = w[lo:lo + chunk]
        z = (h @ tile.T).float()
        new_max = torch.maximum(run_max, z.amax(dim=1, keepdim=True))
        rescale = torch.exp(run_max - new_max)
        p = torch.exp(z - new_max)
        run_sum = run_sum * rescale + p.sum(dim=1, keepdim=True)
        acc = acc * rescale + (p.to(h.dtype) @ tile).float()
        run_max = new_max
    return (acc / run_sum).to(h.dtype)


def cpu_op(h, w):
    return soft_token_embedding(h, w, w, backend="cpu")


def fwd_bwd(fn, h, w, g):
    def run():
        x = h.detach().requires_grad_(True)
        fn(x, w).backward(g)
        return x.grad
    return run


def _fmt(seconds, mib):
    if seconds is None:
        return "skipped"
    return f"{seconds * 1e3:.1f} ms" + ("" if mib is None else f" ({mib:.0f} MiB)")


def _write_section(name: str, text: str) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = RESULTS.read_text() if RESULTS.exists() else "# C++ CPU path of the op: benchmark\n"
    begin, end = f"<!-- {name} begin -->", f"<!-- {name} end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old:
        new = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(new)


@pytest.mark.skipif(not cpu.available(), reason="C++ extension unavailable")
@pytest.mark.parametrize("shape", SHAPES, ids=[f"V{v}-d{d}" for v, d in SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_bench_cpu_op(dtype, shape):
    torch.manual_seed(0)
    name = ("bf16" if dtype == torch.bfloat16 else "fp32") + f", V={shape[0]}, d={shape[1]}"
    peak = bf16_gemm_peak_tflops()
    lines = [
        f"## {name}",
        "",
        f"Machine: {machine_description()}. Measured bf16 GEMM rate of this machine: {peak:.3f} TFLOP/s.",
        "Peak extra memory: " + ("VmHWM - VmRSS per call (see bench/conftest.py)." if peak_memory_supported()
                                 else "not measurable here."),
        "`*`: one cold call instead of best of 3 after warmup.",
        "",
        "| B | V | d | naive | SDPA | chunked | cpu | cpu / best | fwd+bwd naive | fwd+bwd cpu | fwd+bwd ratio"
        " | AMX-limit fraction | fraction of this machine's GEMM rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for vocab, d in [shape]:
        w = (torch.randn(vocab, d) / d ** 0.5).to(dtype)
        for rows in BATCHES:
            h = torch.randn(rows, d).to(dtype)
            g = torch.randn(rows, d).to(dtype)
            flops = 4 * rows * vocab * d
            heavy = flops * (3 if dtype == torch.float32 else 1) > 40e9
            reps, warm = (1, False) if heavy else (3, True)
            with torch.no_grad():
                out = cpu_op(h, w)
                if rows <= 64:  # correctness of the measured path (cheap shapes only)
                    ref = naive(h.float(), w.float()).to(dtype)
                    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
                    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
                del out
                res = {"naive": best_of(lambda: naive(h, w), reps, warm),
                       "chunked": best_of(lambda: chunked(h, w), reps, warm),
                       "cpu": best_of(lambda: cpu_op(h, w), reps, warm)}
                big = (rows, vocab) == (BATCHES[-1], SHAPES[-1][0])
                res["sdpa"] = (None, None) if big else best_of(lambda: sdpa(h, w), reps, warm)
            fb_naive = best_of(fwd_bwd(naive, h, w, g), reps, warm)
            fb_cpu = best_of(fwd_bwd(cpu_op, h, w, g), reps, warm)
            best = min(res[k][0] for k in ("naive", "sdpa", "chunked") if res[k][0] is not None)
            t_cpu = res["cpu"][0]
            amx = f"{flops / (AMX_TFLOPS * 1e12) / t_cpu:.2f}" if dtype == torch.bfloat16 else "n/a"
            machine_frac = flops / (peak * 1e12) / t_cpu if dtype == torch.bfloat16 else None
            lines.append(
                f"| {rows}{'*' if heavy else ''} | {vocab} | {d} | {_fmt(*res['naive'])} | "
                f"{_fmt(*res['sdpa'])} | "
                f"{_fmt(*res['chunked'])} | {_fmt(*res['cpu'])} | {t_cpu / best:.2f} | {_fmt(*fb_naive)} | "
                f"{_fmt(*fb_cpu)} | {fb_cpu[0] / fb_naive[0]:.2f} | {amx} | "
                f"{'n/a' if machine_frac is None else f'{machine_frac:.2f}'} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    _write_section(name, text)

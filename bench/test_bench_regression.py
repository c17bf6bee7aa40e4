"""Headline timings through pytest-benchmark, to compare commits on one machine.

The report's other sections time methods round robin inside one test, which pytest-benchmark (one
timed callable per test) cannot do; these few single-callable figures are where it fits:
``pytest bench/test_bench_regression.py --benchmark-autosave`` stores them under ``.benchmarks/``
and ``--benchmark-compare`` sets a later run against the stored one. Each is checked first, like
every benchmark, and also lands in the report's last section.
"""
from __future__ import annotations

import pytest
import torch

from bench.checks import MODEL_REL_TOL, check_close
from bench.test_bench_model import encoder, real_token_batch
from bench.test_bench_op import SHAPES, make_inputs, truth
from gircse.generation import generate_soft_tokens_uncached, pool_steps
from gircse_kernels import soft_token_embedding

ROUNDS = {"quick": 2, "default": 3, "full": 10}


def grid_headline_config(size, device):
    return [("op-forward", "smollm2-135m", "bf16", 1), ("op-forward", "smollm2-135m", "fp32", 64),
            ("encode", "gircse-k5", "fp32", 8 if size != "quick" else 2)]


def _table(report):
    section = report.section(
        "regression", "Headline timings (pytest-benchmark)",
        "Single-callable figures timed by pytest-benchmark (`benchmark.pedantic`, fixed rounds after one "
        "warmup round); `--benchmark-autosave` / `--benchmark-compare` track them across commits.")
    return section.tables[0] if section.tables else section.table("headline", "Headline timings", [
        ("what", "what"), ("shape", "shape"), ("dtype", "dtype"), ("B", "B", "int"), ("min", "min ms", "ms"),
        ("mean", "mean ms", "ms"), ("stddev", "stddev ms", "ms"), ("rounds", "rounds", "int")])


def test_headline(headline_config, benchmark, report, size, device, request):
    what, shape_name, dtype_name, rows = headline_config
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if what == "encode":
        model = request.getfixturevalue("smollm2")
        ids = real_token_batch(model.tokenizer, rows, 64 if size != "quick" else 16, model.device)
        fn = encoder(model, "gircse", ids, 5)
        with torch.inference_mode():
            oracle = pool_steps(generate_soft_tokens_uncached(model.model, None, ids, torch.ones_like(ids), 5))
        check_close(report, "regression", f"{what} cached vs uncached", fn(), oracle,
                    rel_tol=MODEL_REL_TOL[oracle.dtype])
    else:
        shape = SHAPES[shape_name]
        h, w, e, dout = make_inputs(shape, dtype, rows, device)

        def fn():
            with torch.no_grad():
                return soft_token_embedding(h, w, e)
        ref, _ = truth("fwd", h, w, e, dout)
        with torch.no_grad():
            check_close(report, "regression", f"{what} {shape_name} {dtype_name} B={rows}", fn(), ref, dtype=dtype,
                        baseline=torch.softmax(h @ w.T, -1) @ e)
    benchmark.extra_info.update(shape=shape_name, dtype=dtype_name, B=rows)
    benchmark.pedantic(fn, rounds=ROUNDS[size], warmup_rounds=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None:  # --benchmark-disable
        pytest.skip("pytest-benchmark is disabled: nothing timed")
    _table(report).add(what=what, shape=shape_name, dtype=dtype_name, B=rows, min=stats.min, mean=stats.mean,
                       stddev=stats.stddev, rounds=stats.rounds)

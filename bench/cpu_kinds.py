"""The C++ backend as other CPU kinds run it, emulated on this CPU (issue 13).

The machines this project runs on change between sessions (AVX2-only, AVX512 without BF16,
AVX512-BF16, AMX). A CPU can imitate the kinds *below* it: every library involved caps its
instruction set by an environment variable read at start-up, so a fresh interpreter started with

* ``ATEN_CPU_CAPABILITY``: torch's own kernels (and what ``get_cpu_capability()`` reports),
* ``ONEDNN_MAX_CPU_ISA``: oneDNN, hence torch's bf16 matmul and our bf16 brgemm engine (whose
  start-up probe then fails, so the backend picks upcast fp32 tiles by itself),
* ``MKL_ENABLE_INSTRUCTIONS``: MKL's fp32 GEMMs (the peers' and our fp32 engine's),
* ``GIRCSE_CPU_ISA``: our streaming pass's vector clone (it reads CPUID, not the variables above),

runs the code an AVX2-only CPU runs: torch's bf16 matmul falls back to its scalar loop there too
(~0.6 GFLOP/s on the AVX512-BF16 EPYC, as on the real AVX2-only EPYC). The clock, caches and memory
are this machine's, so the figures are the *path's*, not that CPU's; ratios measured side by side
inside one emulated process are what the report shows.

``python -m bench.cpu_kinds --size default`` (with the variables set) prints one JSON object:
``capabilities``, ``plans`` and ``rows`` (one per shape, B and pass: times in seconds, relative
errors of our op against the reference); :func:`run_kind` starts it with a kind's caps.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

# What an emulated kind sets (values for the libraries' variables, see the module docstring).
KINDS = {
    "native": {},
    "avx512-no-bf16": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
                       "GIRCSE_CPU_ISA": "avx512"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "GIRCSE_CPU_ISA": "avx2"},
}
# The CPU flags a kind needs from the host (an emulation only removes instructions).
NEEDS = {"native": (), "avx512-no-bf16": ("avx512f", "avx512bw", "avx512vl"), "avx2": ("avx2", "fma")}
PASSES = ("fwd", "fwd+bwd dh")
# bf16 peers run torch's bf16 matmul, the scalar fallback on AVX2: seconds per call beyond B = 2.
BF16_PEER_MAX_ROWS = 2


def grid(size: str) -> list[tuple[str, int]]:
    if size == "quick":
        return [("tiny", 1), ("tiny", 8)]
    if size == "default":
        return [("smollm2-135m", 1), ("smollm2-135m", 64)]
    return [("smollm2-135m", b) for b in (1, 8, 64, 512)] + [("qwen2.5-0.5b", b) for b in (1, 64)]


def measure(size: str) -> dict:
    from bench.harness import time_methods
    from bench.checks import relative_error
    from bench.test_bench_op import REPS, SHAPES, backend_op, chunked, make_inputs, naive, pass_fn, truth
    from gircse_kernels import cpu

    result = {"capabilities": cpu.capabilities(), "torch_threads": torch.get_num_threads(), "plans": {}, "rows": []}
    op = backend_op("cpu")
    for shape_name, rows in grid(size):
        shape = SHAPES[shape_name]
        inputs = {name: make_inputs(shape, dtype, rows, torch.device("cpu"))
                  for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            result["plans"][f"{shape_name} {name} B={rows}"] = {
                p: cpu.plan(rows, shape[0], shape[1], shape[2], dtype, backward=p == "bwd") for p in ("fwd", "bwd")}
        for pass_ in PASSES:
            methods = {"op_bf16": pass_fn(op, pass_, *inputs["bf16"]), "op_fp32": pass_fn(op, pass_, *inputs["fp32"]),
                       "naive_fp32": pass_fn(naive, pass_, *inputs["fp32"]),
                       "chunked_fp32": pass_fn(chunked, pass_, *inputs["fp32"])}
            if rows <= BF16_PEER_MAX_ROWS:
                methods["naive_bf16"] = pass_fn(naive, pass_, *inputs["bf16"])
                methods["chunked_bf16"] = pass_fn(chunked, pass_, *inputs["bf16"])
            errors = {}
            for name in ("bf16", "fp32"):
                ref_out, ref_grads = truth(pass_, *inputs[name])
                out, grads = methods[f"op_{name}"]()
                errors[f"op_{name} out"] = relative_error(out, ref_out)
                for g, ref in ref_grads.items():
                    errors[f"op_{name} {g}"] = relative_error(grads[g], ref)
            timed = time_methods(methods, reps=REPS[size])
            result["rows"].append({"shape": shape_name, "B": rows, "pass": pass_, "errors": errors,
                                   "seconds": {n: m.seconds for n, m in timed.items()}})
    return result


def run_kind(kind: str, size: str) -> dict:
    """:func:`measure` in a fresh interpreter with ``kind``'s caps set (the libraries read them at start-up)."""
    import os
    import subprocess

    from bench.harness import REPO

    env = dict(os.environ, **KINDS[kind], PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench.cpu_kinds", "--size", size], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.cpu_kinds ({kind}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("quick", "default", "full"), default="default")
    args = parser.parse_args(argv)
    json.dump(measure(args.size), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

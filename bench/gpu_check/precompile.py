"""Parallel ahead-of-time compilation of every Triton launch the run will make (the JIT compiles one by one,
on first use): planned on meta tensors with the JIT's exact specialization, compiled by worker processes
into Triton's on-disk cache, which the run's JIT then finds."""
from __future__ import annotations

import os
import time
from typing import NamedTuple

from .sweep import overriding


class PlannedCall(NamedTuple):
    """One call of the op to plan: ``blocks`` plans it under a sweep alternative ``(BLOCKS key, choice)``."""
    pass_name: str
    rows: int
    vocab: int
    d: int
    de: int
    tied: bool
    dtype: str
    bias: bool
    blocks: tuple | None = None
    batch_invariant: bool = False


def planned_launches(pass_name, rows, vocab, d, de, tied, dtype_name, bias, sms, upcast=False, blocks=None,
                     batch_invariant=False):
    """The Triton launches one call of the op makes (meta tensors; the GEMM path's per-chunk kernels
    included), so their exact JIT specializations can be compiled ahead, in parallel. ``blocks``: plan
    under a sweep alternative instead, ``(BLOCKS key, choice)`` (see ``sweep.overriding``)."""
    with overriding(blocks=blocks):
        return _planned_launches(pass_name, rows, vocab, d, de, tied, dtype_name, bias, sms, upcast, batch_invariant)


def _planned_launches(pass_name, rows, vocab, d, de, tied, dtype_name, bias, sms, upcast, batch_invariant):
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
    cfg = host.config_for(hidden, weight, embed, sms=sms, batch_invariant=batch_invariant)
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
    common = dict(tied=tied, upcast=upcast, sms=sms, batch_invariant=batch_invariant, **kw)
    if pass_name == "forward":
        return host.forward_launches(hidden, weight, embed, b, torch.empty(rows, de, **f32), lse, **common)
    full = pass_name == "full-backward"
    return host.backward_launches(grad_out, hidden, weight, embed, b, lse, lse, need_hidden=True,
                                  need_weight=full, need_embed=full, need_bias=full and bias,
                                  merge_tied_grads=full and tied, grad_filter_eps=0.0, **common)[0]


def _compile_planned(job):
    """Worker: compile one planned launch for the device's target (fills Triton's on-disk cache)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gircse_kernels.triton.aot import jit_specialization

    call, sms, index, (backend, arch, warp) = job
    launch = planned_launches(*call[:8], sms, blocks=call.blocks, batch_invariant=call.batch_invariant)[index]
    signature, constexprs, attrs = jit_specialization(launch)
    try:
        triton.compile(ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget(backend, arch, warp),
                       options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
        return None
    except Exception as exc:  # the JIT will compile it on first use instead
        return f"{launch.name}: {type(exc).__name__}: {str(exc)[:200]}"


def precompile(calls, target, sms, budget_s):
    """Compile every distinct launch of ``calls`` (``PlannedCall``s, or tuples of their fields) in parallel
    processes, in order; returns (distinct kernels, failures, seconds). Past ``budget_s`` the workers are
    killed and the rest is left to the JIT."""
    import concurrent.futures
    import multiprocessing

    from gircse_kernels.triton.aot import jit_specialization

    start = time.perf_counter()
    jobs, seen = [], set()
    for call in map(lambda c: PlannedCall(*c), calls):
        for index, launch in enumerate(planned_launches(*call[:8], sms, blocks=call.blocks,
                                                        batch_invariant=call.batch_invariant)):
            sig, const, attrs = jit_specialization(launch)
            key = (launch.name, str(sig), str(sorted(map(str, const.items()))), str(attrs), launch.num_warps,
                   launch.num_stages)
            if key not in seen:
                seen.add(key)
                jobs.append((call, sms, index, target))
    failures = []
    workers = max(1, min(16, (os.cpu_count() or 2) - 1))
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = [pool.submit(_compile_planned, job) for job in jobs]
        for future in futures:
            try:
                error = future.result(timeout=max(budget_s - (time.perf_counter() - start), 0.1))
            except concurrent.futures.TimeoutError:
                failures.append(f"precompile budget ({budget_s:.0f} s) exhausted: the rest is left to the JIT")
                for process in list(getattr(pool, "_processes", {}).values()):
                    process.kill()
                break
            except Exception as exc:  # a worker that died (out of memory, a crash in the compiler)
                error = f"{type(exc).__name__}: {str(exc)[:200]}"
            if error:
                failures.append(error)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return len(jobs), failures, time.perf_counter() - start

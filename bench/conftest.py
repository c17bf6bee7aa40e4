"""Shared helpers of the benchmarks (``pytest bench -q -s``): timing and peak extra memory on CPU.

Timing: :func:`best_of` -- optional warmup call, then the best (minimum) wall time of ``reps`` calls.

Peak extra memory: torch has no CPU allocator statistics, so :func:`measure` uses the kernel's peak
resident-set size. Before each call it resets the process high-water mark (``echo 5 >
/proc/self/clear_refs``, Linux >= 4.0) and reads ``VmRSS``; after the call ``VmHWM - VmRSS_before``
is the peak memory the call added (its temporaries and outputs), at page granularity, across all
threads (a Python dispatch-mode tracker would miss tensors created in C++ worker threads). For this
to be honest freed memory must leave the process, so at import glibc is told (``mallopt``) to serve
every allocation >= 64 KiB by ``mmap`` (returned to the OS on free) and to trim the heap eagerly;
otherwise a buffer freed by an earlier run would be reused without raising the RSS.
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import time

import pytest
import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
try:
    _libc = ctypes.CDLL("libc.so.6")
    MALLOC_TUNED = bool(_libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)) and bool(
        _libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024))
except OSError:
    MALLOC_TUNED = False

_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_supported() -> bool:
    return MALLOC_TUNED and os.path.exists(_CLEAR_REFS) and os.access(_CLEAR_REFS, os.W_OK)


def measure(fn) -> tuple[float, float | None]:
    """Run ``fn()`` once: (seconds, peak extra MiB or None when unsupported). The result is dropped."""
    gc.collect()
    tracked = peak_memory_supported()
    if tracked:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    extra = (_status_kib("VmHWM") - before) / 1024.0 if tracked else None
    del out
    return seconds, extra


def best_of(fn, reps: int = 3, warmup: bool = True) -> tuple[float, float | None]:
    """(best seconds of ``reps`` calls, largest peak extra MiB seen), after an optional warmup call."""
    if warmup:
        fn()
    times, peaks = [], []
    for _ in range(reps):
        seconds, extra = measure(fn)
        times.append(seconds)
        if extra is not None:
            peaks.append(extra)
    return min(times), (max(peaks) if peaks else None)


def machine_description() -> str:
    model = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", "unknown CPU", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = ", ".join(x for x in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if x in flags) or "?"
    return (f"{model}, {os.cpu_count()} logical CPUs ({isa}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def bf16_gemm_peak_tflops() -> float:
    """This machine's measured bf16 GEMM rate (TFLOP/s): best of 3 of a 1024x896 @ 896x8192 matmul."""
    a = torch.randn(1024, 896).bfloat16()
    b = torch.randn(8192, 896).bfloat16()
    seconds, _ = best_of(lambda: a @ b.T, reps=3)
    return 2 * 1024 * 896 * 8192 / seconds / 1e12


@pytest.fixture(scope="session")
def machine():
    return machine_description()

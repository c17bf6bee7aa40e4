"""Timing, peak memory and machine description for the benchmarks (``pytest bench/``).

Timing (:func:`time_methods`): the methods being compared are run **round robin** -- warmup of each,
then ``reps`` rounds that call every method once -- and each method's figure is its best (minimum)
time. On a shared or drifting machine this keeps a ratio honest: both sides saw the same conditions.
CUDA calls are timed with events after a synchronize. Each measurement also records the process'
CPU time over wall time (``cpu_busy``, in cores): on an idle machine a multi-threaded CPU kernel
keeps it near the thread count; far below means the process was waiting (other load, I/O).

Peak extra memory on CPU: torch has no CPU allocator statistics, so one extra call per method
(after the warmup, before the timed rounds) reads the kernel's peak resident-set size: it resets
the process high-water mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and reads ``VmRSS``;
after the call ``VmHWM - VmRSS_before`` is the peak memory the call added (its temporaries and
outputs), at page granularity, across all threads (a Python dispatch-mode tracker would miss
tensors created in C++ worker threads). For this to be honest freed memory must leave the process,
so for that call glibc is told (``mallopt``) to serve every allocation >= 64 KiB by ``mmap``
(returned to the OS on free) and to trim the heap eagerly; otherwise a buffer freed by an earlier
run would be reused without raising the RSS. The timed calls run with glibc's steady-state
thresholds instead (32 MiB mmap, 64 MiB trim): serving every buffer by fresh ``mmap`` pages costs a
page fault per 4 KiB touched and would penalize allocation-heavy code (e.g. a ``torch.cat`` per
step) far beyond what a user sees. On CUDA: ``torch.cuda.max_memory_allocated`` above what was
allocated before the call.
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime
import gc
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:
    _libc = None
# (mmap threshold, trim threshold): "measure" returns freed buffers to the OS at once; "time" is
# glibc's steady state (its dynamic thresholds stop growing at 32 MiB / 64 MiB on 64-bit).
_MALLOC_MODES = {"measure": (64 * 1024, 128 * 1024), "time": (32 * 2**20, 64 * 2**20)}


def _malloc_mode(mode: str) -> bool:
    """Set glibc's thresholds for ``mode``; False where that is impossible (not glibc)."""
    if _libc is None:
        return False
    mmap, trim = _MALLOC_MODES[mode]
    return bool(_libc.mallopt(_M_MMAP_THRESHOLD, mmap)) and bool(_libc.mallopt(_M_TRIM_THRESHOLD, trim))


MALLOC_TUNED = _malloc_mode("time")

_CLEAR_REFS = "/proc/self/clear_refs"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_supported(device: torch.device | str = "cpu") -> bool:
    if torch.device(device).type == "cuda":
        return True
    return MALLOC_TUNED and os.path.exists(_CLEAR_REFS) and os.access(_CLEAR_REFS, os.W_OK)


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """What a benchmark may still allocate: free memory of the GPU, or the kernel's MemAvailable on
    CPU; None where it is unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclasses.dataclass
class Measurement:
    """One method's figures: best wall seconds of its timed calls, the peak extra MiB of its memory
    call (None when not measurable), and process CPU seconds / wall seconds of the best call."""

    seconds: float
    peak_mib: float | None
    cpu_busy: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn, device: torch.device) -> tuple[float, float | None]:
    """(wall seconds, process CPU seconds / wall seconds) of one call; CUDA: event time, no CPU figure."""
    if device.type == "cuda":
        synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        synchronize(device)
        del out
        return start.elapsed_time(end) / 1e3, None
    cpu0, start = time.process_time(), time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    del out
    return seconds, (cpu / seconds if seconds > 0 else None)


def peak_extra_mib(fn, device: torch.device | str = "cpu") -> float | None:
    """Peak memory one call of ``fn()`` adds above what was held before it (see the module
    docstring); None where it cannot be measured. The result is dropped."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        synchronize(device)
        del out
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not peak_memory_supported(device) or not _malloc_mode("measure"):
        return None
    try:
        gc.collect()
        # Hand the free memory the timed calls left in glibc's heaps back to the OS, so the call
        # cannot reuse it without raising the RSS.
        _libc.malloc_trim(0)
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        out = fn()
        extra = (_status_kib("VmHWM") - before) / 1024.0
        del out
    finally:
        _malloc_mode("time")
    return max(extra, 0.0)  # RSS accounting lags by a few pages; a call adds no negative memory


def time_methods(methods: dict[str, Callable], *, reps: int = 3, warmup: bool = True,
                 device: torch.device | str = "cpu") -> dict[str, Measurement]:
    """Round-robin timing of several methods (see the module docstring): ``{name: Measurement}``
    with each method's best time, its peak extra memory, and the CPU busy-ness of its best call.

    Calls per method: one warmup (``warmup=True``), one memory call, ``reps`` timed calls. The memory
    call precedes the timed ones, so with ``warmup=False`` (for calls of seconds, whose one-time
    costs are negligible) it doubles as the warmup."""
    device = torch.device(device)
    if warmup:
        for fn in methods.values():
            fn()
        synchronize(device)
    peaks = {name: peak_extra_mib(fn, device) for name, fn in methods.items()}
    runs: dict[str, list[tuple[float, float | None]]] = {name: [] for name in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            runs[name].append(_timed_call(fn, device))
    best = {name: min(times, key=lambda t: t[0]) for name, times in runs.items()}
    return {name: Measurement(best[name][0], peaks[name], best[name][1]) for name in methods}


def measure_machine(dtype: torch.dtype, device: torch.device | str = "cpu", *, size: int = 2048,
                    read_bytes: int = 512 << 20):
    """What this machine sustains now, for ``gircse.cost``'s roofline: the best of 3 timed calls of a
    ``size``-cubed matrix product in ``dtype`` (FLOP/s; CPU: on all of torch's threads) and of a sum over
    a ``read_bytes`` tensor (bytes/s read; a sum reads each byte once and writes nothing)."""
    from gircse.cost import Machine

    device = torch.device(device)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    big = torch.ones(read_bytes // 4, dtype=torch.float32, device=device)
    timed = time_methods({"gemm": lambda: a @ b, "read": lambda: big.sum()}, reps=3, device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpuinfo()[0]
    return Machine(f"{name}, {str(dtype).replace('torch.', '')}", 2 * size ** 3 / timed["gemm"].seconds,
                   read_bytes / timed["read"].seconds)


# ---------------------------------------------------------------------- the machine
def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return model or platform.processor() or "unknown CPU", flags


CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - an optional package that is absent or broken
        return None


def environment() -> dict:
    """Everything the figures depend on: CPU model, flags, cores, torch threads and CPU capability,
    GPU, library versions, date, git commit."""
    model, flags = _cpuinfo()
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu_model": model,
        "cpu_flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags],
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


def machine_slug(env: dict | None = None) -> str:
    """Directory name for a machine's results, e.g. ``cpu-amd-epyc-avx512bf16-2c`` or
    ``cuda-nvidia-h200``: runs on different machines never overwrite each other."""
    env = env or environment()
    if env.get("gpu"):
        base = "cuda-" + env["gpu"]
    else:
        isa = ("amx" if "amx_bf16" in env["cpu_flags"] else "avx512bf16" if "avx512_bf16" in env["cpu_flags"]
               else (env.get("cpu_capability") or "").lower())
        model = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*|\d+-core", " ", env["cpu_model"], flags=re.I)
        base = f"cpu-{model}-{isa}-{env['logical_cpus']}c"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def describe(env: dict) -> str:
    """One line naming the machine, for report headers and docs/performance.md."""
    cpu = (f"{env['cpu_model']} ({', '.join(env['cpu_flags']) or 'no AVX'}; torch CPU capability "
           f"{env['cpu_capability']}), {env['logical_cpus']} logical CPUs, {env['torch_threads']} torch threads")
    gpu = f"{env['gpu']}; " if env.get("gpu") else ""
    return (f"{gpu}{cpu}; torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}")

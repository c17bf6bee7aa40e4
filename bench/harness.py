"""Timing, peak memory and machine description for the benchmarks (``pytest bench/``).

Timing (:func:`time_methods`): the methods being compared are run **round robin** -- warmup of each,
then ``reps`` rounds that call every method once -- and each method's figure is its best (minimum)
time. On a shared or drifting machine this keeps a ratio honest: both sides saw the same conditions.
CUDA calls are timed with events after a synchronize. Each measurement also records the process'
CPU time over wall time (``cpu_busy``, in cores): on an idle machine a multi-threaded CPU kernel
keeps it near the thread count; far below means the process was waiting (other load, I/O).

Peak extra memory on CPU: torch has no CPU allocator statistics, so :func:`measure` uses the
kernel's peak resident-set size. Before each call it resets the process high-water mark (``echo 5 >
/proc/self/clear_refs``, Linux >= 4.0) and reads ``VmRSS``; after the call ``VmHWM - VmRSS_before``
is the peak memory the call added (its temporaries and outputs), at page granularity, across all
threads (a Python dispatch-mode tracker would miss tensors created in C++ worker threads). For this
to be honest freed memory must leave the process, so at import glibc is told (``mallopt``) to serve
every allocation >= 64 KiB by ``mmap`` (returned to the OS on free) and to trim the heap eagerly;
otherwise a buffer freed by an earlier run would be reused without raising the RSS. On CUDA:
``torch.cuda.max_memory_allocated`` above what was allocated before the call.
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
    MALLOC_TUNED = bool(_libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)) and bool(
        _libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024))
except OSError:
    MALLOC_TUNED = False

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


@dataclasses.dataclass
class Measurement:
    """One method's figures: best wall seconds of its calls, the largest peak extra MiB seen (None
    when not measurable), and process CPU seconds / wall seconds of the best call."""

    seconds: float
    peak_mib: float | None
    cpu_busy: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable, device: torch.device | str = "cpu") -> Measurement:
    """Run ``fn()`` once: its wall time, peak extra memory and CPU busy-ness. The result is dropped."""
    device = torch.device(device)
    gc.collect()
    tracked = peak_memory_supported(device)
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
        extra = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        del out
        return Measurement(seconds, extra, None)
    if tracked:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
    cpu0, start = time.process_time(), time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    extra = (_status_kib("VmHWM") - before) / 1024.0 if tracked else None
    del out
    return Measurement(seconds, extra, cpu / seconds if seconds > 0 else None)


def time_methods(methods: dict[str, Callable], *, reps: int = 3, warmup: bool = True,
                 device: torch.device | str = "cpu") -> dict[str, Measurement]:
    """Round-robin timing of several methods (see the module docstring): ``{name: Measurement}``
    with each method's best time, largest peak memory, and the CPU busy-ness of its best call."""
    if warmup:
        for fn in methods.values():
            fn()
        synchronize(device)
    runs: dict[str, list[Measurement]] = {name: [] for name in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            runs[name].append(measure(fn, device))
    out = {}
    for name, ms in runs.items():
        best = min(ms, key=lambda m: m.seconds)
        peaks = [m.peak_mib for m in ms if m.peak_mib is not None]
        out[name] = Measurement(best.seconds, max(peaks) if peaks else None, best.cpu_busy)
    return out


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
    """One line naming the machine, for report headers and the README."""
    cpu = (f"{env['cpu_model']} ({', '.join(env['cpu_flags']) or 'no AVX'}; torch CPU capability "
           f"{env['cpu_capability']}), {env['logical_cpus']} logical CPUs, {env['torch_threads']} torch threads")
    gpu = f"{env['gpu']}; " if env.get("gpu") else ""
    return (f"{gpu}{cpu}; torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}")

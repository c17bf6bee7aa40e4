"""bf16 on a CPU without native bf16 units: detected from the CPU's flags, warned about once.

On x86, torch runs bf16 matmuls through oneDNN, which is fast only with bf16 dot-product instructions
(AVX512-BF16 or AMX-BF16). Without them the products are emulated: on a Sapphire Rapids with oneDNN
limited to AVX512 (``ONEDNN_MAX_CPU_ISA=AVX512_CORE``) a one-thread 128x256x256 bf16 matmul ran about 5x
slower than fp32 (31-37 against 169-194 GFLOP/s), limited to AVX2 about 100x slower (0.7-1.6 against
161-180; issue 30 measured 0.9 against 41 GFLOP/s on an AVX2-only EPYC). A bf16 model
(``dtype="bfloat16"``, ``--dtype bf16``) or bf16 autocast (``--bf16``) then costs time and buys
nothing, so :func:`warn_if_slow_bf16` warns once per process, with the rates it measures then.

The detection reads the CPU's own flags (CPUID, through ``gircse_kernels.cpu.capabilities()``, or
torch's cpuinfo when the C++ extension is not built), never ``ATEN_CPU_CAPABILITY`` or
``ONEDNN_MAX_CPU_ISA``, which only restrict what torch runs: those emulate a smaller CPU's kernels to
see the measured rates, while tests pass ``capabilities=`` to take either branch. Non-x86 CPUs are
not judged (no warning).
"""
from __future__ import annotations

import functools
import platform
import time
import warnings

import torch

__all__ = ["SlowBf16Warning", "bf16_flags", "matmul_gflops", "native_bf16", "warn_if_slow_bf16"]

_X86 = ("x86_64", "amd64", "i386", "i686")
_warned = False


class SlowBf16Warning(UserWarning):
    """bf16 was asked for on a CPU whose torch bf16 matmuls are emulated (much slower than fp32)."""


@functools.cache
def bf16_flags() -> dict:
    """``{"avx512_bf16": bool, "amx_bf16": bool}`` from the CPU's flags (cached: they do not change)."""
    from gircse_kernels import cpu

    if cpu.available():
        caps = cpu.capabilities()
        return {"avx512_bf16": bool(caps["avx512_bf16"]), "amx_bf16": bool(caps["amx_bf16"])}
    return {"avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
            "amx_bf16": bool(torch.cpu._is_amx_tile_supported())}


def native_bf16(capabilities: dict | None = None, machine: str | None = None) -> bool:
    """True when this CPU has bf16 dot-product units (AVX512-BF16 or AMX-BF16), or is not x86 (not judged).
    ``capabilities`` (``gircse_kernels.cpu.capabilities()``'s keys) and ``machine`` default to this CPU's."""
    if (machine or platform.machine()).lower() not in _X86:
        return True
    flags = bf16_flags() if capabilities is None else capabilities
    return bool(flags["avx512_bf16"] or flags["amx_bf16"])


def matmul_gflops(dtype: torch.dtype, rows: int = 128, width: int = 256, repeats: int = 10) -> float:
    """GFLOP/s of one thread's ``[rows, width] @ [width, width]`` CPU matmul in ``dtype``, best of ``repeats``.

    One thread: with several, a matmul this small waits at the thread pool's barrier for any thread
    that another process preempted, and on shared cores that wait (milliseconds) is all one measures.
    """
    a = torch.randn(rows, width).to(dtype)
    b = torch.randn(width, width).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(2):  # oneDNN primitive creation
            torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 2 * rows * width * width / max(best, 1e-9) / 1e9


def warn_if_slow_bf16(what: str, instead: str, device, *, capabilities: dict | None = None) -> str | None:
    """Warn (``SlowBf16Warning``, once per process) that ``what`` runs bf16 matmuls on a CPU without
    native bf16, advising ``instead``; returns the message, or None where nothing is warned (not a CPU
    device, native bf16, already warned)."""
    global _warned
    if _warned or torch.device(device).type != "cpu" or native_bf16(capabilities):
        return None
    _warned = True
    bf16, fp32 = matmul_gflops(torch.bfloat16), matmul_gflops(torch.float32)
    message = (f"gircse: {what} on a CPU without native bf16 (no AVX512-BF16 or AMX-BF16 in its flags, "
               f"gircse_kernels.cpu.capabilities()): torch's bf16 matmul runs at {bf16:.1f} GFLOP/s here "
               f"against {fp32:.1f} in fp32 (one thread, measured now), so this runs slower than fp32 would; "
               f"on this CPU, {instead}")
    warnings.warn(message, SlowBf16Warning, stacklevel=3)
    return message

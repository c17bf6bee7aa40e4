"""The backend registry: a backend name ("auto" included) -> the module that runs the op on a device.

The custom ops of ``gircse_kernels.autograd`` resolve the name here, on the real tensors (inside the
op, never in traced code); ``gircse_kernels.resolve_backend`` is this module's function. The backends
with optional dependencies -- Triton (``gircse_kernels.triton.host``) and the C++ extension
(``gircse_kernels.cpu``) -- are imported when first resolved, so ``import gircse_kernels`` imports
neither and builds nothing.
"""
from __future__ import annotations

import types
import warnings

import torch

from . import torch_chunked
from ._validation import check_backend
from .triton.launch import interpreting as triton_interpreting


def _triton_backend() -> types.ModuleType:
    from .triton import host

    return host


def _cpu_backend() -> types.ModuleType | None:
    """The C++ CPU backend module, or None when the extension is neither built nor buildable."""
    try:
        from . import cpu
    except ImportError:
        return None
    return cpu if cpu.available() else None


_warned_cpu_fallback = False


def resolve_backend(backend: str, device: torch.device) -> tuple[str, types.ModuleType]:
    """Map a backend name (including "auto") to (name, backend module) for tensors on ``device``."""
    global _warned_cpu_fallback
    check_backend(backend)
    if backend == "auto":
        if device.type == "cuda":
            backend = "triton"
        elif device.type == "cpu":
            if _cpu_backend() is not None:
                backend = "cpu"
            else:
                if not _warned_cpu_fallback:
                    warnings.warn(
                        "gircse_kernels: the C++ CPU extension is not available; using the slower "
                        "backend='torch' (chunked PyTorch).", RuntimeWarning, stacklevel=3,
                    )
                    _warned_cpu_fallback = True
                backend = "torch"
        else:
            backend = "torch"
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
            )
        return backend, _triton_backend()
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        module = _cpu_backend()
        if module is None:
            raise RuntimeError(
                "backend='cpu' was requested but the C++ extension gircse_kernels._C is not built and "
                "could not be compiled; reinstall with a C++ compiler, or use backend='torch'"
            )
        return backend, module
    return backend, torch_chunked

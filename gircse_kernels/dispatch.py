"""Public entry point: validates, picks a backend, and runs the op with or without autograd."""
from __future__ import annotations

import os
import types
import warnings

import torch

from . import torch_chunked
from ._validation import SUPPORTED_DTYPES, check_backend, check_grad_filter, check_op_inputs
from .autograd import SoftTokenEmbeddingFunction, same_storage


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_backend() -> types.ModuleType:
    from . import triton_fused

    return triton_fused


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


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def soft_token_embedding(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    embed_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
    grad_filter_eps: float = 0.0,
) -> torch.Tensor:
    """``softmax((hidden @ W^T + b) / T [softcapped]) @ E`` without materializing [B, V].

    Args:
        hidden: [..., d] query hidden states (any leading dims).
        lm_head_weight: [V, d] LM-head rows (the attention keys).
        embed_weight: [V, d_e] input-embedding rows (the attention values). May be the same tensor
            as ``lm_head_weight`` (tied); each vocabulary tile is then read once.
        lm_head_bias: optional [V] bias of the LM head.
        temperature: divides the logits. softcap: optional Gemma-style ``c * tanh(z / c)``.
        backend: "auto" | "triton" | "cpu" | "torch".
        grad_filter_eps: the backward skips vocabulary tiles whose probabilities are all below this
            (0, the default, is exact); the error bound is in ``gircse_kernels.grad_filter``.

    Returns: [..., d_e] in ``embed_weight``'s dtype. Differentiable in every tensor argument.
    """
    check_op_inputs(hidden, lm_head_weight, embed_weight, lm_head_bias, temperature, softcap,
                    allowed_dtypes=SUPPORTED_DTYPES)
    check_grad_filter(grad_filter_eps)
    name, module = resolve_backend(backend, hidden.device)
    lead = hidden.shape[:-1]
    hidden2d = _unit_last_stride(hidden.reshape(-1, hidden.shape[-1]))
    weight = _unit_last_stride(lm_head_weight)
    # Keep one object for a tied matrix so autograd and the kernels both see the tie.
    embed = weight if embed_weight is lm_head_weight else _unit_last_stride(embed_weight)
    bias = None if lm_head_bias is None else lm_head_bias.contiguous()
    temperature, softcap = float(temperature), None if softcap is None else float(softcap)
    tensors = (hidden, lm_head_weight, embed_weight) + (() if lm_head_bias is None else (lm_head_bias,))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out = SoftTokenEmbeddingFunction.apply(hidden2d, weight, embed, bias, temperature, softcap, module,
                                               float(grad_filter_eps))
    else:
        out32, _ = module.forward(hidden2d, weight, embed, bias, temperature=temperature, softcap=softcap,
                                  tied=same_storage(weight, embed))
        out = out32.to(embed_weight.dtype)
    return out.reshape(*lead, embed_weight.shape[1])

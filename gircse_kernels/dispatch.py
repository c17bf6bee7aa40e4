"""The dispatcher: the public entry point validates, applies the dtype policy, and runs the custom op,
which resolves the backend by name ("auto" included) on the real tensors (``gircse_kernels.backends``)."""
from __future__ import annotations

import torch

from ._validation import SUPPORTED_DTYPES, check_backend, check_grad_filter, check_op_inputs, compute_dtype
from .autograd import soft_token_embedding_op


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


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
    batch_invariant: bool = False,
) -> torch.Tensor:
    """``softmax((hidden @ W^T + b) / T [softcapped]) @ E`` without materializing [B, V].

    Args:
        hidden: [..., d] query hidden states (any leading dims).
        lm_head_weight: [V, d] LM-head rows (the attention keys). Any strides: a transposed view is
            read in place, never copied.
        embed_weight: [V, d_e] input-embedding rows (the attention values). May be the same tensor
            as ``lm_head_weight`` (tied); each vocabulary tile is then read once.
        lm_head_bias: optional [V] bias of the LM head. ``-inf`` entries mask vocabulary entries out;
            a row whose every logit is masked gives NaN (and NaN gradients), exactly like
            ``torch.softmax`` of an all ``-inf`` row.
        temperature: divides the logits. softcap: optional Gemma-style ``c * tanh(z / c)``, applied
            after the temperature.
        backend: "auto" | "triton" | "cpu" | "torch".
        grad_filter_eps: the backward skips vocabulary tiles whose probabilities are all below this
            (0, the default, is exact); the error bound is in ``gircse_kernels.grad_filter``. A hint:
            Triton's GEMM path (larger B at wide d) skips nothing and stays exact.
        batch_invariant: guarantee that a row's result does not depend on the batch size (or the
            GPU's SM count): the backend picks its tiling from (V, d, d_e, dtype) only, at some cost
            in speed for small batches on GPU.

    Mixed precision (one policy, every backend): under ``torch.autocast`` for the inputs' device
    type the op computes in the autocast dtype and returns it, casting every input to it (weights
    included: one [V, d] and one [V, d_e] copy per call when they are stored in another dtype, once
    when tied, as autocast does for ``F.linear``). Without autocast the weights decide: the compute
    and output dtype is ``promote_types(lm_head_weight.dtype, embed_weight.dtype)``, and ``hidden``
    and the bias are cast to it (cheap: bf16 activations with fp32 weights never copy the weights).
    Accumulation is fp32 in every case; gradients come back in each input's own dtype.

    Returns: [..., d_e] in the compute dtype. Differentiable once in every tensor argument (a double
    backward raises); traceable by ``torch.compile`` (the backends run inside ``torch.library``
    custom ops, see ``gircse_kernels.autograd``).
    """
    check_op_inputs(hidden, lm_head_weight, embed_weight, lm_head_bias, temperature, softcap,
                    allowed_dtypes=SUPPORTED_DTYPES)
    check_grad_filter(grad_filter_eps)
    check_backend(backend)
    if not isinstance(batch_invariant, bool):
        raise TypeError(f"batch_invariant must be a bool, got {type(batch_invariant).__name__}")
    dtype = compute_dtype(hidden, lm_head_weight, embed_weight)
    # The very same tensor as W and E (a tied model): cast once so the tie survives the cast.
    one_tensor = lm_head_weight is embed_weight
    weight = _cast(lm_head_weight, dtype)
    embed = weight if one_tensor else _cast(embed_weight, dtype)
    lead = hidden.shape[:-1]
    hidden2d = _unit_last_stride(_cast(hidden, dtype).reshape(-1, hidden.shape[-1]))
    bias = None if lm_head_bias is None else _cast(lm_head_bias, dtype).contiguous()
    out32, _lse = soft_token_embedding_op(
        hidden2d, weight, embed, bias, float(temperature), None if softcap is None else float(softcap), backend,
        batch_invariant, float(grad_filter_eps), one_tensor)
    return out32.to(dtype).reshape(*lead, embed_weight.shape[1])

"""The specification of the op, in plain PyTorch.

    z   = hidden @ lm_head_weight^T (+ lm_head_bias)
    z   = z / temperature
    z   = softcap * tanh(z / softcap)          (only when softcap is given; Gemma-style)
    out = softmax(z) @ embed_weight

It materializes the [B, V] logits and probabilities and accumulates in fp32 (fp64 for fp64 inputs),
which makes it slow, memory-hungry and obviously right: every other backend is tested against it.
Mixed dtypes follow the op's policy (``_validation.compute_dtype``): inputs are rounded to the compute
dtype (the autocast dtype under autocast, else the weights' promoted dtype), which is also the dtype
returned. A row whose logits are all -inf (fully masked) gives NaN, as ``torch.softmax`` does.
"""
from __future__ import annotations

import torch

from ._validation import check_op_inputs, compute_dtype


def soft_token_embedding(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    embed_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    check_op_inputs(hidden, lm_head_weight, embed_weight, lm_head_bias, temperature, softcap)
    dtype = compute_dtype(hidden, lm_head_weight, embed_weight)  # the mixed-precision policy
    acc = torch.promote_types(dtype, torch.float32)

    def exact(t):  # the input as the op sees it (rounded to the compute dtype), widened for accumulation
        return t.to(dtype).to(acc)

    with torch.autocast(hidden.device.type, enabled=False):
        logits = exact(hidden) @ exact(lm_head_weight).T
        if lm_head_bias is not None:
            logits = logits + exact(lm_head_bias)
        logits = logits / temperature
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        probs = torch.softmax(logits, dim=-1)
        return (probs @ exact(embed_weight)).to(dtype)

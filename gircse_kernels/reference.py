"""The specification of the op, in plain PyTorch.

    z   = hidden @ lm_head_weight^T (+ lm_head_bias)
    z   = z / temperature
    z   = softcap * tanh(z / softcap)          (only when softcap is given; Gemma-style)
    out = softmax(z) @ embed_weight

It materializes the [B, V] logits and probabilities and accumulates in fp32 (fp64 for fp64 inputs),
which makes it slow, memory-hungry and obviously right: every other backend is tested against it.
"""
from __future__ import annotations

import torch

from ._validation import check_op_inputs


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
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(acc) @ lm_head_weight.to(acc).T
    if lm_head_bias is not None:
        logits = logits + lm_head_bias.to(acc)
    logits = logits / temperature
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    probs = torch.softmax(logits, dim=-1)
    return (probs @ embed_weight.to(acc)).to(embed_weight.dtype)

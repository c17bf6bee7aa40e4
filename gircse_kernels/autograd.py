"""The one autograd Function of the op; backends plug in through a two-function contract.

A backend is a module with

``forward(hidden, lm_head_weight, embed_weight, lm_head_bias, *, temperature, softcap, tied)``
    ``hidden`` is 2-D [B, d] with a unit last stride. Returns ``(out32, lse)``: the output
    [B, d_e] in fp32 and the per-row logsumexp [B] (fp32) of the final logits z (after temperature
    and softcap). Nothing of size B*V may be allocated.

``backward(grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, *, temperature,
softcap, tied, need_hidden, need_weight, need_embed, need_bias, merge_tied_grads, grad_filter_eps)``
    ``delta[i] = <grad_out[i], out32[i]>`` (fp32). Recomputes p = exp(z - lse) tile by tile and
    returns ``(d_hidden, d_lm_head_weight, d_embed_weight, d_lm_head_bias)`` in the inputs' dtypes,
    None where not needed. With ``merge_tied_grads`` (the same tensor passed as both weights) the
    sum of both weight gradients is returned as ``d_lm_head_weight`` and ``d_embed_weight`` is None.

Math of the backward, with p = softmax(z) and O = p E:
    dp_j = <dO, E_j>,  dz_j = p_j (dp_j - delta),  delta = <dO, O>
    d raw logit = dz * (1 - tanh^2) / temperature      (softcap chain rule; 1 without softcap)
    d hidden = draw @ W,  dW = draw^T @ hidden,  db = sum_rows draw,  dE = p^T @ dO
"""
from __future__ import annotations

import torch


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two weight tensors are one matrix in memory (tied LM head and input embeddings)."""
    return a is b or (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
    )


class SoftTokenEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, lm_head_weight, embed_weight, lm_head_bias, temperature, softcap, backend,
                grad_filter_eps):
        tied = same_storage(lm_head_weight, embed_weight)
        out32, lse = backend.forward(hidden, lm_head_weight, embed_weight, lm_head_bias,
                                     temperature=temperature, softcap=softcap, tied=tied)
        ctx.save_for_backward(hidden, lm_head_weight, embed_weight, lm_head_bias, out32, lse)
        ctx.backend, ctx.temperature, ctx.softcap = backend, temperature, softcap
        ctx.tied, ctx.grad_filter_eps = tied, grad_filter_eps
        # Autograd sums the two gradients itself only when the very same tensor object was passed twice.
        ctx.merge_tied_grads = lm_head_weight is embed_weight
        return out32.to(embed_weight.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, lm_head_weight, embed_weight, lm_head_bias, out32, lse = ctx.saved_tensors
        need_hidden, need_weight, need_embed, need_bias = ctx.needs_input_grad[:4]
        merge = ctx.merge_tied_grads and need_weight and need_embed
        delta = (grad_out.float() * out32).sum(dim=-1)
        grads = ctx.backend.backward(
            grad_out.contiguous(), hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta,
            temperature=ctx.temperature, softcap=ctx.softcap, tied=ctx.tied,
            need_hidden=need_hidden, need_weight=need_weight, need_embed=need_embed,
            need_bias=need_bias and lm_head_bias is not None, merge_tied_grads=merge,
            grad_filter_eps=ctx.grad_filter_eps,
        )
        return (*grads, None, None, None, None)

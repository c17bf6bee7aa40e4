"""Memory-bounded pure-PyTorch backend (``backend="torch"``).

The vocabulary is processed in chunks of at most ``chunk_size`` rows with an online logsumexp, so
the largest temporary is [B, chunk] instead of [B, V]. Each chunk is upcast to fp32 before its
matmuls (CPU matmuls cannot emit fp32 from bf16 operands), which keeps the result fp32-accurate.
This is the portable fallback; the C++ and Triton backends are the fast paths.

Backend contract (shared by every backend module, see ``autograd.py``):
``forward(...) -> (out32 [B, d_e] fp32, lse [B] fp32)`` and
``backward(...) -> (d_hidden, d_lm_head_weight, d_embed_weight, d_lm_head_bias)``.
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK = 4096


def _chunk_size(vocab: int, chunk_size: int | None) -> int:
    # Never a single chunk spanning the whole vocabulary (that would be a [B, V] buffer) unless V == 1.
    size = DEFAULT_CHUNK if chunk_size is None else chunk_size
    return max(1, min(size, (vocab + 1) // 2))


def _chunk_logits(h32, weight, bias, lo, hi, temperature, softcap):
    """Return (z, dz/draw-logit factor or None) for vocabulary rows [lo, hi)."""
    z = h32 @ weight[lo:hi].float().T
    if bias is not None:
        z += bias[lo:hi].float()
    z /= temperature
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return softcap * t, (1.0 - t * t)


def forward(hidden, lm_head_weight, embed_weight, lm_head_bias, *, temperature, softcap, tied=False,
            batch_invariant=False, chunk_size=None):
    rows, vocab = hidden.shape[0], lm_head_weight.shape[0]
    if batch_invariant and rows > 1:
        # Every row through the same [1, d] x [d, chunk] products (chunks never depend on B): a row's
        # result cannot depend on the batch, which the BLAS kernel choice for [B, d] x [d, chunk]
        # does not guarantee. Costs one pass over W and E per row.
        parts = [forward(hidden[i:i + 1], lm_head_weight, embed_weight, lm_head_bias, temperature=temperature,
                         softcap=softcap, tied=tied, chunk_size=chunk_size) for i in range(rows)]
        return torch.cat([out for out, _ in parts]), torch.cat([lse for _, lse in parts])
    h32 = hidden.float()
    acc = hidden.new_zeros(rows, embed_weight.shape[1], dtype=torch.float32)
    running_max = hidden.new_full((rows, 1), float("-inf"), dtype=torch.float32)
    running_sum = hidden.new_zeros(rows, 1, dtype=torch.float32)
    step = _chunk_size(vocab, chunk_size)
    for lo in range(0, vocab, step):
        hi = min(lo + step, vocab)
        z, _ = _chunk_logits(h32, lm_head_weight, lm_head_bias, lo, hi, temperature, softcap)
        new_max = torch.maximum(running_max, z.amax(dim=1, keepdim=True))
        # Safe max (FlashAttention): while every logit seen so far is -inf (a masked vocabulary),
        # subtract 0 instead of -inf, so p = exp(-inf) = 0 rather than exp(-inf - -inf) = NaN.
        safe_max = torch.where(new_max == float("-inf"), 0.0, new_max)
        rescale = torch.exp(running_max - safe_max)
        p = torch.exp(z - safe_max)
        values = lm_head_weight[lo:hi] if tied else embed_weight[lo:hi]
        acc = acc * rescale + p @ values.float()
        running_sum = running_sum * rescale + p.sum(dim=1, keepdim=True)
        running_max = new_max
    # A row whose every logit is -inf keeps sum 0: out = 0/0 = NaN and lse = -inf, exactly what
    # torch.softmax of an all -inf row gives (and the backward's exp(z - lse) stays NaN for it).
    out32 = acc / running_sum
    lse = (running_max + torch.log(running_sum)).squeeze(1)
    return out32, lse


def backward(grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, *, temperature,
             softcap, tied=False, need_hidden=True, need_weight=False, need_embed=False, need_bias=False,
             merge_tied_grads=False, grad_filter_eps=0.0, batch_invariant=False, chunk_size=None):
    rows, vocab = hidden.shape[0], lm_head_weight.shape[0]
    if batch_invariant and need_hidden and rows > 1:
        # d hidden row by row (as in the forward); the weight gradients are sums over rows anyway.
        kw = dict(temperature=temperature, softcap=softcap, tied=tied, grad_filter_eps=grad_filter_eps,
                  chunk_size=chunk_size)
        d_hidden = torch.cat([
            backward(grad_out[i:i + 1], hidden[i:i + 1], lm_head_weight, embed_weight, lm_head_bias,
                     lse[i:i + 1], delta[i:i + 1], need_hidden=True, **kw)[0] for i in range(rows)])
        rest = backward(grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, need_hidden=False,
                        need_weight=need_weight, need_embed=need_embed, need_bias=need_bias,
                        merge_tied_grads=merge_tied_grads, **kw)
        return (d_hidden, *rest[1:])
    h32, g32 = hidden.float(), grad_out.float()
    lse, delta = lse.unsqueeze(1), delta.unsqueeze(1)
    d_hidden = torch.zeros_like(h32) if need_hidden else None
    d_weight = torch.zeros_like(lm_head_weight, dtype=torch.float32) if need_weight else None
    d_embed = (torch.zeros_like(embed_weight, dtype=torch.float32)
               if need_embed and not merge_tied_grads else None)
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_bias else None
    step = _chunk_size(vocab, chunk_size)
    for lo in range(0, vocab, step):
        hi = min(lo + step, vocab)
        z, cap_grad = _chunk_logits(h32, lm_head_weight, lm_head_bias, lo, hi, temperature, softcap)
        p = torch.exp(z - lse)
        if grad_filter_eps > 0.0 and bool((p < grad_filter_eps).all()):
            continue  # every probability in this chunk is negligible: skip its gradient (documented bound)
        values = (lm_head_weight[lo:hi] if tied else embed_weight[lo:hi]).float()
        dz = p * (g32 @ values.T - delta)
        if cap_grad is not None:
            dz *= cap_grad
        dz /= temperature  # dz is now d loss / d raw logit (before temperature and softcap)
        if need_hidden:
            d_hidden += dz @ lm_head_weight[lo:hi].float()
        if need_weight:
            d_weight[lo:hi] = dz.T @ h32
        if need_embed:
            target = d_weight if merge_tied_grads else d_embed
            target[lo:hi] += p.T @ g32
        if need_bias:
            d_bias[lo:hi] = dz.sum(dim=0)
    return (
        None if d_hidden is None else d_hidden.to(hidden.dtype),
        None if d_weight is None else d_weight.to(lm_head_weight.dtype),
        None if d_embed is None else d_embed.to(embed_weight.dtype),
        None if d_bias is None else d_bias.to(lm_head_bias.dtype),
    )

"""The vocabulary-chunked GEMM path (``OpConfig.kind == "gemm"``): cuBLAS for the products, Triton between.

Taken above 16 rows at chunked widths (from 64 rows up to d = 1024; see ``config``), where the fused
kernels' per-tile fp32 slices outgrow L2 and 16-row tiles leave the tensor cores idle. Per chunk of the
vocabulary, cuBLAS computes z = h W_c^T and dp = dO E_c^T with fp32 results, ``_chunk_softmax_kernel`` /
``_chunk_grad_kernel`` turn them into p and dz (the online-softmax update and the bias gradient), and
cuBLAS applies p E_c, dz W_c, dz^T h, p^T dO. The [B, chunk] buffers are bounded (``GEMM_BUFFER_BYTES``,
at most half the vocabulary): nothing of size B x V is allocated.

``_chunk_softmax_kernel``, grid (rows,). Reads a row's fp32 raw logits of the chunk twice (the max, then
exp and sum: the second read from L2), writes p in the inputs' dtype once, and reads and writes the
row's running (m, l) and its rescale factor alpha once.

``_chunk_grad_kernel``, grid (column blocks, row blocks). Reads a [BLOCK_R, BLOCK_C] block of the fp32
raw logits and of dp once, writes p and dz in the inputs' dtype once (the operands of the next GEMMs)
and the block's column sums of dz (the bias gradient) as one partial row.

Why this is near the limit: every GEMM reads its W or E chunk once at the tensor-core rate, so a pass
reads W and E once; the Triton kernels touch only the [B, chunk] buffers, which stay in L2 while they
fit it. What the path pays on top is the fp32 accumulator rescale between chunks, the [B, chunk] fp32
logits written and read once per chunk (at B = 4096 the roofline model puts the path at 1.2-1.4x the
GEMM-equivalent time at the 7B widths and up to 2.8x at d <= 896, ``bench/results/gpu_roofline.md``; not a
GPU measurement) and, for W re-read by a later GEMM of the same chunk (tied values, dz W_c), L2 capacity
(see ``roofline``).
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from .config import GEMM_GRAD_BLOCK_C, GEMM_GRAD_ROWS, GEMM_SOFTMAX_BLOCK, OpConfig
from .launch import Launch
from .tiles import _finish_logits, _raw_logit_grad


@triton.jit
def _chunk_softmax_kernel(z_ptr, b_ptr, p_ptr, m_ptr, l_ptr, alpha_ptr, N, v0, stride_z, stride_p,
                          inv_temperature, softcap,
                          HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_C: tl.constexpr):
    """One row of one vocabulary chunk: raw logits -> (running max, running sum, p in the inputs' dtype).

    Reads the row's fp32 raw logits (h W_chunk^T from cuBLAS) twice -- max, then exp and sum, from L2
    -- and writes p = exp(z - m) once; updates the row's (m, l) with the safe max and leaves the
    rescale factor alpha for the caller's ``acc = acc * alpha + p E_chunk``.
    """
    row = tl.program_id(0)
    m_old = tl.load(m_ptr + row)
    m_chunk = float("-inf")
    for c0 in range(0, N, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = cols < N
        s = tl.load(z_ptr + row.to(tl.int64) * stride_z + cols, mask=mask, other=0.0)[None, :]
        z = _finish_logits(s, b_ptr, v0 + cols, mask, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
        m_chunk = tl.maximum(m_chunk, tl.max(tl.max(z, axis=1), axis=0))
    m_new = tl.maximum(m_old, m_chunk)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    total = 0.0
    for c0 in range(0, N, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = cols < N
        s = tl.load(z_ptr + row.to(tl.int64) * stride_z + cols, mask=mask, other=0.0)[None, :]
        z = _finish_logits(s, b_ptr, v0 + cols, mask, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
        p = tl.exp(z - m_safe)
        total += tl.sum(tl.sum(p, axis=1), axis=0)
        tl.store(p_ptr + row.to(tl.int64) * stride_p + cols[None, :], p.to(p_ptr.dtype.element_ty),
                 mask=mask[None, :])
    alpha = tl.exp(m_old - m_safe)
    tl.store(alpha_ptr + row, alpha)
    tl.store(l_ptr + row, tl.load(l_ptr + row) * alpha + total)
    tl.store(m_ptr + row, m_new)


@triton.jit
def _chunk_grad_kernel(z_ptr, dp_ptr, b_ptr, lse_ptr, delta_ptr, p_ptr, dz_ptr, db_ptr, B, N, v0, stride_z,
                       stride_dp, stride_p, stride_dz, stride_db, inv_temperature, softcap,
                       HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_B: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A [BLOCK_R, BLOCK_C] block of one chunk: p = exp(z - lse) and dz from dp = dO E_chunk^T.

    Reads the fp32 raw logits and dp once, writes p and dz (the inputs' dtype, the operands of the
    next GEMMs) once, and the block's column sums of dz (the bias gradient) as one partial row.
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    col_mask = cols < N
    row_mask = rows < B
    mask = row_mask[:, None] & col_mask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    s = tl.load(z_ptr + r64 * stride_z + cols[None, :], mask=mask, other=0.0)
    z = _finish_logits(s, b_ptr, v0 + cols, col_mask, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=row_mask, other=0.0)
    p = tl.where(row_mask[:, None], tl.exp(z - lse[:, None]), 0.0)
    dp = tl.load(dp_ptr + r64 * stride_dp + cols[None, :], mask=mask, other=0.0)
    dz = _raw_logit_grad(p, dp, delta, z, col_mask, inv_temperature, softcap, HAS_SOFTCAP)
    tl.store(p_ptr + r64 * stride_p + cols[None, :], p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(dz_ptr + r64 * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if NEED_B:
        tl.store(db_ptr + tl.program_id(1).to(tl.int64) * stride_db + cols, tl.sum(dz, axis=0), mask=col_mask)


def chunk_softmax_launch(z, lm_head_bias, p, m, l, alpha, v0, *, temperature, softcap) -> Launch:
    rows, n = z.shape
    return Launch(
        "chunk_softmax", _chunk_softmax_kernel, (rows,),
        dict(z_ptr=z, b_ptr=lm_head_bias if lm_head_bias is not None else z, p_ptr=p, m_ptr=m, l_ptr=l, alpha_ptr=alpha,
             N=n, v0=v0, stride_z=z.stride(0), stride_p=p.stride(0), inv_temperature=1.0 / temperature,
             softcap=1.0 if softcap is None else softcap),
        dict(HAS_BIAS=lm_head_bias is not None, HAS_SOFTCAP=softcap is not None, BLOCK_C=GEMM_SOFTMAX_BLOCK), 4, 2)


def chunk_grad_launch(z, dp, lm_head_bias, lse, delta, p, dz, db_part, v0, *, temperature, softcap) -> Launch:
    rows, n = z.shape
    return Launch(
        "chunk_grad", _chunk_grad_kernel, (triton.cdiv(n, GEMM_GRAD_BLOCK_C), triton.cdiv(rows, GEMM_GRAD_ROWS)),
        dict(z_ptr=z, dp_ptr=dp, b_ptr=lm_head_bias if lm_head_bias is not None else z, lse_ptr=lse, delta_ptr=delta,
             p_ptr=p, dz_ptr=dz, db_ptr=db_part if db_part is not None else lse, B=rows, N=n, v0=v0,
             stride_z=z.stride(0), stride_dp=dp.stride(0), stride_p=p.stride(0), stride_dz=dz.stride(0),
             stride_db=0 if db_part is None else db_part.stride(0), inv_temperature=1.0 / temperature,
             softcap=1.0 if softcap is None else softcap),
        dict(HAS_BIAS=lm_head_bias is not None, HAS_SOFTCAP=softcap is not None, NEED_B=db_part is not None,
             BLOCK_R=GEMM_GRAD_ROWS, BLOCK_C=GEMM_GRAD_BLOCK_C), 4, 2)


def _mm32(a, b):
    """``a @ b`` with an fp32 result. 16-bit CUDA inputs: cuBLAS accumulates in fp32 and returns the fp32
    result unrounded (``out_dtype``). fp32 inputs (and the CPU interpreter) multiply in fp32; on CUDA
    that follows ``torch.backends.cuda.matmul.allow_tf32`` like any fp32 matmul of the caller's."""
    global _MM_OUT_DTYPE
    if a.is_cuda and a.dtype != torch.float32:
        if _MM_OUT_DTYPE:
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):
                _MM_OUT_DTYPE = False
                warnings.warn("gircse_kernels: this PyTorch has no torch.mm(out_dtype=float32) for 16-bit CUDA "
                              "inputs; the GEMM path's logits are rounded to the inputs' dtype (like the naive "
                              "formula's)", RuntimeWarning, stacklevel=2)
        return torch.mm(a, b).float()
    return torch.mm(a.float(), b.float())


_MM_OUT_DTYPE = True  # cleared (with a warning) if torch.mm(out_dtype=) is missing


def gemm_forward(cfg: OpConfig, hidden, lm_head_weight, embed_weight, lm_head_bias, out32, lse, *, temperature,
                 softcap):
    """Vocabulary chunks of ``cfg.gemm_chunk_forward`` rows: z = h W_c^T (cuBLAS, fp32 out), the online-softmax
    update in Triton (p in the inputs' dtype), acc = acc * alpha + p E_c (cuBLAS, fp32 out). Reads W and
    E once; the [rows, chunk] logits and p live in L2-sized buffers."""
    rows, vocab, chunk = hidden.shape[0], lm_head_weight.shape[0], cfg.gemm_chunk_forward
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m, l, alpha = torch.full((rows,), float("-inf"), **f32), torch.zeros(rows, **f32), torch.empty(rows, **f32)
    p = torch.empty(rows, chunk, dtype=hidden.dtype, device=hidden.device)
    out32.zero_()
    for v0 in range(0, vocab, chunk):
        n = min(chunk, vocab - v0)
        z = _mm32(hidden, lm_head_weight[v0:v0 + n].T)
        chunk_softmax_launch(z, lm_head_bias, p[:, :n], m, l, alpha, v0, temperature=temperature, softcap=softcap)()
        out32.mul_(alpha[:, None]).add_(_mm32(p[:, :n], embed_weight[v0:v0 + n]))
    out32.div_(l[:, None])  # a fully masked row: 0 / 0 = NaN, like torch.softmax of an all -inf row
    torch.add(m, torch.log(l), out=lse)


def gemm_backward(cfg: OpConfig, grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, *,
                  temperature, softcap, need_hidden, need_weight, need_embed, need_bias, merge_tied_grads) -> dict:
    """Per vocabulary chunk, five cuBLAS GEMMs at most (z = h W_c^T, dp = dO E_c^T, dh += dz W_c,
    dW_c = dz^T h, dE_c = p^T dO; tied and merged: one GEMM [dz; p]^T [h; dO]) around one Triton pass
    turning (z, dp) into (p, dz) and the bias gradient. Exact (``grad_filter_eps`` does not apply)."""
    rows, d = hidden.shape
    vocab, chunk = lm_head_weight.shape[0], cfg.gemm_chunk
    dev, dtype = hidden.device, hidden.dtype
    p = torch.empty(rows, chunk, dtype=dtype, device=dev)
    dz = torch.empty(rows, chunk, dtype=dtype, device=dev)
    merge = merge_tied_grads
    bufs = {}
    dh32 = torch.zeros(rows, d, dtype=torch.float32, device=dev) if need_hidden else None
    if need_weight or merge:
        bufs["dw"] = torch.empty_like(lm_head_weight, memory_format=torch.contiguous_format)
    if need_embed and not merge:
        bufs["de"] = torch.empty_like(embed_weight, memory_format=torch.contiguous_format)
    db_part = None
    if need_bias:
        bufs["db"] = torch.empty(vocab, dtype=lm_head_bias.dtype, device=dev)
        db_part = torch.empty(triton.cdiv(rows, GEMM_GRAD_ROWS), chunk, dtype=torch.float32, device=dev)
    both = torch.cat([hidden, grad_out]) if merge else None
    for v0 in range(0, vocab, chunk):
        n = min(chunk, vocab - v0)
        w_c, e_c = lm_head_weight[v0:v0 + n], embed_weight[v0:v0 + n]
        z, dp = _mm32(hidden, w_c.T), _mm32(grad_out, e_c.T)
        p_c, dz_c = p[:, :n], dz[:, :n]
        db_c = None if db_part is None else db_part[:, :n]
        chunk_grad_launch(z, dp, lm_head_bias, lse, delta, p_c, dz_c, db_c, v0, temperature=temperature,
                          softcap=softcap)()
        if need_hidden:
            dh32 += _mm32(dz_c, w_c)
        if merge:
            torch.mm(torch.cat([dz_c, p_c]).T, both, out=bufs["dw"][v0:v0 + n])
        elif need_weight:
            torch.mm(dz_c.T, hidden, out=bufs["dw"][v0:v0 + n])
        if need_embed and not merge:
            torch.mm(p_c.T, grad_out, out=bufs["de"][v0:v0 + n])
        if need_bias:
            bufs["db"][v0:v0 + n] = db_c.sum(dim=0)
    if need_hidden:
        bufs["dh"] = dh32.to(dtype)
    return bufs

"""Device helpers the Triton kernels of every phase share (``@triton.jit`` functions, inlined into them).

Tiles and dots: ``_load_tile`` reads a strided [rows, cols] block with int64 offsets (V * d reaches
2^31) and zeros outside the masks; ``_dot`` is the one MMA call and carries the precision modes
(three-pass TF32 for fp32 inputs, the interpreter-only fp32 upcast). Logits: ``_raw_logits`` is h W^T of
one [BLOCK_M, BLOCK_V] tile (from register tiles, or over d in BLOCK_D chunks: ``_dot_rows_chunked``
reads the W tile's rows -- the bytes that reach HBM -- once and the hidden chunks from L1 / L2), and
``_finish_logits`` applies bias, temperature and softcap (-inf outside the vocabulary) for the forward,
both backward kernels and the GEMM path's elementwise kernels alike. Backward: ``_row_block`` and
``_vocab_tile`` load a row block's and a vocabulary tile's register operands, ``_probs_and_grad``
recomputes p = exp(z - lse) and the raw-logit gradient (``_raw_logit_grad``) of one (row block, tile).

Program-private slices: ``_rmw_product`` and ``_fill_rows`` update a row-major fp32 slice chunk by chunk
(per chunk ``_rmw_product`` reads the x chunk once and reads and writes the slice chunk once, real rows
only) and end with ``tl.debug_barrier()``: the read-modify-write discipline of ``gircse_kernels.triton``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        # fp32 inputs: three TF32 tensor-core passes recover ~fp32 accuracy (plain TF32 would not).
        out = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _tanh(x):
    # From exp, stable at both ends (exp overflow -> 1, underflow -> -1); no libdevice needed.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _load_tile(ptr, rows, row_mask, stride_r, cols, col_mask, stride_c):
    """A [len(rows), len(cols)] block of a strided matrix (int64 offsets), zero outside the masks."""
    offs = rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c
    return tl.load(ptr + offs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _rmw_product(out_ptr, out_rows, out_mask, N, prev_scale, accumulate,
                 a, x_ptr, x_rows, x_mask, stride_xr, stride_xc,
                 a2, x2_ptr, x2_rows, x2_mask, stride_x2r, stride_x2c,
                 TWO: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``out[out_rows, :N] = (accumulate ? out * prev_scale : 0) + a @ x[x_rows, :N] (+ a2 @ x2[x2_rows, :N])``.

    Walks N in BLOCK_N chunks; ``out`` is a row-major slice of width N owned by this program (fp32
    while it accumulates over passes, or the weights' dtype for a single pass). Per chunk it reads the
    x (and x2) chunk once and reads and writes the out chunk once. Ends with a barrier: a later pass
    over the same rows may load them from other threads.
    """
    for c in range(0, N, BLOCK_N):
        cols = c + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        offs = out_rows.to(tl.int64)[:, None] * N + cols[None, :]
        mask = out_mask[:, None] & col_mask[None, :]
        prev = tl.load(out_ptr + offs, mask=tl.where(accumulate, mask, False), other=0.0).to(tl.float32)
        x = _load_tile(x_ptr, x_rows, x_mask, stride_xr, cols, col_mask, stride_xc)
        acc = _dot(a.to(x.dtype), x, prev * prev_scale, UPCAST, IEEE)
        if TWO:
            x2 = _load_tile(x2_ptr, x2_rows, x2_mask, stride_x2r, cols, col_mask, stride_x2c)
            acc = _dot(a2.to(x2.dtype), x2, acc, UPCAST, IEEE)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()


@triton.jit
def _fill_rows(out_ptr, out_rows, out_mask, N, value, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out[out_rows, :N] = value`` (fp32 row-major, width N), then a barrier (later passes reload it)."""
    for c in range(0, N, BLOCK_N):
        cols = c + tl.arange(0, BLOCK_N)
        offs = out_rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(out_ptr + offs, tl.full([BLOCK_M, BLOCK_N], value, tl.float32).to(out_ptr.dtype.element_ty),
                 mask=out_mask[:, None] & (cols < N)[None, :])
    tl.debug_barrier()


@triton.jit
def _dot_rows_chunked(acc, a_ptr, a_rows, a_mask, stride_a, b_ptr, b_rows, b_mask, stride_br, stride_bc, N,
                      BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``acc + A[a_rows, :N] @ B[b_rows, :N]^T`` over N in BLOCK_N chunks (A: unit last stride; B: any
    strides). Reads the B rows once (a W / E tile: the bytes that matter) and the A chunks from L1/L2."""
    for k in range(0, N, BLOCK_N):
        cols = k + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        a = _load_tile(a_ptr, a_rows, a_mask, stride_a, cols, col_mask, 1)
        b = _load_tile(b_ptr, b_rows, b_mask, stride_br, cols, col_mask, stride_bc)
        acc = _dot(a, tl.trans(b), acc, UPCAST, IEEE)
    return acc


@triton.jit
def _raw_logits(h, w, h_ptr, stride_h, w_ptr, stride_wv, stride_wd, rows, row_mask, vocab_rows, vocab_mask, D,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """h W^T for one [BLOCK_M, BLOCK_V] tile: from the register tiles ``h``, ``w`` when d fits one
    block, else over d in BLOCK_D chunks."""
    s = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    if SINGLE_D:
        s = _dot(h, tl.trans(w), s, UPCAST, IEEE)
    else:
        s = _dot_rows_chunked(s, h_ptr, rows, row_mask, stride_h, w_ptr, vocab_rows, vocab_mask, stride_wv,
                              stride_wd, D, BLOCK_D, UPCAST, IEEE)
    return s


@triton.jit
def _finish_logits(s, b_ptr, vocab_rows, vocab_mask, inv_temperature, softcap,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Raw h W^T -> final logits z: + bias, / T, softcap; -inf outside the vocabulary range."""
    if HAS_BIAS:
        s += tl.load(b_ptr + vocab_rows, mask=vocab_mask, other=0.0).to(tl.float32)[None, :]
    z = s * inv_temperature
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return tl.where(vocab_mask[None, :], z, float("-inf"))


@triton.jit
def _row_block(h_ptr, g_ptr, lse_ptr, delta_ptr, rows, row_mask, stride_h, stride_g, D, DE,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DE: tl.constexpr,
               SINGLE_D: tl.constexpr, ACC_IN_REGS: tl.constexpr):
    """A row block's backward inputs: lse, delta, and the hidden / dO register tiles where they fit."""
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=row_mask, other=0.0)
    d_all = tl.arange(0, BLOCK_D)
    de_all = tl.arange(0, BLOCK_DE)
    h = tl.zeros([BLOCK_M, BLOCK_D], dtype=h_ptr.dtype.element_ty)
    g = tl.zeros([BLOCK_M, BLOCK_DE], dtype=g_ptr.dtype.element_ty)
    if SINGLE_D:
        h = _load_tile(h_ptr, rows, row_mask, stride_h, d_all, d_all < D, 1)
    if ACC_IN_REGS:
        g = _load_tile(g_ptr, rows, row_mask, stride_g, de_all, de_all < DE, 1)
    return lse, delta, h, g


@triton.jit
def _vocab_tile(w_ptr, e_ptr, vocab_rows, vocab_mask, stride_wv, stride_wd, stride_ev, stride_ed, D, DE,
                BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DE: tl.constexpr, SINGLE_D: tl.constexpr,
                ACC_IN_REGS: tl.constexpr, TIED: tl.constexpr):
    """The W and E register tiles of a vocabulary tile where they fit (tied: the W tile is the E tile)."""
    d_all = tl.arange(0, BLOCK_D)
    de_all = tl.arange(0, BLOCK_DE)
    w = tl.zeros([BLOCK_V, BLOCK_D], dtype=w_ptr.dtype.element_ty)
    values = tl.zeros([BLOCK_V, BLOCK_DE], dtype=e_ptr.dtype.element_ty)
    if SINGLE_D:
        w = _load_tile(w_ptr, vocab_rows, vocab_mask, stride_wv, d_all, d_all < D, stride_wd)
    if ACC_IN_REGS:
        if TIED and SINGLE_D:
            values = w
        else:
            values = _load_tile(e_ptr, vocab_rows, vocab_mask, stride_ev, de_all, de_all < DE, stride_ed)
    return w, values


@triton.jit
def _probs_and_grad(h, w, values, g, h_ptr, stride_h, w_ptr, stride_wv, stride_wd, e_ptr, stride_ev, stride_ed,
                    b_ptr, g_ptr, stride_g, lse, delta, rows, row_mask, vocab_rows, vocab_mask, D, DE,
                    inv_temperature, softcap,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DE: tl.constexpr,
                    SINGLE_D: tl.constexpr, ACC_IN_REGS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Recompute p = exp(z - lse) for one (row block, vocabulary tile) and the raw-logit gradient.

    ``h``/``w`` are register tiles when SINGLE_D; ``values`` (the E tile) and ``g`` (the dO block)
    are register tiles when ACC_IN_REGS, else dO and E are read chunk by chunk. A row with lse = -inf
    (fully masked) gets NaN probabilities, like the reference.
    """
    s = _raw_logits(h, w, h_ptr, stride_h, w_ptr, stride_wv, stride_wd, rows, row_mask, vocab_rows, vocab_mask,
                    D, BLOCK_M, BLOCK_V, BLOCK_D, SINGLE_D, UPCAST, IEEE)
    z = _finish_logits(s, b_ptr, vocab_rows, vocab_mask, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
    p = tl.exp(z - lse[:, None])
    p = tl.where(row_mask[:, None], p, 0.0)
    dp = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    if ACC_IN_REGS:
        dp = _dot(g, tl.trans(values), dp, UPCAST, IEEE)
    else:
        dp = _dot_rows_chunked(dp, g_ptr, rows, row_mask, stride_g, e_ptr, vocab_rows, vocab_mask, stride_ev,
                               stride_ed, DE, BLOCK_DE, UPCAST, IEEE)
    return p, _raw_logit_grad(p, dp, delta, z, vocab_mask, inv_temperature, softcap, HAS_SOFTCAP)


@triton.jit
def _raw_logit_grad(p, dp, delta, z, vocab_mask, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """d loss / d raw logit (before temperature and softcap) from p, dp = dO E^T and delta = <dO, O>."""
    dz = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        t = tl.where(vocab_mask[None, :], z, 0.0) / softcap  # z = c tanh(.): tanh' = 1 - (z / c)^2
        dz = dz * (1.0 - t * t)
    return dz * inv_temperature

"""Triton backend (``backend="triton"``): the op as single-query attention over the vocabulary.

Queries are hidden rows, keys are LM-head rows W_j, values are embedding rows E_j. Nothing of size
[B, V] is ever written: logits exist one [BLOCK_M, BLOCK_V] tile at a time, in registers.

Kernels (tile shapes and split counts come from ``triton_config.choose_config``)
    ``_forward_partials_kernel``  grid (row blocks, vocabulary splits): online softmax over the
        split's tiles, a partial (max m, sum l, unnormalized accumulator) per (split, row).
    ``_combine_kernel``           grid (rows, d_e blocks): merges the splits of a row exactly,
        writes the fp32 output and the logsumexp (the only thing saved for backward).
    ``_backward_hidden_kernel``   grid (row blocks, splits): dh partials per split (LoRA training:
        W and E frozen, so this is the whole backward), summed over splits by the launcher.
    ``_backward_tiles_kernel``    grid (splits,): each program owns whole vocabulary tiles and loops
        over every row block, so dW, dE, db rows are written by one program (no atomics,
        deterministic); with ``NEED_H`` it also emits the dh partials from the same recomputed
        logits and dp ("folded": 5 GEMM-equivalents for the full backward instead of 7).

    ``_sum_splits_kernel``        grid (rows, d blocks): the dh partials summed in split order (a
        fixed order whatever B is: batch-invariant) and cast to the hidden's dtype.

The vocabulary-chunked GEMM path (``OpConfig.kind == "gemm"``: B > 16 at chunked widths, B >= 64 up
to d = 1024; see ``triton_config``): per chunk of the vocabulary, cuBLAS computes z = h W_c^T and
dp = dO E_c^T with fp32 results, ``_chunk_softmax_kernel`` / ``_chunk_grad_kernel`` turn them into p
and dz (the online-softmax update and the bias gradient), and cuBLAS applies p E_c, dz W_c, dz^T h,
p^T dO. The [B, chunk] buffers are bounded (``GEMM_BUFFER_BYTES``, at most half the vocabulary). It
reads W and E once per pass at the tensor-core rate; its weakness is the fp32 accumulator rescale
between chunks and, for W re-read by a later GEMM of the same chunk, L2 capacity (see roofline).

Large d. When d (or d_e) fits one block of <= 128 (padded) the hidden rows, W tiles and the
accumulator live in registers: the classic one-pass online softmax. Real widths (576, 896, 3584,
4096) do not fit: logits are accumulated over d in 64-wide chunks, and a [BLOCK_M, d_e] accumulator
(forward) or [BLOCK_M, d] dh / [BLOCK_V, d] dW, dE (backward) lives in a program-private fp32 slice
that is read, updated and written chunk by chunk per tile (``_rmw_product``). Only real rows touch
the slice (masked rows move no bytes), so at decode sizes it is a few KiB per program and stays in
L2; HBM sees each W / E tile once per call (row blocks of one split run side by side and share the
tiles through L2; the tied value chunks re-read a tile that was just read).

Read-modify-write discipline (no lost updates): a slice is only ever touched by the one program
that owns it, and every pass that stores to a slice another pass will reload ends with
``tl.debug_barrier()`` (a CTA barrier: it orders the warps' global stores before any later load of
the same addresses by another warp of the program; the compiler may give the load and the store
different thread layouts). Register-resident accumulators are combined in registers and stored once
(the tied dW + dE merge adds the two register tiles). The AOT gate (``triton_aot``) checks every
compiled kernel that loads and stores one argument for a barrier.

Masked vocabularies (-inf in the bias): the online softmax uses the FlashAttention safe max (while
every logit seen is -inf it subtracts 0, so exp(-inf - -inf) never appears); empty splits carry
(m = -inf, l = 0, acc = 0) and the combine skips them. A row whose every entry is -inf behaves
exactly like ``torch.softmax`` of an all -inf row: output NaN, lse -inf, NaN gradients.

Strides: ``hidden`` and ``grad_out`` have a unit last stride; W and E take any 2-D strides (both
are kernel arguments), e.g. a transposed view of a [d, V] matrix. Triton's JIT specializes a stride
of 1 to a constant, so the row-major and the column-major layouts each get vectorized loads.

Memory and streams: every buffer (partials, outputs) is allocated per call from PyTorch's caching
allocator on the tensors' device, inside ``torch.cuda.device(hidden.device)``: stream-ordered, so
two streams never share scratch, and under CUDA-graph capture the allocations come from the graph's
private pool and stay valid for every replay. No host synchronization anywhere in the launch path.

Precision: fp32 accumulation everywhere; fp32 inputs use three-pass TF32 dots (~fp32 accurate).
16-bit inputs feed tensor cores with p / dz rounded to the input dtype, as FlashAttention does. The
Triton interpreter miscomputes bf16 ``tl.dot``, so when interpreting (only) operands are upcast to
fp32 (``UPCAST``; the AOT gate checks that compiled 16-bit kernels keep 16-bit dot operands).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings

import torch
import triton
import triton.language as tl

from .triton_config import (COMBINE_BLOCK_DE, COMBINE_BLOCK_S, GEMM_GRAD_BLOCK_C, GEMM_GRAD_ROWS, GEMM_SOFTMAX_BLOCK,
                            SUM_BLOCK_N, KernelConfig, OpConfig, choose_config, num_sms)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# Tile helpers
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _forward_partials_kernel(
    h_ptr, w_ptr, e_ptr, b_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    B, V, D, DE, stride_h, stride_wv, stride_wd, stride_ev, stride_ed, tiles_per_split,
    inv_temperature, softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DE: tl.constexpr,
    SINGLE_D: tl.constexpr, ACC_IN_REGS: tl.constexpr, TIED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Online softmax of rows [pid_m * BLOCK_M, +BLOCK_M) over the split's vocabulary tiles.

    Per tile it reads W[tile] (BLOCK_V x d) and E[tile] (BLOCK_V x d_e) once -- the bytes the op
    cannot avoid -- plus, when d_e is chunked, the real rows' fp32 accumulator slice (read and write,
    ``4 * 2 * rows * d_e`` bytes, L2-resident). Writes (m, l, acc) of its rows once at the end.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    d_all = tl.arange(0, BLOCK_D)
    de_all = tl.arange(0, BLOCK_DE)
    h = tl.zeros([BLOCK_M, BLOCK_D], dtype=h_ptr.dtype.element_ty)
    if SINGLE_D:  # the query rows stay in registers for the whole walk
        h = _load_tile(h_ptr, rows, row_mask, stride_h, d_all, d_all < D, 1)
    # This program's private slice of the partials: rows (split * B + rows) of [splits * B, *].
    ws_rows = (split * B + rows).to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DE], dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        vocab_rows = v0 + tl.arange(0, BLOCK_V)
        vocab_mask = vocab_rows < v_end
        w = tl.zeros([BLOCK_V, BLOCK_D], dtype=w_ptr.dtype.element_ty)
        if SINGLE_D:
            w = _load_tile(w_ptr, vocab_rows, vocab_mask, stride_wv, d_all, d_all < D, stride_wd)
        s = _raw_logits(h, w, h_ptr, stride_h, w_ptr, stride_wv, stride_wd, rows, row_mask, vocab_rows,
                        vocab_mask, D, BLOCK_M, BLOCK_V, BLOCK_D, SINGLE_D, UPCAST, IEEE)
        z = _finish_logits(s, b_ptr, vocab_rows, vocab_mask, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)

        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        # Safe max: while every logit so far is -inf (masked), subtract 0, never -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)  # 0 while nothing was seen (m_i = -inf)
        p = tl.exp(z - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        if ACC_IN_REGS:
            if TIED and SINGLE_D:
                values = w  # tied: the W tile already in registers is the value tile
            else:
                values = _load_tile(e_ptr, vocab_rows, vocab_mask, stride_ev, de_all, de_all < DE, stride_ed)
            acc = _dot(p.to(values.dtype), values, acc * alpha[:, None], UPCAST, IEEE)
        else:
            # The first tile starts the slice (the buffer holds garbage); later ones rescale and add.
            _rmw_product(part_acc_ptr, ws_rows, row_mask, DE, alpha[:, None], v0 > v_begin,
                         p, e_ptr, vocab_rows, vocab_mask, stride_ev, stride_ed,
                         p, e_ptr, vocab_rows, vocab_mask, stride_ev, stride_ed, False, BLOCK_DE, UPCAST, IEEE)

    if ACC_IN_REGS:
        offs = ws_rows[:, None] * DE + de_all[None, :]
        tl.store(part_acc_ptr + offs, acc, mask=row_mask[:, None] & (de_all < DE)[None, :])
    tl.store(part_max_ptr + ws_rows, m_i, mask=row_mask)
    tl.store(part_sum_ptr + ws_rows, l_i, mask=row_mask)


@triton.jit
def _combine_kernel(part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, lse_ptr, B, DE, S,
                    BLOCK_S: tl.constexpr, BLOCK_DE: tl.constexpr):
    """Merge the S splits of one row for BLOCK_DE output columns: exact rescaling by each split's max.

    Reads [BLOCK_S, BLOCK_DE] blocks of the partials (vectorized) and skips splits with nothing
    unmasked (m = -inf). A fully masked row ends with l = 0: out = 0 / 0 = NaN, lse = -inf.
    """
    row = tl.program_id(0)
    pid_de = tl.program_id(1)
    de = pid_de * BLOCK_DE + tl.arange(0, BLOCK_DE)
    de_mask = de < DE
    m_all = float("-inf")
    for s0 in range(0, S, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        m = tl.load(part_max_ptr + splits * B + row, mask=splits < S, other=float("-inf"))
        m_all = tl.maximum(m_all, tl.max(m, axis=0))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_all = 0.0
    out = tl.zeros([BLOCK_DE], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        m = tl.load(part_max_ptr + splits * B + row, mask=splits < S, other=float("-inf"))
        live = m > float("-inf")  # empty and padding splits: no load, weight 0
        scale = tl.where(live, tl.exp(m - m_safe), 0.0)
        l_all += tl.sum(tl.load(part_sum_ptr + splits * B + row, mask=live, other=0.0) * scale, axis=0)
        ws_rows = (splits * B + row).to(tl.int64)
        acc = tl.load(part_acc_ptr + ws_rows[:, None] * DE + de[None, :], mask=live[:, None] & de_mask[None, :],
                      other=0.0)
        out += tl.sum(acc * scale[:, None], axis=0)
    tl.store(out_ptr + row.to(tl.int64) * DE + de, out / l_all, mask=de_mask)
    if pid_de == 0:
        tl.store(lse_ptr + row, m_all + tl.log(l_all))


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _backward_hidden_kernel(
    h_ptr, w_ptr, e_ptr, b_ptr, g_ptr, lse_ptr, delta_ptr, part_dh_ptr,
    B, V, D, DE, stride_h, stride_wv, stride_wd, stride_ev, stride_ed, stride_g, tiles_per_split,
    inv_temperature, softcap, filter_eps,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DE: tl.constexpr,
    SINGLE_D: tl.constexpr, ACC_IN_REGS: tl.constexpr, TIED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """dh partial of rows [pid_m * BLOCK_M, +BLOCK_M) over the split's tiles: dh += dz W[tile].

    Per tile: W[tile] for the logits, E[tile] for dp = dO E^T, W[tile] again for dz W (from
    registers when d fits, else the chunks just read, from L2); with chunked d the real rows' fp32
    dh slice is read and written once (L2-resident). Writes its [rows, d] partial once (registers)
    or leaves it in the slice.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    d_all = tl.arange(0, BLOCK_D)
    lse, delta, h, g = _row_block(h_ptr, g_ptr, lse_ptr, delta_ptr, rows, row_mask, stride_h, stride_g, D, DE,
                                  BLOCK_M, BLOCK_D, BLOCK_DE, SINGLE_D, ACC_IN_REGS)
    ws_rows = (split * B + rows).to(tl.int64)
    dh = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if not SINGLE_D:  # the partial lives in the slice: start it at zero (tiles may be filtered out)
        _fill_rows(part_dh_ptr, ws_rows, row_mask, D, 0.0, BLOCK_M, BLOCK_D)

    for v0 in range(v_begin, v_end, BLOCK_V):
        vocab_rows = v0 + tl.arange(0, BLOCK_V)
        vocab_mask = vocab_rows < v_end
        w, values = _vocab_tile(w_ptr, e_ptr, vocab_rows, vocab_mask, stride_wv, stride_wd, stride_ev, stride_ed,
                                D, DE, BLOCK_V, BLOCK_D, BLOCK_DE, SINGLE_D, ACC_IN_REGS, TIED)
        p, dz = _probs_and_grad(
            h, w, values, g, h_ptr, stride_h, w_ptr, stride_wv, stride_wd, e_ptr, stride_ev, stride_ed, b_ptr,
            g_ptr, stride_g, lse, delta, rows, row_mask, vocab_rows, vocab_mask, D, DE, inv_temperature, softcap,
            BLOCK_M, BLOCK_V, BLOCK_D, BLOCK_DE, SINGLE_D, ACC_IN_REGS, HAS_BIAS, HAS_SOFTCAP, UPCAST, IEEE)
        keep = True
        if FILTER:
            keep = tl.max(tl.max(p, axis=1), axis=0) >= filter_eps
        if keep:
            if SINGLE_D:
                dh = _dot(dz.to(w.dtype), w, dh, UPCAST, IEEE)
            else:
                _rmw_product(part_dh_ptr, ws_rows, row_mask, D, 1.0, True,
                             dz, w_ptr, vocab_rows, vocab_mask, stride_wv, stride_wd,
                             dz, w_ptr, vocab_rows, vocab_mask, stride_wv, stride_wd, False, BLOCK_D, UPCAST, IEEE)
    if SINGLE_D:
        tl.store(part_dh_ptr + ws_rows[:, None] * D + d_all[None, :], dh,
                 mask=row_mask[:, None] & (d_all < D)[None, :])


@triton.jit
def _backward_tiles_kernel(
    h_ptr, w_ptr, e_ptr, b_ptr, g_ptr, lse_ptr, delta_ptr, part_dh_ptr, dw_ptr, de_ptr, db_ptr,
    B, V, D, DE, stride_h, stride_wv, stride_wd, stride_ev, stride_ed, stride_g, tiles_per_split,
    inv_temperature, softcap, filter_eps,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DE: tl.constexpr,
    SINGLE_D: tl.constexpr, ACC_IN_REGS: tl.constexpr, TIED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_E: tl.constexpr, NEED_B: tl.constexpr,
    MERGE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Every gradient of the split's vocabulary tiles from one recomputation of p and dz.

    The program owns tiles [split * tiles_per_split, +tiles_per_split) and, per tile, loops over all
    row blocks: it alone writes that tile's rows of dW, dE (MERGE: their sum, one tensor passed as
    both weights) and db, so weight gradients need no atomics and are bit-for-bit deterministic.
    With NEED_H it also adds dz W[tile] into its [B, d] dh partial (summed over splits by the
    launcher). Per tile: W[tile] and E[tile] once from HBM (kept in registers when d, d_e fit, else
    re-read chunk-wise from L1/L2 per row block); dW / dE tiles accumulate in registers and are stored
    once in the output dtype, or -- chunked -- in the output rows: written once in the weights' dtype
    when one row block holds every row, else fp32 rows read and written per row block.
    """
    split = tl.program_id(0)
    num_tiles = tl.cdiv(V, BLOCK_V)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(num_tiles, t_begin + tiles_per_split)
    d_all = tl.arange(0, BLOCK_D)
    de_all = tl.arange(0, BLOCK_DE)
    if NEED_H:  # this split's dh partial starts at zero
        for m0 in range(0, B, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            _fill_rows(part_dh_ptr, (split * B + rows).to(tl.int64), rows < B, D, 0.0, BLOCK_M, BLOCK_D)

    for t in range(t_begin, t_end):
        vocab_rows = t * BLOCK_V + tl.arange(0, BLOCK_V)
        vocab_mask = vocab_rows < V
        v_rows64 = vocab_rows.to(tl.int64)
        w, values = _vocab_tile(w_ptr, e_ptr, vocab_rows, vocab_mask, stride_wv, stride_wd, stride_ev, stride_ed,
                                D, DE, BLOCK_V, BLOCK_D, BLOCK_DE, SINGLE_D, ACC_IN_REGS, TIED)
        dw = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32)
        dem = tl.zeros([BLOCK_V, BLOCK_DE], dtype=tl.float32)
        db = tl.zeros([BLOCK_V], dtype=tl.float32)
        started = 0  # chunked dW / dE rows: the first kept row block stores, later ones accumulate
        for m0 in range(0, B, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_mask = rows < B
            lse, delta, h, g = _row_block(h_ptr, g_ptr, lse_ptr, delta_ptr, rows, row_mask, stride_h, stride_g, D, DE,
                                          BLOCK_M, BLOCK_D, BLOCK_DE, SINGLE_D, ACC_IN_REGS)
            p, dz = _probs_and_grad(
                h, w, values, g, h_ptr, stride_h, w_ptr, stride_wv, stride_wd, e_ptr, stride_ev, stride_ed, b_ptr,
                g_ptr, stride_g, lse, delta, rows, row_mask, vocab_rows, vocab_mask, D, DE, inv_temperature,
                softcap, BLOCK_M, BLOCK_V, BLOCK_D, BLOCK_DE, SINGLE_D, ACC_IN_REGS, HAS_BIAS, HAS_SOFTCAP,
                UPCAST, IEEE)
            keep = True
            if FILTER:
                keep = tl.max(tl.max(p, axis=1), axis=0) >= filter_eps
            if keep:
                if NEED_B:
                    db += tl.sum(dz, axis=0)
                if NEED_H:
                    dh_rows = (split * B + rows).to(tl.int64)
                    if SINGLE_D:
                        offs = dh_rows[:, None] * D + d_all[None, :]
                        dh_mask = row_mask[:, None] & (d_all < D)[None, :]
                        prev = tl.load(part_dh_ptr + offs, mask=dh_mask, other=0.0)
                        tl.store(part_dh_ptr + offs, _dot(dz.to(w.dtype), w, prev, UPCAST, IEEE), mask=dh_mask)
                        tl.debug_barrier()  # the next tile reloads these rows
                    else:
                        _rmw_product(part_dh_ptr, dh_rows, row_mask, D, 1.0, True,
                                     dz, w_ptr, vocab_rows, vocab_mask, stride_wv, stride_wd,
                                     dz, w_ptr, vocab_rows, vocab_mask, stride_wv, stride_wd, False, BLOCK_D, UPCAST,
                                     IEEE)
                dz_t = tl.trans(dz.to(h_ptr.dtype.element_ty))
                p_t = tl.trans(p.to(g_ptr.dtype.element_ty))
                if NEED_W:
                    if SINGLE_D:
                        dw = _dot(dz_t, h, dw, UPCAST, IEEE)
                    else:  # MERGE: dW + dE of the tied rows in one pass (dz^T h + p^T dO, d == d_e)
                        _rmw_product(dw_ptr, v_rows64, vocab_mask, D, 1.0, started > 0,
                                     dz_t, h_ptr, rows, row_mask, stride_h, 1,
                                     p_t, g_ptr, rows, row_mask, stride_g, 1, MERGE, BLOCK_D, UPCAST, IEEE)
                if NEED_E:
                    if ACC_IN_REGS:
                        dem = _dot(p_t, g, dem, UPCAST, IEEE)
                    elif not MERGE:
                        _rmw_product(de_ptr, v_rows64, vocab_mask, DE, 1.0, started > 0,
                                     p_t, g_ptr, rows, row_mask, stride_g, 1,
                                     p_t, g_ptr, rows, row_mask, stride_g, 1, False, BLOCK_DE, UPCAST, IEEE)
                started = 1

        if SINGLE_D:
            w_offs = v_rows64[:, None] * D + d_all[None, :]
            w_mask = vocab_mask[:, None] & (d_all < D)[None, :]
            if MERGE:  # one tensor was passed as both weights: its gradient is dW + dE, summed in registers
                tl.store(dw_ptr + w_offs, (dw + dem).to(dw_ptr.dtype.element_ty), mask=w_mask)
            elif NEED_W:
                tl.store(dw_ptr + w_offs, dw.to(dw_ptr.dtype.element_ty), mask=w_mask)
        elif NEED_W:
            if started == 0:  # every row block was filtered out: the rows are zero
                _fill_rows(dw_ptr, v_rows64, vocab_mask, D, 0.0, BLOCK_V, BLOCK_D)
        if ACC_IN_REGS:
            if NEED_E and not MERGE:
                tl.store(de_ptr + v_rows64[:, None] * DE + de_all[None, :], dem.to(de_ptr.dtype.element_ty),
                         mask=vocab_mask[:, None] & (de_all < DE)[None, :])
        elif NEED_E and not MERGE:
            if started == 0:
                _fill_rows(de_ptr, v_rows64, vocab_mask, DE, 0.0, BLOCK_V, BLOCK_DE)
        if NEED_B:
            tl.store(db_ptr + vocab_rows, db.to(db_ptr.dtype.element_ty), mask=vocab_mask)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, S, R, N, BLOCK_N: tl.constexpr):
    """``out[r, cols] = sum_s part[s, r, cols]`` in split order (fixed, whatever R is), cast to out's dtype.

    Reads each fp32 partial once (vectorized BLOCK_N columns), writes the gradient rows once.
    """
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(part_ptr + (s * R + row).to(tl.int64) * N + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row.to(tl.int64) * N + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# The vocabulary-chunked GEMM path (kind "gemm"): cuBLAS for the products, Triton in between
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Launch plans: the launchers run them, the AOT gate compiles exactly them
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    """One kernel launch: runtime arguments in the kernel's parameter order, constexprs, options."""
    name: str
    kernel: object
    grid: tuple
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def _tile_flags(kc: KernelConfig, dtype, tied, has_bias, has_softcap, upcast) -> dict:
    return dict(
        BLOCK_M=kc.block_m, BLOCK_V=kc.block_v, BLOCK_D=kc.block_d, BLOCK_DE=kc.block_de,
        SINGLE_D=kc.single_d, ACC_IN_REGS=kc.acc_in_registers,
        # Tile reuse needs the value tile to be the W tile exactly: same matrix, same width.
        TIED=bool(tied) and kc.d == kc.d_embed,
        HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, UPCAST=upcast, IEEE=dtype == torch.float32,
    )


def _weights_args(hidden, lm_head_weight, embed_weight):
    return dict(B=hidden.shape[0], V=lm_head_weight.shape[0], D=lm_head_weight.shape[1], DE=embed_weight.shape[1],
                stride_h=hidden.stride(0), stride_wv=lm_head_weight.stride(0), stride_wd=lm_head_weight.stride(1),
                stride_ev=embed_weight.stride(0), stride_ed=embed_weight.stride(1))


def forward_plan(cfg: OpConfig, hidden, lm_head_weight, embed_weight, lm_head_bias, out32, lse, *,
                 temperature, softcap, tied, upcast) -> list[Launch]:
    """The forward's two launches for ``hidden`` (one row group), writing ``out32`` and ``lse``."""
    kc = cfg.forward
    rows, de = hidden.shape[0], embed_weight.shape[1]
    splits = kc.num_splits
    part_acc = torch.empty(splits * rows, de, dtype=torch.float32, device=hidden.device)
    part_ml = torch.empty(2, splits * rows, dtype=torch.float32, device=hidden.device)
    bias = lm_head_bias if lm_head_bias is not None else hidden  # never read (HAS_BIAS=False)
    partials = Launch(
        "forward_partials", _forward_partials_kernel, (kc.row_blocks(rows), splits),
        dict(h_ptr=hidden, w_ptr=lm_head_weight, e_ptr=embed_weight, b_ptr=bias, part_acc_ptr=part_acc,
             part_max_ptr=part_ml[0], part_sum_ptr=part_ml[1],
             **_weights_args(hidden, lm_head_weight, embed_weight), tiles_per_split=kc.tiles_per_split,
             inv_temperature=1.0 / temperature, softcap=1.0 if softcap is None else softcap),
        _tile_flags(kc, hidden.dtype, tied, lm_head_bias is not None, softcap is not None, upcast),
        kc.num_warps, kc.num_stages)
    combine = Launch(
        "combine", _combine_kernel, (rows, triton.cdiv(de, COMBINE_BLOCK_DE)),
        dict(part_acc_ptr=part_acc, part_max_ptr=part_ml[0], part_sum_ptr=part_ml[1], out_ptr=out32, lse_ptr=lse,
             B=rows, DE=de, S=splits),
        dict(BLOCK_S=COMBINE_BLOCK_S, BLOCK_DE=COMBINE_BLOCK_DE), 4, 2)
    return [partials, combine]


def _sum_splits_launch(part_dh, d_hidden) -> Launch:
    splits, rows, d = part_dh.shape
    return Launch("sum_splits", _sum_splits_kernel, (rows, triton.cdiv(d, SUM_BLOCK_N)),
                  dict(part_ptr=part_dh, out_ptr=d_hidden, S=splits, R=rows, N=d), dict(BLOCK_N=SUM_BLOCK_N), 4, 2)


def backward_hidden_plan(cfg: OpConfig, grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta,
                         d_hidden, *, temperature, softcap, tied, grad_filter_eps, upcast) -> list[Launch]:
    """The dh launches for one row group: per-split fp32 partials, then their sum into ``d_hidden``."""
    kc = cfg.backward_hidden
    rows, d = hidden.shape
    part_dh = torch.empty(kc.num_splits, rows, d, dtype=torch.float32, device=hidden.device)
    bias = lm_head_bias if lm_head_bias is not None else hidden
    launch = Launch(
        "backward_hidden", _backward_hidden_kernel, (kc.row_blocks(rows), kc.num_splits),
        dict(h_ptr=hidden, w_ptr=lm_head_weight, e_ptr=embed_weight, b_ptr=bias, g_ptr=grad_out, lse_ptr=lse,
             delta_ptr=delta, part_dh_ptr=part_dh, **_weights_args(hidden, lm_head_weight, embed_weight),
             stride_g=grad_out.stride(0), tiles_per_split=kc.tiles_per_split, inv_temperature=1.0 / temperature,
             softcap=1.0 if softcap is None else softcap, filter_eps=float(grad_filter_eps)),
        {**_tile_flags(kc, hidden.dtype, tied, lm_head_bias is not None, softcap is not None, upcast),
         "FILTER": grad_filter_eps > 0},
        kc.num_warps, kc.num_stages)
    return [launch, _sum_splits_launch(part_dh, d_hidden)]


def backward_tiles_plan(cfg: OpConfig, grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, *,
                        temperature, softcap, tied, need_hidden, need_weight, need_embed, need_bias,
                        merge_tied_grads, grad_filter_eps, upcast) -> tuple[list[Launch], dict]:
    """The vocabulary-tile launch (weight gradients, and dh when ``need_hidden``) and its buffers.

    dW / dE come out in the weights' dtype when the tile accumulators live in registers (stored once),
    else as fp32 rows accumulated per row block (the caller casts them).
    """
    kc = cfg.backward_tiles
    rows, d = hidden.shape
    vocab, de = embed_weight.shape
    dev = hidden.device
    # One row block: every tile's gradient rows are complete after one pass, stored in the weights' dtype.
    single_pass = rows <= kc.block_m
    regs_w, regs_e = kc.single_d or single_pass, kc.acc_in_registers or single_pass
    merge = bool(merge_tied_grads)
    bufs = {}
    if need_hidden:
        bufs["part_dh"] = torch.empty(kc.num_splits, rows, d, dtype=torch.float32, device=dev)
        bufs["dh"] = torch.empty(rows, d, dtype=hidden.dtype, device=dev)
    if need_weight or merge:
        bufs["dw"] = torch.empty(vocab, d, dtype=lm_head_weight.dtype if regs_w else torch.float32, device=dev)
    if need_embed and not merge:
        bufs["de"] = torch.empty(vocab, de, dtype=embed_weight.dtype if regs_e else torch.float32, device=dev)
    if need_bias:
        bufs["db"] = torch.empty(vocab, dtype=lm_head_bias.dtype, device=dev)
    dummy = lse  # never touched: the matching NEED_* flag is off
    bias = lm_head_bias if lm_head_bias is not None else hidden
    launch = Launch(
        "backward_tiles", _backward_tiles_kernel, (kc.num_splits,),
        dict(h_ptr=hidden, w_ptr=lm_head_weight, e_ptr=embed_weight, b_ptr=bias, g_ptr=grad_out, lse_ptr=lse,
             delta_ptr=delta, part_dh_ptr=bufs.get("part_dh", dummy), dw_ptr=bufs.get("dw", dummy),
             de_ptr=bufs["dw"] if merge else bufs.get("de", dummy), db_ptr=bufs.get("db", dummy),
             **_weights_args(hidden, lm_head_weight, embed_weight), stride_g=grad_out.stride(0),
             tiles_per_split=kc.tiles_per_split, inv_temperature=1.0 / temperature,
             softcap=1.0 if softcap is None else softcap, filter_eps=float(grad_filter_eps)),
        {**_tile_flags(kc, hidden.dtype, tied, lm_head_bias is not None, softcap is not None, upcast),
         "FILTER": grad_filter_eps > 0, "NEED_H": bool(need_hidden), "NEED_W": bool(need_weight or merge),
         "NEED_E": bool(need_embed or merge), "NEED_B": bool(need_bias), "MERGE": merge},
        kc.num_warps, kc.num_stages)
    return [launch] + ([_sum_splits_launch(bufs["part_dh"], bufs["dh"])] if need_hidden else []), bufs


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


def _gemm_forward(cfg: OpConfig, hidden, lm_head_weight, embed_weight, lm_head_bias, out32, lse, *, temperature,
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


def _gemm_backward(cfg: OpConfig, grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, *,
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


# ----------------------------------------------------------------------------------------------
# Launchers (the backend contract of ``gircse_kernels.autograd``)
# ----------------------------------------------------------------------------------------------
def _check_layout(hidden, lm_head_weight, embed_weight):
    if hidden.dim() != 2 or hidden.stride(1) != 1:
        raise ValueError(f"triton backend: hidden must be 2-D with unit last stride, got strides {hidden.stride()}")
    for name, t in (("lm_head_weight", lm_head_weight), ("embed_weight", embed_weight)):
        if t.dim() != 2:
            raise ValueError(f"triton backend: {name} must be 2-D, got shape {tuple(t.shape)}")


def _device_guard(t: torch.Tensor):
    """Launch on the tensors' GPU, whatever the current device is."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def config_for(hidden, lm_head_weight, embed_weight, *, batch_invariant=False, num_splits=None, sms=None) -> OpConfig:
    """The configuration of a call (``sms`` overrides the device's SM count: the roofline model)."""
    return choose_config(hidden.shape[0], lm_head_weight.shape[0], lm_head_weight.shape[1], embed_weight.shape[1],
                         hidden.dtype, sms or num_sms(hidden.device), batch_invariant=bool(batch_invariant),
                         num_splits=num_splits)


def _row_groups(cfg: OpConfig):
    for start in range(0, cfg.rows, cfg.row_group):
        yield slice(start, min(cfg.rows, start + cfg.row_group))


def forward_launches(hidden, lm_head_weight, embed_weight, lm_head_bias, out32, lse, *, temperature, softcap, tied,
                     batch_invariant=False, num_splits=None, upcast=None, sms=None) -> list[Launch]:
    """Every launch of one forward call of the fused kernels (row groups included), writing ``out32`` and
    ``lse``. (A "gemm" configuration runs ``_gemm_forward`` instead.)"""
    cfg = config_for(hidden, lm_head_weight, embed_weight, batch_invariant=batch_invariant, num_splits=num_splits,
                     sms=sms)
    if cfg.kind == "gemm":
        raise ValueError("forward_launches: this shape takes the vocabulary-chunked GEMM path")
    upcast = interpreting() if upcast is None else upcast
    launches = []
    for rs in _row_groups(cfg):
        launches += forward_plan(cfg, hidden[rs], lm_head_weight, embed_weight, lm_head_bias, out32[rs], lse[rs],
                                 temperature=temperature, softcap=softcap, tied=tied, upcast=upcast)
    return launches


def backward_launches(grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, *, temperature,
                      softcap, tied, need_hidden, need_weight, need_embed, need_bias, merge_tied_grads,
                      grad_filter_eps, batch_invariant=False, num_splits=None, upcast=None, sms=None):
    """Every launch of one backward call and the buffers they fill: ``dh`` (hidden's dtype), ``dw`` /
    ``de`` (the weights' dtype, or fp32 rows to cast), ``db`` (the bias's dtype). Fused kernels only."""
    cfg = config_for(hidden, lm_head_weight, embed_weight, batch_invariant=batch_invariant, num_splits=num_splits,
                     sms=sms)
    if cfg.kind == "gemm":
        raise ValueError("backward_launches: this shape takes the vocabulary-chunked GEMM path")
    need_weights = need_weight or need_embed or need_bias
    fold = need_hidden and need_weights and cfg.fold_backward
    common = dict(temperature=temperature, softcap=softcap, tied=tied, grad_filter_eps=grad_filter_eps,
                  upcast=interpreting() if upcast is None else upcast)
    launches, bufs = [], {}
    if need_hidden and not fold:
        bufs["dh"] = torch.empty_like(hidden)
        for rs in _row_groups(cfg):
            launches += backward_hidden_plan(cfg, grad_out[rs], hidden[rs], lm_head_weight, embed_weight,
                                             lm_head_bias, lse[rs], delta[rs], bufs["dh"][rs], **common)
    if need_weights:
        tile_launches, tile_bufs = backward_tiles_plan(
            cfg, grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, need_hidden=fold,
            need_weight=need_weight, need_embed=need_embed, need_bias=need_bias,
            merge_tied_grads=merge_tied_grads and need_weight and need_embed, **common)
        launches += tile_launches
        bufs.update(tile_bufs)
    return launches, bufs


def forward(hidden, lm_head_weight, embed_weight, lm_head_bias, *, temperature, softcap, tied=False,
            batch_invariant=False, num_splits=None):
    _check_layout(hidden, lm_head_weight, embed_weight)
    cfg = config_for(hidden, lm_head_weight, embed_weight, batch_invariant=batch_invariant, num_splits=num_splits)
    with _device_guard(hidden):
        out32 = torch.empty(hidden.shape[0], embed_weight.shape[1], dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        if cfg.kind == "gemm":
            _gemm_forward(cfg, hidden, lm_head_weight, embed_weight, lm_head_bias, out32, lse,
                          temperature=temperature, softcap=softcap)
            return out32, lse
        for launch in forward_launches(hidden, lm_head_weight, embed_weight, lm_head_bias, out32, lse,
                                       temperature=temperature, softcap=softcap, tied=tied,
                                       batch_invariant=batch_invariant, num_splits=num_splits):
            launch()
    return out32, lse


def backward(grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, *, temperature,
             softcap, tied=False, need_hidden=True, need_weight=False, need_embed=False, need_bias=False,
             merge_tied_grads=False, grad_filter_eps=0.0, batch_invariant=False, num_splits=None):
    _check_layout(hidden, lm_head_weight, embed_weight)
    with _device_guard(hidden):
        grad_out = grad_out.to(embed_weight.dtype).contiguous()
        lse, delta = lse.float().contiguous(), delta.float().contiguous()
        cfg = config_for(hidden, lm_head_weight, embed_weight, batch_invariant=batch_invariant, num_splits=num_splits)
        if cfg.kind == "gemm":
            bufs = _gemm_backward(
                cfg, grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta,
                temperature=temperature, softcap=softcap, need_hidden=need_hidden, need_weight=need_weight,
                need_embed=need_embed, need_bias=need_bias,
                merge_tied_grads=merge_tied_grads and need_weight and need_embed)
            return bufs.get("dh"), bufs.get("dw"), bufs.get("de"), bufs.get("db")
        launches, bufs = backward_launches(
            grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, temperature=temperature,
            softcap=softcap, tied=tied, need_hidden=need_hidden, need_weight=need_weight, need_embed=need_embed,
            need_bias=need_bias, merge_tied_grads=merge_tied_grads, grad_filter_eps=grad_filter_eps,
            batch_invariant=batch_invariant, num_splits=num_splits)
        for launch in launches:
            launch()
        d_weight = bufs["dw"].to(lm_head_weight.dtype) if "dw" in bufs else None
        d_embed = bufs["de"].to(embed_weight.dtype) if "de" in bufs else None
    return bufs.get("dh"), d_weight, d_embed, bufs.get("db")

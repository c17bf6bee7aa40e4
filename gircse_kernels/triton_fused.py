"""Triton backend (``backend="triton"``): the op as single-query attention over the vocabulary.

Queries are hidden rows, keys are LM-head rows W_j, values are embedding rows E_j. Nothing of size
[B, V] is ever written: logits exist one [BLOCK_M, BLOCK_V] tile at a time, in registers.

Forward (two kernels)
    ``_forward_partials_kernel``: grid (row blocks, vocabulary splits). Each program walks its
    vocabulary range tile by tile with an online softmax and leaves a partial (running max m, running
    sum l, unnormalized accumulator acc) in a small fp32 workspace [splits, B, *].
    ``_combine_kernel``: merges the splits of each row exactly (``M = max m_s``,
    ``out = sum_s e^{m_s - M} acc_s / sum_s e^{m_s - M} l_s``) and writes out and the logsumexp, the
    only thing saved for backward. With many splits this is flash-decoding (see ``triton_config``).

Large d. When d (or d_e) fits one block of <= 128 (padded) the hidden rows, W tiles and the
accumulator live in registers: the classic one-pass online softmax. Mistral's 4096 or Qwen's 3584
do not fit: the logits are then accumulated over d in chunks of 64 (the hidden chunks are re-read
from L1/L2 for every tile), and the [BLOCK_M, d_e] accumulator lives in the program's own slice of
the fp32 workspace, read-rescaled-written chunk by chunk per tile. The slice is private to one
program, so this needs no atomics and stays deterministic; its traffic (2 * BLOCK_M * d_e * 4 bytes
per tile) hits L2, while HBM still sees each W / E tile once.

Backward (recomputation from the saved LSE, as in FlashAttention / Cut Cross-Entropy)
    ``p = exp(z - lse)``, ``dp = dO E^T``, ``dz = p (dp - delta) * softcap' / T``, ``delta = <dO, O>``.
    ``_backward_hidden_kernel``: grid (row blocks, splits) accumulates ``dh = dz W`` per split into
    fp32 partials, summed over splits on the host side of the launch (a [splits, B, d] workspace).
    ``_backward_weights_kernel``: grid (vocabulary tiles); each program owns its tile's rows of dW,
    dE, db and loops over all row blocks, so weight gradients need no atomics and are bit-for-bit
    deterministic. It is launched only when a weight or the bias requires grad. Both kernels use the
    forward's tile shapes, so the recomputed logits match the forward's.

Tied weights (W is E): when d fits registers the tile loaded for the logits is reused as the value
tile (one load per tile); for chunked d the value chunks of a tile that was just read come from L2.
Gradient filtering (``grad_filter_eps > 0``): tiles whose probabilities are all below eps skip their
gradient work; the bound is in ``gircse_kernels.grad_filter``.

Precision: fp32 accumulation everywhere; fp32 inputs use IEEE dots (no TF32). 16-bit inputs feed
tensor cores with p / dz rounded to the input dtype, as FlashAttention does. The Triton interpreter
miscomputes bf16 ``tl.dot``, so when interpreting (only) operands are upcast to fp32 (``UPCAST``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_config import MAX_SPLITS, WORKSPACE, KernelConfig, choose_config, num_sms

COMBINE_BLOCK_DE = 128


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
def _load_rows(ptr, rows, row_mask, stride, cols, col_mask):
    """A [len(rows), len(cols)] block of a row-major matrix (unit last stride), zero outside."""
    offs = rows.to(tl.int64)[:, None] * stride + cols[None, :]
    return tl.load(ptr + offs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _raw_logits_chunked(h_ptr, stride_h, w_ptr, stride_w, rows, row_mask, vocab_rows, vocab_mask, D,
                        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """h W^T for one tile when d does not fit one block: accumulate over d in BLOCK_D chunks."""
    s = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        dk = k + tl.arange(0, BLOCK_D)
        d_mask = dk < D
        h = _load_rows(h_ptr, rows, row_mask, stride_h, dk, d_mask)
        w = _load_rows(w_ptr, vocab_rows, vocab_mask, stride_w, dk, d_mask)
        s = _dot(h, tl.trans(w), s, UPCAST, IEEE)
    return s


@triton.jit
def _add_product_chunked(out_ptr, out_rows, out_mask, a, x_ptr, x_rows, x_mask, stride_x, N,
                         BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``out[out_rows, :N] += a @ x[x_rows, :N]`` in BLOCK_N-wide chunks: the fp32 rows of ``out``
    (row-major, width N) are read, updated and written back by the one program that owns them."""
    for c in range(0, N, BLOCK_N):
        cols = c + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        x = _load_rows(x_ptr, x_rows, x_mask, stride_x, cols, col_mask)
        offs = out_rows.to(tl.int64)[:, None] * N + cols[None, :]
        mask = out_mask[:, None] & col_mask[None, :]
        prev = tl.load(out_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, _dot(a.to(x.dtype), x, prev, UPCAST, IEEE), mask=mask)


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
def _raw_logit_grad(p, dp, delta, z, vocab_mask, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """d loss / d raw logit (before temperature and softcap) from p, dp = dO E^T and delta."""
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
    B, V, D, DE, stride_h, stride_w, stride_e, tiles_per_split,
    inv_temperature, softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DE: tl.constexpr,
    SINGLE_D: tl.constexpr, ACC_IN_REGS: tl.constexpr, TIED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    d_all = tl.arange(0, BLOCK_D)
    de_all = tl.arange(0, BLOCK_DE)
    if SINGLE_D:  # the query rows stay in registers for the whole walk
        h = _load_rows(h_ptr, rows, row_mask, stride_h, d_all, d_all < D)
    # This program's private slice of the partial accumulator: [BLOCK_M rows, DE].
    ws_rows = (split * B + rows).to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DE], dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        vocab_rows = v0 + tl.arange(0, BLOCK_V)
        vocab_mask = vocab_rows < v_end
        if SINGLE_D:
            w = _load_rows(w_ptr, vocab_rows, vocab_mask, stride_w, d_all, d_all < D)
            s = _dot(h, tl.trans(w), tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32), UPCAST, IEEE)
        else:
            s = _raw_logits_chunked(h_ptr, stride_h, w_ptr, stride_w, rows, row_mask, vocab_rows, vocab_mask,
                                    D, BLOCK_M, BLOCK_V, BLOCK_D, UPCAST, IEEE)
        z = _finish_logits(s, b_ptr, vocab_rows, vocab_mask, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)

        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        alpha = tl.exp(m_i - m_new)  # 0 on the first tile (m_i = -inf, m_new finite)
        p = tl.exp(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        if ACC_IN_REGS:
            if TIED and SINGLE_D:
                values = w  # tied: the W tile already in registers is the value tile
            else:
                values = _load_rows(e_ptr, vocab_rows, vocab_mask, stride_e, de_all, de_all < DE)
            acc = _dot(p.to(values.dtype), values, acc * alpha[:, None], UPCAST, IEEE)
        else:
            carried = v0 > v_begin  # the first tile starts the accumulator (workspace holds garbage)
            for c in range(0, DE, BLOCK_DE):
                de = c + de_all
                de_mask = de < DE
                values = _load_rows(e_ptr, vocab_rows, vocab_mask, stride_e, de, de_mask)
                offs = ws_rows[:, None] * DE + de[None, :]
                ws_mask = row_mask[:, None] & de_mask[None, :]
                prev = tl.where(carried, tl.load(part_acc_ptr + offs, mask=ws_mask, other=0.0), 0.0)
                part = _dot(p.to(values.dtype), values, prev * alpha[:, None], UPCAST, IEEE)
                tl.store(part_acc_ptr + offs, part, mask=ws_mask)

    if ACC_IN_REGS:
        offs = ws_rows[:, None] * DE + de_all[None, :]
        tl.store(part_acc_ptr + offs, acc, mask=row_mask[:, None] & (de_all < DE)[None, :])
    tl.store(part_max_ptr + ws_rows, m_i, mask=row_mask)
    tl.store(part_sum_ptr + ws_rows, l_i, mask=row_mask)


@triton.jit
def _combine_kernel(part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, lse_ptr, B, DE, S,
                    BLOCK_S: tl.constexpr, BLOCK_DE: tl.constexpr):
    """Merge the S vocabulary splits of one row: exact rescaling by each split's max."""
    row = tl.program_id(0)
    pid_de = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    s_mask = splits < S
    m = tl.load(part_max_ptr + splits * B + row, mask=s_mask, other=float("-inf"))
    l = tl.load(part_sum_ptr + splits * B + row, mask=s_mask, other=0.0)
    m_all = tl.max(m, axis=0)
    l_all = tl.sum(l * tl.exp(m - m_all), axis=0)  # padding splits contribute exp(-inf) = 0
    de = pid_de * BLOCK_DE + tl.arange(0, BLOCK_DE)
    de_mask = de < DE
    out = tl.zeros([BLOCK_DE], dtype=tl.float32)
    for s in range(0, S):
        scale = tl.exp(tl.load(part_max_ptr + s * B + row) - m_all)
        ws_row = (s * B + row).to(tl.int64)
        out += scale * tl.load(part_acc_ptr + ws_row * DE + de, mask=de_mask, other=0.0)
    tl.store(out_ptr + row.to(tl.int64) * DE + de, out / l_all, mask=de_mask)
    if pid_de == 0:
        tl.store(lse_ptr + row, m_all + tl.log(l_all))


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tile_probs_and_grad(h, w, h_ptr, stride_h, w_ptr, stride_w, e_ptr, stride_e, b_ptr, g, g_ptr, stride_g,
                         lse, delta, rows, row_mask, vocab_rows, vocab_mask, D, DE, inv_temperature, softcap,
                         BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DE: tl.constexpr, SINGLE_D: tl.constexpr, ACC_IN_REGS: tl.constexpr,
                         TIED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Recompute p for one (row block, vocabulary tile) and the raw-logit gradient dz.

    ``h``/``w`` are the register tiles when SINGLE_D (else ignored); ``g`` is the dO block when
    ACC_IN_REGS (else dO is read chunk by chunk).
    """
    if SINGLE_D:
        s = _dot(h, tl.trans(w), tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32), UPCAST, IEEE)
    else:
        s = _raw_logits_chunked(h_ptr, stride_h, w_ptr, stride_w, rows, row_mask, vocab_rows, vocab_mask,
                                D, BLOCK_M, BLOCK_V, BLOCK_D, UPCAST, IEEE)
    z = _finish_logits(s, b_ptr, vocab_rows, vocab_mask, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
    p = tl.exp(z - lse[:, None])
    p = tl.where(row_mask[:, None], p, 0.0)
    de_all = tl.arange(0, BLOCK_DE)
    if ACC_IN_REGS:
        if TIED and SINGLE_D:
            values = w
        else:
            values = _load_rows(e_ptr, vocab_rows, vocab_mask, stride_e, de_all, de_all < DE)
        dp = _dot(g, tl.trans(values), tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32), UPCAST, IEEE)
    else:
        dp = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        for c in range(0, DE, BLOCK_DE):
            de = c + de_all
            de_mask = de < DE
            g_chunk = _load_rows(g_ptr, rows, row_mask, stride_g, de, de_mask)
            values = _load_rows(e_ptr, vocab_rows, vocab_mask, stride_e, de, de_mask)
            dp = _dot(g_chunk, tl.trans(values), dp, UPCAST, IEEE)
    dz = _raw_logit_grad(p, dp, delta, z, vocab_mask, inv_temperature, softcap, HAS_SOFTCAP)
    return p, dz


@triton.jit
def _backward_hidden_kernel(
    h_ptr, w_ptr, e_ptr, b_ptr, g_ptr, lse_ptr, delta_ptr, part_dh_ptr,
    B, V, D, DE, stride_h, stride_w, stride_e, stride_g, tiles_per_split,
    inv_temperature, softcap, filter_eps,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DE: tl.constexpr,
    SINGLE_D: tl.constexpr, ACC_IN_REGS: tl.constexpr, TIED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    d_all = tl.arange(0, BLOCK_D)
    de_all = tl.arange(0, BLOCK_DE)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=row_mask, other=0.0)
    h = tl.zeros([BLOCK_M, BLOCK_D], dtype=h_ptr.dtype.element_ty)
    g = tl.zeros([BLOCK_M, BLOCK_DE], dtype=g_ptr.dtype.element_ty)
    if SINGLE_D:
        h = _load_rows(h_ptr, rows, row_mask, stride_h, d_all, d_all < D)
    if ACC_IN_REGS:
        g = _load_rows(g_ptr, rows, row_mask, stride_g, de_all, de_all < DE)
    ws_rows = (split * B + rows).to(tl.int64)
    dh = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if not SINGLE_D:  # the partial dh lives in the workspace: start it at zero
        for k in range(0, D, BLOCK_D):
            dk = k + d_all
            tl.store(part_dh_ptr + ws_rows[:, None] * D + dk[None, :], dh,
                     mask=row_mask[:, None] & (dk < D)[None, :])

    for v0 in range(v_begin, v_end, BLOCK_V):
        vocab_rows = v0 + tl.arange(0, BLOCK_V)
        vocab_mask = vocab_rows < v_end
        w = tl.zeros([BLOCK_V, BLOCK_D], dtype=w_ptr.dtype.element_ty)
        if SINGLE_D:
            w = _load_rows(w_ptr, vocab_rows, vocab_mask, stride_w, d_all, d_all < D)
        p, dz = _tile_probs_and_grad(
            h, w, h_ptr, stride_h, w_ptr, stride_w, e_ptr, stride_e, b_ptr, g, g_ptr, stride_g, lse, delta,
            rows, row_mask, vocab_rows, vocab_mask, D, DE, inv_temperature, softcap,
            BLOCK_M, BLOCK_V, BLOCK_D, BLOCK_DE, SINGLE_D, ACC_IN_REGS, TIED, HAS_BIAS, HAS_SOFTCAP, UPCAST, IEEE)
        keep = True
        if FILTER:
            keep = tl.max(tl.max(p, axis=1), axis=0) >= filter_eps
        if keep:
            if SINGLE_D:
                dh = _dot(dz.to(w.dtype), w, dh, UPCAST, IEEE)
            else:
                _add_product_chunked(part_dh_ptr, ws_rows, row_mask, dz, w_ptr, vocab_rows, vocab_mask, stride_w,
                                     D, BLOCK_D, UPCAST, IEEE)
    if SINGLE_D:
        tl.store(part_dh_ptr + ws_rows[:, None] * D + d_all[None, :], dh,
                 mask=row_mask[:, None] & (d_all < D)[None, :])


@triton.jit
def _backward_weights_kernel(
    h_ptr, w_ptr, e_ptr, b_ptr, g_ptr, lse_ptr, delta_ptr, dw_ptr, de_ptr, db_ptr,
    B, V, D, DE, stride_h, stride_w, stride_e, stride_g,
    inv_temperature, softcap, filter_eps,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DE: tl.constexpr,
    SINGLE_D: tl.constexpr, ACC_IN_REGS: tl.constexpr, TIED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    NEED_W: tl.constexpr, NEED_E: tl.constexpr, NEED_B: tl.constexpr, MERGE: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """One program per vocabulary tile: it alone writes that tile's rows of dW, dE (fp32) and db.

    In registers-mode the tile's gradients accumulate in registers over all row blocks; otherwise
    directly in the fp32 gradient rows (zero-initialized by the launcher), chunk by chunk. With MERGE
    (one tensor passed as both W and E) dE is added onto dW's rows (``de_ptr`` is ``dw_ptr``).
    """
    pid_v = tl.program_id(0)
    vocab_rows = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    vocab_mask = vocab_rows < V
    d_all = tl.arange(0, BLOCK_D)
    de_all = tl.arange(0, BLOCK_DE)
    w = tl.zeros([BLOCK_V, BLOCK_D], dtype=w_ptr.dtype.element_ty)
    if SINGLE_D:
        w = _load_rows(w_ptr, vocab_rows, vocab_mask, stride_w, d_all, d_all < D)
    dw = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32)
    dem = tl.zeros([BLOCK_V, BLOCK_DE], dtype=tl.float32)
    db = tl.zeros([BLOCK_V], dtype=tl.float32)
    v_rows64 = vocab_rows.to(tl.int64)

    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < B
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=row_mask, other=0.0)
        h = tl.zeros([BLOCK_M, BLOCK_D], dtype=h_ptr.dtype.element_ty)
        g = tl.zeros([BLOCK_M, BLOCK_DE], dtype=g_ptr.dtype.element_ty)
        if SINGLE_D:
            h = _load_rows(h_ptr, rows, row_mask, stride_h, d_all, d_all < D)
        if ACC_IN_REGS:
            g = _load_rows(g_ptr, rows, row_mask, stride_g, de_all, de_all < DE)
        p, dz = _tile_probs_and_grad(
            h, w, h_ptr, stride_h, w_ptr, stride_w, e_ptr, stride_e, b_ptr, g, g_ptr, stride_g, lse, delta,
            rows, row_mask, vocab_rows, vocab_mask, D, DE, inv_temperature, softcap,
            BLOCK_M, BLOCK_V, BLOCK_D, BLOCK_DE, SINGLE_D, ACC_IN_REGS, TIED, HAS_BIAS, HAS_SOFTCAP, UPCAST, IEEE)
        keep = True
        if FILTER:
            keep = tl.max(tl.max(p, axis=1), axis=0) >= filter_eps
        if keep:
            if NEED_B:
                db += tl.sum(dz, axis=0)
            if NEED_W:
                dz_t = tl.trans(dz.to(h_ptr.dtype.element_ty))
                if SINGLE_D:
                    dw = _dot(dz_t, h, dw, UPCAST, IEEE)
                else:
                    _add_product_chunked(dw_ptr, vocab_rows, vocab_mask, dz_t, h_ptr, rows, row_mask, stride_h,
                                         D, BLOCK_D, UPCAST, IEEE)
            if NEED_E:
                p_t = tl.trans(p.to(g_ptr.dtype.element_ty))
                if ACC_IN_REGS:
                    dem = _dot(p_t, g, dem, UPCAST, IEEE)
                else:
                    _add_product_chunked(de_ptr, vocab_rows, vocab_mask, p_t, g_ptr, rows, row_mask, stride_g,
                                         DE, BLOCK_DE, UPCAST, IEEE)

    if NEED_W and SINGLE_D:
        tl.store(dw_ptr + v_rows64[:, None] * D + d_all[None, :], dw, mask=vocab_mask[:, None] & (d_all < D)[None, :])
    if NEED_E and ACC_IN_REGS:
        offs = v_rows64[:, None] * DE + de_all[None, :]
        mask = vocab_mask[:, None] & (de_all < DE)[None, :]
        if MERGE:  # dW's rows were just written by this program: add dE onto them
            dem += tl.load(de_ptr + offs, mask=mask, other=0.0)
        tl.store(de_ptr + offs, dem, mask=mask)
    if NEED_B:
        tl.store(db_ptr + vocab_rows, db, mask=vocab_mask)


# ----------------------------------------------------------------------------------------------
# Launchers (the backend contract of ``gircse_kernels.autograd``)
# ----------------------------------------------------------------------------------------------
def _flags(cfg: KernelConfig, hidden, tied, lm_head_bias, softcap) -> dict:
    return dict(
        BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, BLOCK_DE=cfg.block_de,
        SINGLE_D=cfg.single_d, ACC_IN_REGS=cfg.acc_in_registers,
        # Tile reuse needs the value tile to be the W tile exactly: same matrix, same width.
        TIED=bool(tied) and cfg.d == cfg.d_embed,
        HAS_BIAS=lm_head_bias is not None, HAS_SOFTCAP=softcap is not None,
        UPCAST=interpreting(), IEEE=hidden.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _check_layout(hidden, lm_head_weight, embed_weight):
    for name, t in (("hidden", hidden), ("lm_head_weight", lm_head_weight), ("embed_weight", embed_weight)):
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"triton backend: {name} must be 2-D with unit last stride, got strides {t.stride()}")


def config_for(hidden, lm_head_weight, embed_weight, num_splits=None) -> KernelConfig:
    return choose_config(hidden.shape[0], lm_head_weight.shape[0], lm_head_weight.shape[1],
                         embed_weight.shape[1], hidden.dtype, num_sms(hidden.device), num_splits)


def forward(hidden, lm_head_weight, embed_weight, lm_head_bias, *, temperature, softcap, tied=False,
            num_splits=None):
    _check_layout(hidden, lm_head_weight, embed_weight)
    rows, vocab = hidden.shape[0], lm_head_weight.shape[0]
    d, de = lm_head_weight.shape[1], embed_weight.shape[1]
    cfg = config_for(hidden, lm_head_weight, embed_weight, num_splits)
    splits = cfg.num_splits
    ws = WORKSPACE.get(hidden.device, "forward", splits * rows * (de + 2))
    part_acc = ws[: splits * rows * de]
    part_max = ws[splits * rows * de: splits * rows * (de + 1)]
    part_sum = ws[splits * rows * (de + 1):]
    bias = lm_head_bias if lm_head_bias is not None else hidden  # dummy pointer, never read
    _forward_partials_kernel[(triton.cdiv(rows, cfg.block_m), splits)](
        hidden, lm_head_weight, embed_weight, bias, part_acc, part_max, part_sum,
        rows, vocab, d, de, hidden.stride(0), lm_head_weight.stride(0), embed_weight.stride(0),
        cfg.tiles_per_split, 1.0 / temperature, 1.0 if softcap is None else softcap,
        **_flags(cfg, hidden, tied, lm_head_bias, softcap),
    )
    out32 = torch.empty(rows, de, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    # One specialization for every shape (the one the AOT gate compiles); masking covers the rest.
    _combine_kernel[(rows, triton.cdiv(de, COMBINE_BLOCK_DE))](
        part_acc, part_max, part_sum, out32, lse, rows, de, splits,
        BLOCK_S=MAX_SPLITS, BLOCK_DE=COMBINE_BLOCK_DE,
    )
    return out32, lse


def backward(grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, *, temperature,
             softcap, tied=False, need_hidden=True, need_weight=False, need_embed=False, need_bias=False,
             merge_tied_grads=False, grad_filter_eps=0.0, num_splits=None):
    _check_layout(hidden, lm_head_weight, embed_weight)
    grad_out = grad_out.to(embed_weight.dtype).contiguous()
    rows, vocab = hidden.shape[0], lm_head_weight.shape[0]
    d, de = lm_head_weight.shape[1], embed_weight.shape[1]
    cfg = config_for(hidden, lm_head_weight, embed_weight, num_splits)
    flags = _flags(cfg, hidden, tied, lm_head_bias, softcap)
    bias = lm_head_bias if lm_head_bias is not None else hidden
    common = (rows, vocab, d, de, hidden.stride(0), lm_head_weight.stride(0), embed_weight.stride(0),
              grad_out.stride(0))
    scalars = (1.0 / temperature, 1.0 if softcap is None else softcap, float(grad_filter_eps))
    lse, delta = lse.contiguous(), delta.float().contiguous()

    d_hidden = None
    if need_hidden:
        part_dh = WORKSPACE.get(hidden.device, "backward", cfg.num_splits * rows * d)
        _backward_hidden_kernel[(triton.cdiv(rows, cfg.block_m), cfg.num_splits)](
            hidden, lm_head_weight, embed_weight, bias, grad_out, lse, delta, part_dh,
            *common, cfg.tiles_per_split, *scalars, FILTER=grad_filter_eps > 0, **flags,
        )
        d_hidden = part_dh.view(cfg.num_splits, rows, d).sum(dim=0).to(hidden.dtype)

    d_weight = d_embed = d_bias = None
    need_embed_buffer = need_embed and not merge_tied_grads
    if need_weight or need_embed or need_bias:
        dev = hidden.device
        dw32 = torch.zeros(vocab, d, dtype=torch.float32, device=dev) if (need_weight or merge_tied_grads) else None
        de32 = torch.zeros(vocab, de, dtype=torch.float32, device=dev) if need_embed_buffer else None
        db32 = torch.empty(vocab, dtype=torch.float32, device=dev) if need_bias else None
        dummy = lse
        _backward_weights_kernel[(triton.cdiv(vocab, cfg.weights_block_v),)](
            hidden, lm_head_weight, embed_weight, bias, grad_out, lse, delta,
            dw32 if dw32 is not None else dummy, de32 if de32 is not None else (dw32 if merge_tied_grads else dummy),
            db32 if db32 is not None else dummy,
            *common, *scalars, FILTER=grad_filter_eps > 0,
            NEED_W=need_weight, NEED_E=need_embed, NEED_B=need_bias, MERGE=merge_tied_grads,
            **{**flags, "BLOCK_V": cfg.weights_block_v},
        )
        d_weight = None if dw32 is None else dw32.to(lm_head_weight.dtype)
        d_embed = None if de32 is None else de32.to(embed_weight.dtype)
        d_bias = None if db32 is None else db32.to(lm_head_bias.dtype)
    return d_hidden, d_weight, d_embed, d_bias

"""Backward phase for d hidden alone (LoRA training: W and E frozen, so this is the whole backward).

``_backward_hidden_kernel``, grid (row blocks, vocabulary splits). Per [BLOCK_M, BLOCK_V] tile a program
reads W[tile] for the logits and E[tile] for dp = dO E^T, once each from HBM (tied with d in registers:
one tile), and W[tile] again for dh += dz W[tile]: from registers when d fits, else the chunks just
read, from L1 / L2. It recomputes p = exp(z - lse) from the forward's logsumexp (nothing of size B x V
was kept); hidden and dO rows stay in registers when they fit, else their chunks are re-read per tile
from L1 / L2. With d chunked, its real rows' fp32 dh slice is zero-filled once and read and written once
per tile (L2-resident); with d in registers the [rows, d] partial is stored once at the end. A tile
whose probabilities are all below ``grad_filter_eps`` skips the dz W product.

``_sum_splits_kernel``, grid (rows, d blocks). Reads each fp32 dh partial once and writes the dh row once,
summed in split order (a fixed order whatever B is: batch-invariant) and cast to hidden's dtype. The
vocabulary-tile kernel (``backward_tiles``) uses it too when dh is folded into it.

Why this is near the limit: what the pass must move is W and E once; the second use of W (dz W) is the
tile a program has just read. With d in registers it is not read again; on the narrow models (d = 576,
896) at decode sizes the re-read chunks hit L2, and the roofline model (``bench/results/gpu_roofline.md``,
not a GPU measurement) puts the pass at 1.00-1.08x one pass for B <= 8. At the 7B widths (d = 3584, 4096)
neither the W tile nor the [B, d] fp32 dh accumulator fits on chip and the working sets outgrow L2, so
dz W re-reads W from HBM: 1.5-1.8x one pass for B <= 8, the known gap of this design.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import SUM_BLOCK_N, OpConfig
from .launch import Launch, tile_flags, weights_args
from .tiles import _dot, _fill_rows, _probs_and_grad, _rmw_product, _row_block, _vocab_tile


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


def sum_splits_launch(part_dh, d_hidden) -> Launch:
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
             delta_ptr=delta, part_dh_ptr=part_dh, **weights_args(hidden, lm_head_weight, embed_weight),
             stride_g=grad_out.stride(0), tiles_per_split=kc.tiles_per_split, inv_temperature=1.0 / temperature,
             softcap=1.0 if softcap is None else softcap, filter_eps=float(grad_filter_eps)),
        {**tile_flags(kc, hidden.dtype, tied, lm_head_bias is not None, softcap is not None, upcast),
         "FILTER": grad_filter_eps > 0},
        kc.num_warps, kc.num_stages)
    return [launch, sum_splits_launch(part_dh, d_hidden)]

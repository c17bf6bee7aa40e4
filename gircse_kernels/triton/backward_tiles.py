"""Backward phase for the weights: every gradient of a vocabulary tile from one recomputation of p and dz.

``_backward_tiles_kernel``, grid (splits,). A program owns whole vocabulary tiles and, per tile, walks
every row block, so it alone writes that tile's rows of dW, dE (MERGE: their sum, one tensor passed as
both weights) and db: no atomics, bit-for-bit deterministic. Per tile it reads W[tile] and E[tile] once
from HBM (kept in registers when d, d_e fit, else re-read chunk-wise per row block from L1 / L2) and,
per row block, the hidden and dO rows (from L2), lse and delta, recomputing p and dz. dW / dE tiles
accumulate in registers and are stored once in the weights' dtype; chunked, they accumulate in the
output rows: written once in the weights' dtype when one row block holds every row, else fp32 rows
read and written per row block (the launcher casts them). db is summed in registers and stored once.
With NEED_H it also adds dz W[tile] into its split's [B, d] fp32 dh partial (read and written per tile,
L2-resident), summed by ``backward_dh``'s split-sum kernel: the full backward then costs 5
GEMM-equivalents from one recomputation instead of 7 (the dh kernel would recompute p and dz).

Why this is near the limit: a full backward must read W and E once and write dW and dE once; this
kernel adds per tile only the B x (d + d_e) input rows from L2 and the fp32 dh partials, and at decode
sizes nothing else reaches HBM. The roofline model (``bench/results/gpu_roofline.md``, not a GPU
measurement) puts it at 1.00-1.04x of that pass for B <= 8 on the narrow models; at the 7B widths the dz
W product re-reads W from HBM as in the dh kernel (~1.25-1.4x), and larger batches at the real widths
take the GEMM path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backward_dh import sum_splits_launch
from .config import OpConfig
from .launch import Launch, tile_flags, weights_args
from .tiles import _dot, _fill_rows, _probs_and_grad, _rmw_product, _row_block, _vocab_tile


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
             **weights_args(hidden, lm_head_weight, embed_weight), stride_g=grad_out.stride(0),
             tiles_per_split=kc.tiles_per_split, inv_temperature=1.0 / temperature,
             softcap=1.0 if softcap is None else softcap, filter_eps=float(grad_filter_eps)),
        {**tile_flags(kc, hidden.dtype, tied, lm_head_bias is not None, softcap is not None, upcast),
         "FILTER": grad_filter_eps > 0, "NEED_H": bool(need_hidden), "NEED_W": bool(need_weight or merge),
         "NEED_E": bool(need_embed or merge), "NEED_B": bool(need_bias), "MERGE": merge},
        kc.num_warps, kc.num_stages)
    return [launch] + ([sum_splits_launch(bufs["part_dh"], bufs["dh"])] if need_hidden else []), bufs

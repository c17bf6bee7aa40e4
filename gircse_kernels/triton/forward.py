"""Forward phase: online softmax over vocabulary splits, then the exact merge of the splits.

``_forward_partials_kernel``, grid (row blocks, vocabulary splits). A program owns BLOCK_M rows and walks
its split's tiles. Per [BLOCK_M, BLOCK_V] tile it reads W[tile] (BLOCK_V x d) and E[tile] (BLOCK_V x d_e)
once -- tied with d in registers, the W tile is the value tile -- and the tile's bias; the hidden rows
stay in registers for the whole walk when d fits, else their d chunks are read again per tile (from
L1 / L2). With d_e chunked it also reads and writes its real rows' fp32 accumulator slice per tile
(2 * 4 * rows * d_e bytes, L2-resident). At the end it writes its rows' (m, l, acc) once.

``_combine_kernel``, grid (rows, d_e blocks). Reads each fp32 partial of its row once in [BLOCK_S,
BLOCK_DE] blocks (splits with nothing unmasked are not loaded), the splits' maxima twice and sums once,
and writes the fp32 output row and the logsumexp (all the backward keeps) once.

Why this is near the limit: the op cannot avoid one read of W and E, V * (d + d_e) elements (V * d when
tied). Row blocks of one split run side by side (adjacent program ids), so HBM sees each W / E tile once
per call and the other row blocks take it from L2; what else a program moves per tile is O(rows x d)
and L2-resident at decode sizes. The splits exist to give every SM a program when the rows make only
a few row blocks (cached decoding), so that single pass runs at full bandwidth; their partials,
splits x B x (d_e + 2) fp32, are small next to W and E at those sizes. The roofline model (``roofline``,
``bench/results/gpu_roofline.md``; not a GPU measurement) puts the forward at 1.00-1.08x one pass for
B <= 8 on the four real LM heads. At B = 32 on the narrow tied models the partials and the tied value
re-reads cost more (1.3-3.2x); larger batches at chunked widths take the GEMM path (``gemm_path``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import COMBINE_BLOCK_DE, COMBINE_BLOCK_S, OpConfig
from .launch import Launch, tile_flags, weights_args
from .tiles import _dot, _finish_logits, _load_tile, _raw_logits, _rmw_product


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
             **weights_args(hidden, lm_head_weight, embed_weight), tiles_per_split=kc.tiles_per_split,
             inv_temperature=1.0 / temperature, softcap=1.0 if softcap is None else softcap),
        tile_flags(kc, hidden.dtype, tied, lm_head_bias is not None, softcap is not None, upcast),
        kc.num_warps, kc.num_stages)
    combine = Launch(
        "combine", _combine_kernel, (rows, triton.cdiv(de, COMBINE_BLOCK_DE)),
        dict(part_acc_ptr=part_acc, part_max_ptr=part_ml[0], part_sum_ptr=part_ml[1], out_ptr=out32, lse_ptr=lse,
             B=rows, DE=de, S=splits),
        dict(BLOCK_S=COMBINE_BLOCK_S, BLOCK_DE=COMBINE_BLOCK_DE), 4, 2)
    return [partials, combine]

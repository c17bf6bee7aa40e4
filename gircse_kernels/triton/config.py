"""Launch configuration of the Triton kernels: a pure function of the problem's shape.

Pure Python (no Triton import), so the choice itself is unit-tested, the AOT gate can enumerate every
configuration it can return, and ``roofline`` derives each launched kernel's bytes and
FLOPs from the very objects the launchers use.

Why split the vocabulary: a program owns ``block_m`` rows and walks a range of vocabulary tiles. With
B rows there are only ``ceil(B / block_m)`` row blocks; for cached decoding (B = 1..64) that is one
to four programs on a GPU with 132 SMs. The op then costs one read of W and E (memory bound), so the
vocabulary is cut into ``num_splits`` ranges processed by separate programs ("flash-decoding"), each
writing a partial (max, sum, accumulator) that a combine kernel merges. For large B the row blocks
alone fill the machine and the split count falls to 1 (the "general" configuration). Above 16 rows
at chunked widths (64 rows up to d = 1024) the op takes the vocabulary-chunked GEMM path instead
("gemm", see ``gemm_path``): there the fused kernels' per-tile fp32 slices outgrow L2.
Every number here traces to ``bench/results/gpu_roofline.md`` (the model) and
``bench/results/triton_aot.md`` (registers / spills / shared memory), not to a GPU measurement.

Batch invariance (``batch_invariant=True``): a row's result depends only on the tile shapes, the
split boundaries and the order of the reductions, so in this mode all of them are a function of
(V, d, d_e, dtype) alone: a fixed ``block_m`` and a fixed split count, never B or the SM count.
Rows are then launched in groups of ``row_group`` rows so the partials stay bounded; each row's
arithmetic is the same in every group. (Outside this mode the split count follows B and the SM
count, and a row's output can differ by rounding between batch sizes.)
"""
from __future__ import annotations

import dataclasses
import functools

import torch

# Programs to aim for per SM: enough to hide latency without multiplying partials needlessly. Kernels
# that walk d or d_e in chunks keep per-program data in L2 until it is read again (fp32 slices, tied
# value rows, the dh pass over W): one program per SM halves that working set (deeper pipelines keep
# the bytes in flight instead).
PROGRAMS_PER_SM = 2
PROGRAMS_PER_SM_CHUNKED = 1
# Each split walks at least this many vocabulary tiles, so the combine stays negligible.
MIN_TILES_PER_SPLIT = 2
# Cap on the automatically chosen vocabulary splits (each holds fp32 partials of its rows).
MAX_SPLITS = 512
# Batch-invariant mode: a fixed split count (independent of B and of the GPU), enough to give a
# B = 1 decode step a program per SM on current GPUs.
INVARIANT_SPLITS = 160
# Feature dimensions up to this size are held in registers (one block); larger ones are walked in
# chunks of CHUNK with fp32 partials kept in a program-private workspace slice (see the package docstring).
MAX_REGISTER_DIM = 128
CHUNK = 64
# Bound on the fp32 partials of one launch ([splits, rows, d_e] forward, [splits, rows, d] backward):
# batch-invariant launches are cut into row groups below it, and the fused backward falls back to
# separate dh / weight kernels above it.
WORKSPACE_BUDGET_BYTES = 256 << 20
# The combine kernel: splits merged per step and output columns per program.
COMBINE_BLOCK_S = 32
COMBINE_BLOCK_DE = 128
# The split-sum of the dh partials: columns per program.
SUM_BLOCK_N = 256
# The vocabulary-chunked GEMM path ("gemm": cuBLAS GEMMs over vocabulary chunks, Triton for the
# softmax arithmetic in between) serves batches above this size when d or d_e is walked in chunks:
# there the fused kernels' per-tile fp32 slices (2 * rows * d_e * 4 bytes per tile) outgrow L2 and
# the MMA work outgrows 16-row tiles (see gircse_kernels/triton/roofline.py and bench/results/gpu_roofline.md).
# Up to d = 1024 the fused kernels' tiles stay in L2 and they win on launch count below 64 rows.
GEMM_MIN_ROWS = 17
GEMM_MIN_ROWS_NARROW = 64
NARROW_WIDTH = 1024
# Its [rows, chunk] buffers (logits and dp in fp32, p and dz in the inputs' dtype) stay under this (a
# chunk is never narrower than GEMM_CHUNK_ALIGN columns, so above ~170K rows per call they grow as
# rows x 128 x 12 bytes, about 1.3x the bf16 hidden states themselves at d = 576), and a chunk never spans
# more than half the vocabulary: nothing of size B x V is allocated.
GEMM_BUFFER_BYTES = 256 << 20
GEMM_CHUNK_ALIGN = 128
# Elementwise kernels of the GEMM path: columns per step (row softmax), columns x rows per program (grad).
GEMM_SOFTMAX_BLOCK = 1024
GEMM_GRAD_BLOCK_C = 64
GEMM_GRAD_ROWS = 64


# Tile shapes per kernel, chosen from the AOT table (registers / spills / shared memory for sm_80 and
# sm_90, ``bench/results/triton_aot.md``): (kernel, operand bytes, batch class, feature mode) ->
# (block_m, block_v, num_warps, num_stages). Batch class "small" = B <= 16 or batch-invariant mode (the
# smallest MMA, 16 rows), "large" otherwise. Feature mode: "reg" = d and d_e in registers, "chunked" = both
# walked in CHUNK-wide chunks, "mixed" = one of each. The backward kernels hold several [block_m, block_v]
# fp32 tiles (logits, p, dp, dz) plus register W / E tiles, the tile kernel also fp32 dW / dE tiles;
# fp32 operands take twice the staging and tf32x3 dots about three times the operand registers.
BLOCKS = {
    # forward: online softmax, accumulator in registers (reg) or in the L2 slice (chunked d_e)
    ("forward", 2, "small", "reg"): (16, 128, 4, 2),
    ("forward", 2, "small", "mixed"): (16, 64, 4, 4),
    ("forward", 2, "small", "chunked"): (16, 64, 4, 4),
    ("forward", 2, "large", "reg"): (64, 128, 8, 2),
    ("forward", 2, "large", "mixed"): (64, 128, 8, 3),
    ("forward", 2, "large", "chunked"): (64, 128, 8, 3),
    ("forward", 4, "small", "reg"): (16, 64, 8, 2),
    ("forward", 4, "small", "mixed"): (16, 64, 8, 2),
    ("forward", 4, "small", "chunked"): (16, 64, 8, 2),
    ("forward", 4, "large", "reg"): (16, 64, 8, 2),
    ("forward", 4, "large", "mixed"): (16, 64, 8, 2),
    ("forward", 4, "large", "chunked"): (16, 64, 8, 2),
    # dh kernel: logits, dp, dz per tile; dh in registers (d fits) or in the L2 slice
    ("backward_hidden", 2, "small", "reg"): (16, 128, 4, 2),
    ("backward_hidden", 2, "small", "mixed"): (16, 64, 8, 3),
    ("backward_hidden", 2, "small", "chunked"): (16, 64, 8, 3),
    ("backward_hidden", 2, "large", "reg"): (64, 32, 8, 2),
    ("backward_hidden", 2, "large", "mixed"): (64, 64, 8, 3),
    ("backward_hidden", 2, "large", "chunked"): (64, 64, 8, 3),
    ("backward_hidden", 4, "small", "reg"): (16, 32, 8, 2),
    ("backward_hidden", 4, "small", "mixed"): (16, 32, 8, 2),
    ("backward_hidden", 4, "small", "chunked"): (16, 32, 8, 2),
    ("backward_hidden", 4, "large", "reg"): (16, 32, 8, 2),
    ("backward_hidden", 4, "large", "mixed"): (16, 32, 8, 2),
    ("backward_hidden", 4, "large", "chunked"): (16, 32, 8, 2),
    # vocabulary-tile kernel: + fp32 dW / dE tile accumulators (registers) or their fp32 rows (chunked)
    ("backward_tiles", 2, "small", "reg"): (16, 64, 8, 2),
    ("backward_tiles", 2, "small", "mixed"): (16, 32, 4, 2),
    ("backward_tiles", 2, "small", "chunked"): (16, 64, 4, 2),
    ("backward_tiles", 2, "large", "reg"): (32, 64, 8, 2),
    ("backward_tiles", 2, "large", "mixed"): (32, 32, 4, 2),
    ("backward_tiles", 2, "large", "chunked"): (64, 64, 8, 2),
    ("backward_tiles", 4, "small", "reg"): (16, 32, 8, 2),
    ("backward_tiles", 4, "small", "mixed"): (16, 16, 8, 2),
    ("backward_tiles", 4, "small", "chunked"): (16, 32, 8, 2),
    ("backward_tiles", 4, "large", "reg"): (16, 32, 8, 2),
    ("backward_tiles", 4, "large", "mixed"): (16, 16, 8, 2),
    ("backward_tiles", 4, "large", "chunked"): (16, 32, 8, 2),
}


def feature_mode(d: int, d_embed: int) -> str:
    regs = (feature_block(d) >= d) + (feature_block(d_embed) >= d_embed)
    return {2: "reg", 1: "mixed", 0: "chunked"}[regs]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def feature_block(n: int) -> int:
    """Block for a feature dimension: the whole (padded) dimension if small, else CHUNK."""
    padded = max(16, _pow2(n))  # tl.dot needs every dimension >= 16
    return padded if padded <= MAX_REGISTER_DIM else CHUNK


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """The launch shape of one kernel: what each program owns and how it walks it."""
    d: int               # LM-head (query) dimension
    d_embed: int         # embedding (value) dimension
    block_m: int         # rows per program (per row-block pass for the vocabulary-tile kernels)
    block_v: int         # vocabulary rows per tile
    block_d: int         # chunk of d (the padded d itself when it fits in registers)
    block_de: int        # chunk of d_embed (idem)
    num_splits: int      # vocabulary ranges processed by separate programs
    tiles_per_split: int
    num_warps: int
    num_stages: int

    @property
    def single_d(self) -> bool:
        """d fits one block: hidden rows and W tiles are loaded whole, once per tile."""
        return self.block_d >= self.d

    @property
    def acc_in_registers(self) -> bool:
        """d_embed fits one block: the output (or gradient) accumulator lives in registers."""
        return self.block_de >= self.d_embed

    def row_blocks(self, rows: int) -> int:
        return _cdiv(rows, self.block_m)


@dataclasses.dataclass(frozen=True)
class OpConfig:
    """Every launch of the op for one (B, V, d, d_e, dtype): the forward pair, the backward choices."""
    kind: str                      # "decode" (split-V) or "general" (row blocks only)
    rows: int
    vocab: int
    d: int
    d_embed: int
    dtype: torch.dtype
    batch_invariant: bool
    row_group: int                 # rows per launch (all rows unless batch-invariant and large)
    forward: KernelConfig          # _forward_partials_kernel, grid (row blocks, splits); then the combine
    backward_hidden: KernelConfig  # _backward_hidden_kernel (dh only), grid (row blocks, splits)
    backward_tiles: KernelConfig   # _backward_tiles_kernel, grid (splits,): every gradient of its tiles
    fold_backward: bool            # weight gradients and dh from one recomputation (backward_tiles with dh)
    gemm_chunk: int = 0            # kind "gemm": vocabulary rows per backward chunk (0: the fused kernels run)
    gemm_chunk_forward: int = 0    # kind "gemm": vocabulary rows per forward chunk (fewer buffers: larger)


def _splits(tiles: int, row_blocks: int, num_sms: int, forced: int | None, per_sm: int) -> tuple[int, int]:
    """(num_splits, tiles_per_split) with no empty split: ``forced`` (clamped to the tile count), else
    enough splits to give every SM ``per_sm`` programs, each walking about MIN_TILES_PER_SPLIT tiles or more."""
    if forced is None:  # the nearest whole number of tiles per split to the wanted count
        wanted = min(_cdiv(per_sm * num_sms, row_blocks), max(1, tiles // MIN_TILES_PER_SPLIT), MAX_SPLITS)
        per = max(1, round(tiles / wanted))
    else:  # at most the forced count
        per = _cdiv(tiles, max(1, min(forced, tiles)))
    return _cdiv(tiles, per), per


def _kernel(d, de, block_m, block_v, tiles, row_blocks, num_sms, forced, num_warps, num_stages, per_sm):
    splits, per = _splits(tiles, row_blocks, num_sms, forced, per_sm)
    return KernelConfig(d=d, d_embed=de, block_m=block_m, block_v=block_v, block_d=feature_block(d),
                        block_de=feature_block(de), num_splits=splits, tiles_per_split=per,
                        num_warps=num_warps, num_stages=num_stages)


def dtype_name(dtype: torch.dtype) -> str:
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if dtype not in names:
        raise ValueError(f"the Triton kernels take float32, bfloat16 or float16, got {dtype}")
    return names[dtype]


@functools.lru_cache(maxsize=4096)
def choose_config(rows: int, vocab: int, d: int, d_embed: int, dtype: torch.dtype, num_sms: int, *,
                  batch_invariant: bool = False, num_splits: int | None = None) -> OpConfig:
    """Pick every launch for ``rows`` x ``vocab`` with feature sizes d, d_embed.

    ``num_splits`` overrides the split count of every kernel (tests use it to exercise non-dividing
    splits); it is clamped so that every split owns at least one tile. With ``batch_invariant`` the
    kernel configurations depend on (V, d, d_e, dtype) only; ``rows`` then only sets ``row_group``.
    """
    if rows < 1 or vocab < 1 or d < 1 or d_embed < 1 or num_sms < 1:
        raise ValueError(f"choose_config needs positive sizes, got rows={rows} vocab={vocab} d={d} "
                         f"d_embed={d_embed} num_sms={num_sms}")
    dtype_name(dtype)  # rejects unsupported dtypes by name
    size = 4 if dtype == torch.float32 else 2
    batch = "small" if batch_invariant or rows <= 16 else "large"
    mode = feature_mode(d, d_embed)

    def blocks(kernel):
        return BLOCKS[(kernel, size, batch, mode)]

    fwd_m, fwd_v, fwd_w, fwd_s = blocks("forward")
    bh_m, bh_v, bh_w, bh_s = blocks("backward_hidden")
    bt_m, bt_v, bt_w, bt_s = blocks("backward_tiles")
    tiles, tiles_bh, tiles_t = _cdiv(vocab, fwd_v), _cdiv(vocab, bh_v), _cdiv(vocab, bt_v)

    if batch_invariant:
        # Split boundaries from V alone; rows launched in groups that keep the partials bounded.
        def fixed(n_tiles):
            wanted = INVARIANT_SPLITS if num_splits is None else num_splits
            return min(wanted, max(1, n_tiles // MIN_TILES_PER_SPLIT))

        forced, forced_bh = fixed(tiles), fixed(tiles_bh)
        row_bytes = max(forced * (d_embed + 2), forced_bh * d) * 4
        group_cap = max(16, WORKSPACE_BUDGET_BYTES // row_bytes // 16 * 16)
        row_group, sms = min(rows, group_cap), 1
    else:
        forced = forced_bh = num_splits
        row_group, sms = rows, num_sms
    per_sm = PROGRAMS_PER_SM if mode == "reg" else PROGRAMS_PER_SM_CHUNKED
    forward = _kernel(d, d_embed, fwd_m, fwd_v, tiles, _cdiv(row_group, fwd_m), sms, forced, fwd_w, fwd_s, per_sm)
    backward_hidden = _kernel(d, d_embed, bh_m, bh_v, tiles_bh, _cdiv(row_group, bh_m), sms, forced_bh, bh_w, bh_s,
                              per_sm)

    # Folding dh into the tile kernel needs [splits, rows, d] fp32 partials: only while they stay
    # within the budget with at least a program per SM (or a split per tile); else separate kernels.
    # Batch-invariant mode never folds: dh always comes from the fixed-split dh kernel, whichever
    # gradients are needed and however many row groups there are.
    if batch_invariant:
        fold, tiles_forced = False, tiles_t
    elif num_splits is not None:
        fold, tiles_forced = True, num_splits
    else:
        cap = WORKSPACE_BUDGET_BYTES // (rows * d * 4)
        fold = cap >= min(num_sms, tiles_t)
        tiles_forced = None if cap >= per_sm * num_sms else max(1, cap)  # automatic unless the budget binds
        if not fold:  # the tile kernel then needs no partials: one tile per program
            tiles_forced = tiles_t
    backward_tiles = _kernel(d, d_embed, bt_m, bt_v, tiles_t, 1, sms, tiles_forced, bt_w, bt_s, per_sm)
    kind = "decode" if forward.num_splits > 1 else "general"
    chunk = chunk_forward = 0
    min_rows = GEMM_MIN_ROWS_NARROW if max(d, d_embed) <= NARROW_WIDTH else GEMM_MIN_ROWS
    if not batch_invariant and num_splits is None and rows >= min_rows and mode != "reg":
        kind, chunk = "gemm", gemm_chunk(rows, vocab, 8 + 2 * size)
        chunk_forward = gemm_chunk(rows, vocab, 4 + size)
    return OpConfig(kind=kind, rows=rows, vocab=vocab, d=d, d_embed=d_embed, dtype=dtype,
                    batch_invariant=batch_invariant, row_group=row_group, forward=forward,
                    backward_hidden=backward_hidden, backward_tiles=backward_tiles, fold_backward=fold,
                    gemm_chunk=chunk, gemm_chunk_forward=chunk_forward)


def gemm_chunk(rows: int, vocab: int, bytes_per_element: int) -> int:
    """Vocabulary rows per chunk of the GEMM path: its [rows, chunk] buffers (``bytes_per_element``: fp32
    logits + p forward; fp32 logits and dp + p and dz backward) within GEMM_BUFFER_BYTES, at most half
    the vocabulary, a multiple of GEMM_CHUNK_ALIGN."""
    fit = GEMM_BUFFER_BYTES // (rows * bytes_per_element)
    half = _cdiv(_cdiv(vocab, 2), GEMM_CHUNK_ALIGN) * GEMM_CHUNK_ALIGN
    return max(GEMM_CHUNK_ALIGN, min(half, fit // GEMM_CHUNK_ALIGN * GEMM_CHUNK_ALIGN))


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter: a few splits, so split-V is exercised on CPU too


_SM_COUNTS: dict[int, int] = {}


def _cuda_sm_count(index: int) -> int:
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]

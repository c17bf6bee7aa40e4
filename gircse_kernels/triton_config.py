"""Launch configuration of the Triton kernels: the decode / general dispatcher and the workspace cache.

Pure Python (no Triton import), so the choice itself is unit-tested and the AOT gate can enumerate
every configuration the dispatcher can return.

Why split the vocabulary: a program owns ``BLOCK_M`` rows and walks a range of vocabulary tiles.
With B rows there are only ``ceil(B / BLOCK_M)`` row blocks; for cached decoding (B = 1..64) that is
one to four programs on a GPU with 132 SMs. The op then costs one read of W and E (memory bound), so
the vocabulary is cut into ``num_splits`` ranges processed by separate programs ("flash-decoding"),
each writing a partial (max, sum, accumulator) that a small combine kernel merges. For large B the
row blocks alone fill the machine and the split count falls to 1 (the "general" configuration).
"""
from __future__ import annotations

import dataclasses

import torch

# Programs to aim for per SM: enough to hide latency without multiplying partials needlessly.
PROGRAMS_PER_SM = 2
# Each split walks at least this many vocabulary tiles, so the combine stays negligible.
MIN_TILES_PER_SPLIT = 2
# The combine kernel reduces all splits of a row in one block: keep it a modest power of two.
MAX_SPLITS = 256
# Feature dimensions up to this size are held in registers (one block); larger ones are walked in
# chunks of CHUNK with fp32 partials kept in a program-private workspace (see triton_fused).
MAX_REGISTER_DIM = 128
CHUNK = 64


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    kind: str            # "decode" (split-V) or "general" (row blocks only)
    d: int               # LM-head (query) dimension
    d_embed: int         # embedding (value) dimension
    block_m: int         # rows per program
    block_v: int         # vocabulary rows per tile
    weights_block_v: int  # vocabulary rows per program of the weight-gradient kernel (it holds dW, dE tiles)
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


def feature_block(n: int) -> int:
    """Block for a feature dimension: the whole (padded) dimension if small, else CHUNK."""
    padded = max(16, _pow2(n))  # tl.dot needs every dimension >= 16
    return padded if padded <= MAX_REGISTER_DIM else CHUNK


def choose_config(rows: int, vocab: int, d: int, d_embed: int, dtype: torch.dtype, num_sms: int,
                  num_splits: int | None = None) -> KernelConfig:
    """Pick the launch configuration for ``rows`` x ``vocab`` with feature sizes d, d_embed.

    ``num_splits`` overrides the split count (tests use it to exercise non-dividing splits); it is
    clamped so that every split owns at least one tile.
    """
    if rows < 1 or vocab < 1 or d < 1 or d_embed < 1 or num_sms < 1:
        raise ValueError(f"choose_config needs positive sizes, got rows={rows} vocab={vocab} d={d} "
                         f"d_embed={d_embed} num_sms={num_sms}")
    # fp32 operands double the shared-memory staging: 64-row fp32 blocks exceed an A100's 163 KiB.
    block_m = 16 if rows <= 16 else 32 if dtype == torch.float32 else 64
    # fp32 tiles are twice the bytes (and ieee dots twice the registers): halve the vocabulary tile.
    block_v = 64 if dtype == torch.float32 else 128
    # The weight-gradient kernel keeps fp32 [tile, d] accumulators for dW and dE: half the tile.
    weights_block_v = block_v // 2
    block_d, block_de = feature_block(d), feature_block(d_embed)
    row_blocks = -(-rows // block_m)
    tiles = -(-vocab // block_v)
    if num_splits is None:
        wanted = -(-PROGRAMS_PER_SM * num_sms // row_blocks)
        num_splits = min(wanted, max(1, tiles // MIN_TILES_PER_SPLIT), MAX_SPLITS)
    num_splits = max(1, min(num_splits, tiles, MAX_SPLITS))
    tiles_per_split = -(-tiles // num_splits)
    num_splits = -(-tiles // tiles_per_split)  # no empty split
    kind = "decode" if num_splits > 1 else "general"
    return KernelConfig(kind=kind, d=d, d_embed=d_embed, block_m=block_m, block_v=block_v,
                        weights_block_v=weights_block_v, block_d=block_d,
                        block_de=block_de, num_splits=num_splits, tiles_per_split=tiles_per_split,
                        num_warps=4 if block_m <= 32 else 8, num_stages=2)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter: a few splits, so split-V is exercised on CPU too


_SM_COUNTS: dict[int, int] = {}


def _cuda_sm_count(index: int) -> int:
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


class Workspace:
    """Grow-only fp32 scratch per (device, purpose), so steady-state calls allocate nothing new.

    Reused only within one call on the current stream (partials are consumed before the call
    returns), which is what makes a captured CUDA graph of the K-step decode loop safe: capture after
    one warm-up call so the buffer exists.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, device: torch.device, purpose: str, numel: int) -> torch.Tensor:
        key = (device.type, device.index, purpose)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=torch.float32, device=device)
            self._buffers[key] = buf
        return buf[:numel]


WORKSPACE = Workspace()

"""Cached-decoding regime: split-V configuration choice and its numerics at small batch sizes."""
import os

import pytest
import torch

from gircse_kernels import reference
from gircse_kernels.triton.config import MIN_TILES_PER_SPLIT, WORKSPACE_BUDGET_BYTES, choose_config
from tests.gircse_kernels.op_cases import Case, make_inputs

H100_SMS = 132


@pytest.mark.parametrize("rows", [1, 2, 5, 16])
@pytest.mark.parametrize("d", [96, 576])
def test_small_batches_get_split_v_filling_the_gpu(rows, d):
    cfg = choose_config(rows, 49152, d, d, torch.bfloat16, H100_SMS)
    fwd = cfg.forward
    assert cfg.kind == "decode" and fwd.block_m == 16
    # about one program per SM (two for register widths) although there is one row block
    # (or as many as there are pairs of tiles: each split walks MIN_TILES_PER_SPLIT tiles or more)
    per_sm = 2 if d <= 128 else 1
    for kc in (fwd, cfg.backward_tiles):  # the fused backward fills the GPU from its splits alone
        wanted = min(per_sm * H100_SMS, (49152 // kc.block_v) // MIN_TILES_PER_SPLIT)
        assert 0.9 * wanted <= kc.row_blocks(rows) * kc.num_splits <= 1.5 * wanted


@pytest.mark.parametrize("rows", [33, 64])
def test_register_widths_keep_the_fused_kernels_at_any_batch(rows):
    cfg = choose_config(rows, 49152, 96, 96, torch.bfloat16, H100_SMS)
    assert cfg.kind == "decode" and cfg.forward.block_m == 64
    assert cfg.forward.row_blocks(rows) * cfg.forward.num_splits >= 0.9 * min(2 * H100_SMS, 384 // MIN_TILES_PER_SPLIT)


@pytest.mark.parametrize("rows", [17, 512, 4096, 65536])
def test_larger_batches_at_real_widths_take_the_gemm_path(rows):
    """B > 16 with d or d_e walked in chunks (B >= 64 up to d = 1024): vocabulary-chunked GEMMs, buffers
    bounded, never [B, V]."""
    from gircse_kernels.triton.config import GEMM_BUFFER_BYTES

    cfg = choose_config(rows, 49152, 3584, 3584, torch.bfloat16, H100_SMS)
    assert cfg.kind == "gemm"
    assert cfg.gemm_chunk == 24576 or rows > 17  # small batches: two chunks (half the vocabulary each)
    assert cfg.gemm_chunk <= 49152 // 2 and cfg.gemm_chunk % 128 == 0
    assert rows * cfg.gemm_chunk * 12 <= GEMM_BUFFER_BYTES or cfg.gemm_chunk == 128
    # batch-invariant mode and forced split counts stay on the fused kernels
    assert choose_config(rows, 49152, 3584, 3584, torch.bfloat16, H100_SMS, batch_invariant=True).kind == "decode"
    assert choose_config(rows, 49152, 3584, 3584, torch.bfloat16, H100_SMS, num_splits=3).kind != "gemm"
    narrow = choose_config(rows, 49152, 576, 576, torch.bfloat16, H100_SMS)
    assert narrow.kind == ("gemm" if rows >= 64 else "decode")


def test_large_batches_use_the_general_configuration():
    cfg = choose_config(65536, 49152, 96, 96, torch.bfloat16, H100_SMS)
    assert cfg.kind == "general" and cfg.forward.num_splits == 1 and cfg.forward.block_m == 64
    assert not cfg.fold_backward  # dh partials per split would not fit: separate dh and weight kernels
    assert cfg.backward_tiles.tiles_per_split == 1
    assert choose_config(65536, 49152, 96, 96, torch.float32, H100_SMS).forward.block_m == 16


@pytest.mark.parametrize("rows,vocab,sms,forced", [
    (1, 1, 132, None), (1, 7, 132, None), (3, 1000, 132, 7), (1, 49152, 132, None), (1, 151936, 132, None),
    (17, 50257, 8, None), (1, 1000, 132, 10_000), (2, 129, 1, 3),
])
def test_splits_cover_the_vocabulary_without_empty_ranges(rows, vocab, sms, forced):
    cfg = choose_config(rows, vocab, 64, 64, torch.float16, sms, num_splits=forced)
    for kc in (cfg.forward, cfg.backward_hidden, cfg.backward_tiles):
        tiles = -(-vocab // kc.block_v)
        assert 1 <= kc.num_splits <= tiles
        assert kc.num_splits * kc.tiles_per_split >= tiles            # every tile is covered
        assert (kc.num_splits - 1) * kc.tiles_per_split < tiles       # the last split is not empty


def test_feature_blocks_register_or_chunked():
    small = choose_config(4, 1000, 96, 48, torch.float32, 132).forward
    assert small.single_d and small.acc_in_registers and small.block_d == 128 and small.block_de == 64
    big = choose_config(4, 1000, 4096, 3584, torch.bfloat16, 132).forward
    assert not big.single_d and not big.acc_in_registers and big.block_d == 64 == big.block_de


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="rows=0"):
        choose_config(0, 10, 8, 8, torch.float32, 132)
    with pytest.raises(ValueError, match="float64"):
        choose_config(1, 10, 8, 8, torch.float64, 132)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,d,de", [(49152, 576, 576), (152064, 3584, 3584), (1000, 96, 48), (50257, 16, 200)])
def test_batch_invariant_configuration_depends_on_the_problem_only(vocab, d, de, dtype):
    """Tile shapes, split boundaries, warps and stages are the same for every B and every SM count;
    B only sets how many rows one launch takes (row groups of a fixed size)."""
    reference_cfg = choose_config(1, vocab, d, de, dtype, 132, batch_invariant=True)
    caps = set()
    for rows in (1, 2, 15, 16, 17, 64, 333, 4096, 100_000):
        for sms in (1, 8, 108, 132, 144):
            cfg = choose_config(rows, vocab, d, de, dtype, sms, batch_invariant=True)
            assert cfg.forward == reference_cfg.forward and cfg.backward_hidden == reference_cfg.backward_hidden
            assert cfg.backward_tiles == reference_cfg.backward_tiles
            assert cfg.fold_backward is False  # dh always from the fixed-split dh kernel
            assert cfg.row_group % cfg.forward.block_m == 0 or cfg.row_group == rows
            caps.add(cfg.row_group if cfg.row_group < rows else None)
            kc = cfg.forward
            assert kc.num_splits * (cfg.row_group * (max(d, de) + 2) * 4) <= WORKSPACE_BUDGET_BYTES or \
                cfg.row_group == kc.block_m
    assert len(caps - {None}) <= 1  # one fixed group size
    # Outside this mode the split count follows B and the SM count.
    assert choose_config(1, vocab, d, de, dtype, 132).forward.num_splits != \
        choose_config(1, vocab, d, de, dtype, 8).forward.num_splits or vocab < 5000


triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="no GPU, no interpreter")


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 5, 33])
@pytest.mark.parametrize("num_splits", [None, 1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_forward_matches_reference(rows, num_splits, dtype):
    from gircse_kernels.triton import host

    case = Case(lead=(rows,), vocab=2001, d=64, dtype=dtype, tied=True)  # 2001 = odd, splits do not divide
    h, w, e, _ = make_inputs(case, DEVICE)
    out, lse = host.forward(h, w, e, None, temperature=1.0, softcap=None, tied=True,
                            num_splits=num_splits)
    truth = reference.soft_token_embedding(h.double(), w.double(), w.double())
    tol = 2e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(out.double().cpu(), truth.cpu(), rtol=0, atol=tol * truth.abs().max().item())
    torch.testing.assert_close(lse.double().cpu(), torch.logsumexp(h.double() @ w.double().T, -1).cpu(),
                               rtol=0, atol=1e-4)


@needs_kernels
def test_grad_enabled_routes_to_the_backward_capable_path():
    from gircse_kernels import soft_token_embedding

    h, w, e, _ = make_inputs(Case(lead=(1,), vocab=500, d=32), DEVICE, requires_grad=True)
    out = soft_token_embedding(h, w, e, backend="triton")
    assert out.grad_fn is not None
    (gh,) = torch.autograd.grad(out.sum(), (h,))
    ref = torch.autograd.grad(reference.soft_token_embedding(h, w, e).sum(), (h,))[0]
    torch.testing.assert_close(gh, ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert soft_token_embedding(h, w, e, backend="triton").grad_fn is None


"""Cached-decoding regime: split-V configuration choice and its numerics at small batch sizes."""
import os

import pytest
import torch

from gircse_kernels import reference
from gircse_kernels.triton_config import MAX_SPLITS, WORKSPACE, choose_config
from tests.gircse_kernels.op_cases import Case, make_inputs

H100_SMS = 132


@pytest.mark.parametrize("rows", [1, 2, 5, 33, 64])
def test_small_batches_get_split_v_filling_the_gpu(rows):
    cfg = choose_config(rows, 49152, 576, 576, torch.bfloat16, H100_SMS)
    programs = -(-rows // cfg.block_m) * cfg.num_splits
    assert cfg.kind == "decode"
    assert cfg.block_m == (16 if rows <= 16 else 64)
    assert programs >= H100_SMS  # every SM has work although there are 1..4 row blocks


def test_large_batches_use_the_general_configuration():
    cfg = choose_config(65536, 49152, 576, 576, torch.bfloat16, H100_SMS)
    assert cfg.kind == "general" and cfg.num_splits == 1 and cfg.block_m == 64
    # fp32 blocks stay at 32 rows (shared memory on sm_80)
    assert choose_config(65536, 49152, 576, 576, torch.float32, H100_SMS).block_m == 32


@pytest.mark.parametrize("rows,vocab,sms,forced", [
    (1, 1, 132, None), (1, 7, 132, None), (3, 1000, 132, 7), (1, 49152, 132, None), (1, 151936, 132, None),
    (17, 50257, 8, None), (1, 1000, 132, 10_000), (2, 129, 1, 3),
])
def test_splits_cover_the_vocabulary_without_empty_ranges(rows, vocab, sms, forced):
    cfg = choose_config(rows, vocab, 64, 64, torch.float16, sms, num_splits=forced)
    tiles = -(-vocab // cfg.block_v)
    assert 1 <= cfg.num_splits <= min(tiles, MAX_SPLITS)
    assert cfg.num_splits * cfg.tiles_per_split >= tiles            # every tile is covered
    assert (cfg.num_splits - 1) * cfg.tiles_per_split < tiles       # the last split is not empty


def test_feature_blocks_register_or_chunked():
    small = choose_config(4, 1000, 96, 48, torch.float32, 132)
    assert small.single_d and small.acc_in_registers and small.block_d == 128 and small.block_de == 64
    big = choose_config(4, 1000, 4096, 3584, torch.bfloat16, 132)
    assert not big.single_d and not big.acc_in_registers and big.block_d == 64 == big.block_de


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="rows=0"):
        choose_config(0, 10, 8, 8, torch.float32, 132)


def test_workspace_is_reused_across_steps():
    device = torch.device("cpu")
    a = WORKSPACE.get(device, "test", 100)
    b = WORKSPACE.get(device, "test", 60)
    assert b.data_ptr() == a.data_ptr()  # steady state: no new allocation
    c = WORKSPACE.get(device, "test", 200)
    assert c.numel() == 200


triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="no GPU, no interpreter")


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 5, 33])
@pytest.mark.parametrize("num_splits", [None, 1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_forward_matches_reference(rows, num_splits, dtype):
    from gircse_kernels import triton_fused

    case = Case(lead=(rows,), vocab=2001, d=64, dtype=dtype, tied=True)  # 2001 = odd, splits do not divide
    h, w, e, _ = make_inputs(case, DEVICE)
    out, lse = triton_fused.forward(h, w, e, None, temperature=1.0, softcap=None, tied=True,
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


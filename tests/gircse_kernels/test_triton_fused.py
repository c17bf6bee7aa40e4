"""Triton backend vs the reference: on the GPU when present, else under TRITON_INTERPRET=1 on CPU."""
import functools
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from gircse_kernels import reference, soft_token_embedding  # noqa: E402
from tests.gircse_kernels.op_cases import (  # noqa: E402
    GRID, Case, check_backward, check_forward, check_fully_masked, check_grad_filter_bound, make_inputs)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no GPU and TRITON_INTERPRET is off", allow_module_level=True)

op = functools.partial(soft_token_embedding, backend="triton")


@pytest.mark.parametrize("case", GRID, ids=str)
def test_forward_matches_reference(case):
    check_forward(op, case, device=DEVICE)


@pytest.mark.parametrize("case", GRID, ids=str)
def test_backward_matches_reference(case):
    check_backward(op, case, device=DEVICE)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
@pytest.mark.parametrize("case", [
    Case(lead=(5,), vocab=1000, d=96, bias=True, softcap=8.0, logit_scale=20.0),  # registers path
    Case(lead=(3,), vocab=777, d=200, d_embed=150, dtype=torch.bfloat16, bias=True),  # chunked d, d_e
], ids=str)
def test_split_count_does_not_change_the_result(case, num_splits):
    """Every split count (including ones that do not divide the tiles) gives the same op, fwd and bwd."""
    from gircse_kernels import triton_fused

    h, w, e, b = make_inputs(case, DEVICE)
    kw = dict(temperature=case.temperature, softcap=case.softcap, tied=False)
    out, lse = triton_fused.forward(h, w, e, b, num_splits=num_splits, **kw)
    z = (h.double() @ w.double().T + b.double()) / case.temperature
    if case.softcap:
        z = case.softcap * torch.tanh(z / case.softcap)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, -1), rtol=0, atol=1e-4)
    truth = reference.soft_token_embedding(h.double(), w.double(), e.double(), b.double(), softcap=case.softcap)
    tol = 2e-5 if case.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=tol * truth.abs().max().item())

    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    delta = (go * out).sum(-1)
    grads = triton_fused.backward(go.to(case.dtype), h, w, e, b, lse, delta, need_hidden=True, need_weight=True,
                                  need_embed=True, need_bias=True, num_splits=num_splits, **kw)
    base = triton_fused.backward(go.to(case.dtype), h, w, e, b, lse, delta, need_hidden=True, need_weight=True,
                                 need_embed=True, need_bias=True, num_splits=1, **kw)
    for g, g1 in zip(grads, base):
        torch.testing.assert_close(g.float(), g1.float(), rtol=1e-3, atol=1e-5)


def test_weight_gradients_are_deterministic():
    case = Case(lead=(9,), vocab=300, d=96, bias=True)
    grads = []
    for _ in range(2):
        h, w, e, b = make_inputs(case, DEVICE, requires_grad=True)
        out = op(h, w, e, b)
        grads.append(torch.autograd.grad(out, (h, w, e, b), torch.ones_like(out) + out.detach()))
    for a, b_ in zip(*grads):
        assert torch.equal(a, b_)


def test_grad_filter_error_within_documented_bound():
    check_grad_filter_bound(op, device=DEVICE)


def test_non_contiguous_inputs():
    h, w, e, b = make_inputs(Case(lead=(4, 6), vocab=33, d=16, d_embed=20, bias=True), DEVICE)
    h_t = h.transpose(0, 1)
    w_wide = torch.cat([w, w], dim=1)[:, :16]  # row stride 32: the kernels must honour it
    e_s = torch.cat([e, e], dim=1)[:, ::2]
    expected = reference.soft_token_embedding(h_t, w, e_s, b)
    torch.testing.assert_close(op(h_t, w_wide, e_s, b), expected, rtol=1e-5, atol=1e-6)


class _AllocationRecorder(TorchDispatchMode):
    """Records the element count of every tensor any ATen op creates (the backends' only allocator;
    the interpreter's host copies of the arguments show up too, as byte views of their storages)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((t.numel(), str(func)))
        return out


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_nothing_of_size_batch_times_vocab_is_allocated(backend):
    # Legitimate buffers: dW / dE / weights' byte views (<= 4*V*d = V*32 elements), torch chunks [B, V/4].
    rows, vocab, d = 64, 16384, 8
    limit = rows * vocab
    h, w, e, b = make_inputs(Case(lead=(rows,), vocab=vocab, d=d, bias=True), DEVICE, requires_grad=True)
    fn = reference.soft_token_embedding if backend == "reference" else functools.partial(
        soft_token_embedding, backend=backend)
    with _AllocationRecorder() as rec:
        out = fn(h, w, e, b)
        torch.autograd.grad(out, (h, w, e, b), torch.randn_like(out))
    biggest = max(rec.sizes)
    if backend == "reference":
        assert biggest[0] >= limit  # the recorder does see a materialized [B, V]
    else:
        assert biggest[0] < limit, biggest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_fully_masked_rows_behave_like_torch_softmax(dtype, tied):
    check_fully_masked(op, device=DEVICE, dtype=dtype, tied=tied)

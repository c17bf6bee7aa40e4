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


def _truth_and_grads(h, w, e, b, go, case):
    """fp64 reference output and gradients for (hidden, W, E, bias) (W only when E is W)."""
    tied = e is w
    leaves = [t.detach().double().requires_grad_(True) for t in (h, w, e, b) if t is not None]
    if tied:
        leaves[2] = leaves[1]
    hh, ww, ee = leaves[:3]
    bb = leaves[3] if b is not None else None
    out = reference.soft_token_embedding(hh, ww, ee, bb, temperature=case.temperature, softcap=case.softcap)
    unique = [hh, ww] + ([] if tied else [ee]) + ([bb] if bb is not None else [])
    return out.detach(), torch.autograd.grad(out, unique, go.double())


def _backend_grads(h, w, e, b, go, case, **kw):
    """Output and every gradient from the backend's launchers directly (dh, dW, [dE], [db])."""
    from gircse_kernels.triton import host

    tied = e is w
    args = dict(temperature=case.temperature, softcap=case.softcap, tied=tied)
    out, lse = host.forward(h, w, e, b, **args, **kw)
    delta = (go.float() * out).sum(-1)
    grads = host.backward(go.to(case.dtype), h, w, e, b, lse, delta, need_hidden=True, need_weight=True,
                          need_embed=True, need_bias=b is not None, merge_tied_grads=tied, **args, **kw)
    return out, lse, [g for g in grads if g is not None]


def _assert_close_to_truth(actual, truth, dtype, what):
    tol = 2e-5 if dtype == torch.float32 else 2.5e-2
    scale = max(truth.abs().max().item(), 1e-3)
    err = (actual.double().cpu() - truth).abs().max().item()
    assert err <= tol * scale, f"{what}: error {err:.3e} > {tol * scale:.3e}"


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
@pytest.mark.parametrize("case", [
    Case(lead=(5,), vocab=1000, d=96, bias=True, softcap=8.0, logit_scale=20.0),  # registers path
    Case(lead=(3,), vocab=777, d=200, d_embed=150, dtype=torch.bfloat16, bias=True),  # chunked d, d_e
    Case(lead=(4,), vocab=1000, d=48, tied=True, mask="head"),  # tied, merged dW + dE, empty splits
], ids=str)
def test_every_split_count_computes_the_op(case, num_splits):
    """Forward, lse and every gradient against the fp64 truth for split counts that do not divide the
    tiles: the split boundaries drive the partials (forward, dh) and the tile ranges of the fused
    backward (dW, dE, db rows), so a wrong boundary loses or repeats vocabulary rows."""
    from gircse_kernels.triton import host

    h, w, e, b = make_inputs(case, DEVICE)
    cfg = host.config_for(h, w, e, num_splits=num_splits)
    for kc in (cfg.forward, cfg.backward_tiles):  # the requested split count is what runs (no empty split)
        tiles = -(-case.vocab // kc.block_v)
        per = -(-tiles // min(num_splits, tiles))
        assert (kc.num_splits, kc.tiles_per_split) == (-(-tiles // per), per)
    assert cfg.fold_backward
    go = torch.randn(case.lead[0], case.de, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, lse, grads = _backend_grads(h, w, e, b, go, case, num_splits=num_splits)
    truth, truth_grads = _truth_and_grads(h, w, e, b, go, case)
    z = h.double() @ w.double().T + b.double()
    if case.softcap:
        z = case.softcap * torch.tanh(z / case.softcap)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, -1), rtol=0, atol=1e-4)
    _assert_close_to_truth(out, truth, case.dtype, "output")
    assert len(grads) == len(truth_grads)
    for name, g, t in zip(["hidden", "lm_head_weight", "embed_weight/bias", "bias"], grads, truth_grads):
        _assert_close_to_truth(g, t, case.dtype, f"grad {name}")


@pytest.mark.parametrize("layout", ["transposed", "row-strided", "transposed-tied", "column-slice"])
def test_strided_weights_are_read_in_place(layout):
    """W and E with any 2-D strides (a transposed view of a [d, V] matrix, a row stride wider than
    d, a column slice) go to the kernels as they are: both strides are kernel arguments."""
    case = Case(lead=(4,), vocab=333, d=40, d_embed=24, bias=True, tied=layout == "transposed-tied")
    h, w, e, b = make_inputs(case, DEVICE)
    if layout.startswith("transposed"):
        w = w.T.contiguous().T  # strides (1, V)
        e = w if case.tied else e.T.contiguous().T
        assert w.stride() == (1, case.vocab)
    elif layout == "row-strided":
        w = torch.cat([w, w], dim=1)[:, :case.d]
        e = torch.cat([e, e], dim=1)[:, case.de:]
        assert w.stride() == (2 * case.d, 1)
    else:
        w = torch.cat([w, w], dim=0).T.contiguous().T[:case.vocab]  # column-major slice of a taller matrix
        e = torch.cat([e, e, e], dim=1)[:, ::3]  # last-dim stride 3
    go = torch.randn(4, case.de, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out, _, grads = _backend_grads(h, w, e, b, go, case)
    truth, truth_grads = _truth_and_grads(h, w, e, b, go, case)
    _assert_close_to_truth(out, truth, case.dtype, "output")
    for g, t in zip(grads, truth_grads):
        assert g.shape == t.shape
        _assert_close_to_truth(g, t, case.dtype, "gradient")


@pytest.mark.parametrize("case", [
    Case(lead=(21,), vocab=3000, d=48, dtype=torch.bfloat16, bias=True, softcap=10.0, logit_scale=20.0),
    Case(lead=(18,), vocab=1500, d=200, d_embed=72),
], ids=str)
def test_batch_invariant_rows_are_bitwise_independent_of_the_batch(case):
    """With batch_invariant=True a row gives the same bits alone, inside a batch, and at any
    position of it: output, lse and its dh (which sums per-split partials in a fixed order)."""
    from gircse_kernels.triton import host

    h, w, e, b = make_inputs(case, DEVICE)
    go = torch.randn(h.shape[0], case.de, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    kw = dict(temperature=case.temperature, softcap=case.softcap, tied=False, batch_invariant=True)

    def run(rows):
        out, lse = host.forward(h[rows], w, e, b, **kw)
        delta = (go[rows].float() * out).sum(-1)
        (dh, *_rest) = host.backward(go[rows].to(case.dtype), h[rows], w, e, b, lse, delta, **kw)
        return out, lse, dh

    full = run(slice(None))
    for index in (0, 5, h.shape[0] - 1):
        for rows in (slice(index, index + 1), slice(max(0, index - 2), index + 3)):
            alone = run(rows)
            position = index - (rows.start or 0)
            for a, f in zip(alone, full):
                assert torch.equal(a[position], f[index]), (index, rows)


def test_batch_invariant_row_groups_give_the_same_bits(monkeypatch):
    """Large batches are launched in fixed-size row groups (bounded partials): same bits as one launch."""
    from gircse_kernels.triton import config, host

    case = Case(lead=(37,), vocab=900, d=40, dtype=torch.float16, bias=True)
    h, w, e, b = make_inputs(case, DEVICE)
    go = torch.randn(37, case.de, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    kw = dict(temperature=1.0, softcap=None, tied=False, batch_invariant=True)

    def run():
        config.choose_config.cache_clear()
        cfg = host.config_for(h, w, e, batch_invariant=True)
        out, lse = host.forward(h, w, e, b, **kw)
        grads = host.backward(go.to(case.dtype), h, w, e, b, lse, (go.float() * out).sum(-1),
                              need_weight=True, need_bias=True, **kw)
        return cfg.row_group, (out, lse, *grads[:2], grads[3])

    one_group, whole = run()
    monkeypatch.setattr(config, "WORKSPACE_BUDGET_BYTES", 1)  # forces the smallest group: block_m rows
    small_group, grouped = run()
    config.choose_config.cache_clear()
    assert one_group == 37 and small_group == 16
    for a, c in zip(grouped, whole):
        assert torch.equal(a, c)


def test_launches_happen_under_the_tensors_device(monkeypatch):
    """The launchers enter ``torch.cuda.device(<the tensors' device>)``, not the current device."""
    from gircse_kernels.triton import host

    entered = []

    class Guard:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class FakeCudaTensor:
        device = torch.device("cuda", 3)

    monkeypatch.setattr(torch.cuda, "device", Guard)
    with host._device_guard(FakeCudaTensor()):
        pass
    assert entered == [torch.device("cuda", 3)]
    with host._device_guard(torch.zeros(1)):  # CPU tensors (the interpreter): no CUDA call
        pass
    assert entered == [torch.device("cuda", 3)]


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


class _AllocationRecorder(TorchDispatchMode):
    """Records the element count of every tensor any ATen op creates (the backends' only allocator),
    except the interpreter's host copies of kernel arguments (uint8 views of their storages)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:  # uint8: the interpreter's byte views
                self.sizes.append((t.numel(), str(func)))
        return out


@pytest.mark.parametrize("backend,rows,vocab,d", [("triton", 64, 4096, 8), ("triton", 256, 4096, 200),
                                                  ("torch", 64, 16384, 8), ("reference", 64, 4096, 8)])
def test_nothing_of_size_batch_times_vocab_is_allocated(backend, rows, vocab, d):
    # Legitimate buffers: dW / dE (V*d < B*V here), torch chunks [B, V/4], the GEMM path's
    # [B, chunk <= V/2] buffers (d = 200 takes that path).
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


GEMM_CASES = [  # B >= 64 up to d = 1024, B >= 17 above
    Case(lead=(64,), vocab=1000, d=200, d_embed=150, dtype=torch.bfloat16, bias=True, mask="tail"),
    Case(lead=(65,), vocab=777, d=576, dtype=torch.float16, tied=True, softcap=5.0, logit_scale=20.0),
    Case(lead=(17,), vocab=301, d=96, d_embed=1100, temperature=0.5, mask="sparse"),
    Case(lead=(8, 9), vocab=2000, d=576, dtype=torch.bfloat16, tied=True, mask="head"),
]


@pytest.mark.parametrize("case", GEMM_CASES, ids=str)
def test_gemm_path_matches_reference(case):
    """B > 16 at chunked widths takes the vocabulary-chunked GEMM path: same oracle, fwd and every grad."""
    from gircse_kernels.triton import host

    h, w, e, _ = make_inputs(case, DEVICE)
    assert host.config_for(h.reshape(-1, case.d), w, e).kind == "gemm"
    check_forward(op, case, device=DEVICE)
    check_backward(op, case, device=DEVICE)


def test_gemm_path_fully_masked_rows_are_nan():
    from gircse_kernels.triton import host

    case = Case(lead=(64,), vocab=500, d=200, mask="all")
    h, w, e, b = make_inputs(case, DEVICE, requires_grad=True)
    assert host.config_for(h.detach(), w, e).kind == "gemm"
    out = op(h, w, e, b)
    assert torch.isnan(out).all()
    grads = torch.autograd.grad(out, (h, w, e, b), torch.randn_like(out))
    assert all(torch.isnan(g).all() for g in grads)

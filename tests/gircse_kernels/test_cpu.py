"""The C++ CPU backend (backend="cpu") against the reference, on the grid every backend runs."""
import contextlib
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gircse_kernels import cpu, soft_token_embedding, torch_chunked
from tests.gircse_kernels.op_cases import (
    GRID, Case, check_backward, check_forward, check_fully_masked, check_grad_filter_bound, make_inputs)

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"C++ extension unavailable: {cpu.load_error()}")

op = functools.partial(soft_token_embedding, backend="cpu")


@contextlib.contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# Both C++ paths run the grid: "tiles" (tile GEMMs) and "stream" (the small-batch path, up to 16 rows).
PATHS = {"tiles": 0, "stream": 16}


def _rows(case):
    return functools.reduce(lambda a, b: a * b, case.lead, 1)


def _grid(path, cases):
    return [(path, c) for c in cases if path == "tiles" or _rows(c) <= PATHS["stream"]]


@pytest.fixture
def cpu_path(request, monkeypatch):
    monkeypatch.setattr(cpu, "STREAM_ROWS", PATHS[request.param])
    return request.param


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cpu_path,case", _grid("tiles", GRID) + _grid("stream", GRID), ids=str,
                         indirect=["cpu_path"])
def test_forward_matches_reference(cpu_path, case, threads):
    with num_threads(threads):
        check_forward(op, case)


_BACKWARD_GRID = [c for c in GRID if c.vocab * c.d <= 1_000_000]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cpu_path,case", _grid("tiles", _BACKWARD_GRID) + _grid("stream", _BACKWARD_GRID),
                         ids=str, indirect=["cpu_path"])
def test_backward_matches_reference(cpu_path, case, threads):
    with num_threads(threads):
        check_backward(op, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stream_path_matches_tile_path_all_grads(dtype):
    """Small batches (B = 1..16, V below and above 64 rows per thread, bias, temperature, softcap):
    the streaming path against the tile path, forward and every gradient, 1 and 2 threads."""
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    for rows, vocab, tied in [(1, 7, False), (2, 200, True), (5, 1001, False), (16, 333, True)]:
        case = Case(lead=(rows,), vocab=vocab, d=40, d_embed=24, bias=True, dtype=dtype, tied=tied)
        h, w, e, b = make_inputs(case)
        g = torch.randn(rows, e.shape[1], generator=torch.Generator().manual_seed(rows)).to(dtype)
        kw = dict(temperature=0.8, softcap=6.0, tied=tied)
        results = []
        for threads in (1, 2):
            with num_threads(threads):
                for stream_rows in (0, 16):
                    out32, lse = cpu.forward(h, w, e, b, stream_rows=stream_rows, **kw)
                    delta = (g.float() * out32).sum(-1)
                    grads = cpu.backward(g, h, w, e, b, lse, delta, stream_rows=stream_rows, need_hidden=True,
                                         need_weight=True, need_embed=not tied, need_bias=True,
                                         merge_tied_grads=False, **kw)
                    results.append((out32, lse) + tuple(x for x in grads if x is not None))
        for other in results[1:]:
            for x, y in zip(other, results[0]):
                torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol * y.abs().max().item())


def test_stream_rows_argument_is_validated():
    h, w = torch.randn(2, 8), torch.randn(5, 8)
    for bad in (17, -2, 2.5, True):
        with pytest.raises(ValueError, match="stream_rows"):
            cpu.forward(h, w, w, None, temperature=1.0, softcap=None, stream_rows=bad)


def _fwd(h, w, e, b, **kw):
    return cpu.forward(h, w, e, b, temperature=kw.pop("temperature", 1.0), softcap=kw.pop("softcap", None),
                       tied=w is e, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiling_and_threads_do_not_matter(dtype):
    """Tile sizes (odd ones, single rows, one split vs several) change rounding only."""
    h, w, e, b = make_inputs(Case(lead=(13,), vocab=517, d=24, d_embed=20, bias=True, dtype=dtype))
    ref, ref_lse = torch_chunked.forward(h, w, e, b, temperature=0.7, softcap=4.0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for threads in (1, 2):
        with num_threads(threads):
            for tile_v, row_block in [(0, 0), (1, 1), (7, 5), (100, 13), (258, 4)]:
                out, lse = _fwd(h, w, e, b, temperature=0.7, softcap=4.0, tile_v=tile_v, row_block=row_block,
                                stream_rows=0)
                torch.testing.assert_close(out, ref, **tol)
                torch.testing.assert_close(lse, ref_lse, **tol)


def test_backward_tiling_matches_chunked_all_grads():
    """Every gradient flag combination, odd tiles, 1 and 2 threads, vs the torch backend (fp32)."""
    h, w, e, b = make_inputs(Case(lead=(9,), vocab=301, d=20, d_embed=12, bias=True))
    out32, lse = torch_chunked.forward(h, w, e, b, temperature=1.3, softcap=None)
    g = torch.randn(9, 12, generator=torch.Generator().manual_seed(3))
    delta = (g * out32).sum(-1)
    kw = dict(temperature=1.3, softcap=None, need_hidden=True, need_weight=True, need_embed=True,
              need_bias=True)
    ref = torch_chunked.backward(g, h, w, e, b, lse, delta, **kw)
    for threads in (1, 2):
        with num_threads(threads):
            for tile_v, row_block in [(0, 0), (7, 4), (64, 1)]:
                got = cpu.backward(g, h, w, e, b, lse, delta, tile_v=tile_v, row_block=row_block, stream_rows=0,
                                   **kw)
                for x, y in zip(got, ref):
                    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    only_embed = cpu.backward(g, h, w, e, b, lse, delta, temperature=1.3, softcap=None, need_hidden=False,
                              need_embed=True)
    assert only_embed[0] is None and only_embed[1] is None and only_embed[3] is None
    torch.testing.assert_close(only_embed[2], ref[2], rtol=1e-4, atol=1e-5)


def test_tied_merged_gradient_is_sum_of_both():
    case = Case(lead=(5,), vocab=211, d=16, tied=True)
    h, w, _, _ = make_inputs(case)
    out32, lse = cpu.forward(h, w, w, None, temperature=1.0, softcap=None, tied=True)
    g = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    delta = (g * out32).sum(-1)
    kw = dict(temperature=1.0, softcap=None, tied=True, need_hidden=False, need_weight=True, need_embed=True)
    merged = cpu.backward(g, h, w, w, None, lse, delta, merge_tied_grads=True, **kw)
    apart = cpu.backward(g, h, w, w, None, lse, delta, merge_tied_grads=False, **kw)
    assert merged[2] is None
    torch.testing.assert_close(merged[1], apart[1] + apart[2], rtol=1e-5, atol=1e-6)


def test_non_contiguous_weight_rows():
    """Weights with a unit last stride but a padded row stride (a slice of a wider matrix)."""
    h, w, e, b = make_inputs(Case(lead=(4,), vocab=300, d=24, bias=True), requires_grad=False)
    wide_w = torch.zeros(300, 40)
    wide_w[:, 3:27] = w
    w_view = wide_w[:, 3:27]
    assert not w_view.is_contiguous() and w_view.stride(-1) == 1
    hv, wv, ev = (t.clone().requires_grad_() for t in (h, w_view, e))
    out = op(hv, wv, ev, b)
    torch.testing.assert_close(out, soft_token_embedding(h, w, e, b, backend="torch"), rtol=1e-5, atol=1e-6)
    out.backward(torch.ones_like(out))
    h2, w2, e2 = (t.clone().requires_grad_() for t in (h, w, e))
    soft_token_embedding(h2, w2, e2, b, backend="torch").backward(torch.ones_like(out))
    for x, y in ((hv, h2), (wv, w2), (ev, e2)):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cpu_path", ["tiles", "stream"], indirect=True)
def test_grad_filter_error_within_documented_bound(cpu_path):
    check_grad_filter_bound(op)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of every new tensor (not a view) an ATen op returns, C++ calls included."""

    def __init__(self):
        super().__init__()
        self.sizes, self.ops = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((t.numel(), str(func)))
        return out


@pytest.mark.parametrize("rows", [1, 8, 300])
def test_never_allocates_batch_by_vocab(rows):
    """No op inside forward or backward returns a tensor of more than B*V/2 elements (or V: d_bias).
    fp32 B <= 8 takes the streaming path (no GEMM at all), B = 300 the tile GEMMs."""
    vocab, d = 4099, 8
    h, w, e, b = make_inputs(Case(lead=(rows,), vocab=vocab, d=d, bias=True))
    g = torch.randn(rows, d)
    # One thread: at::parallel_for then runs in this thread, where the dispatch mode is active.
    with num_threads(1), _LargestTensor() as mode:
        out32, lse = cpu.forward(h, w, e, b, temperature=1.0, softcap=2.0)
        fwd_ops = set(mode.ops)
        cpu.backward(g, h, w, e, b, lse, (g * out32).sum(-1), temperature=1.0, softcap=2.0,
                     need_hidden=True, need_weight=False, need_embed=False, need_bias=True)
    # The mode really sees the C++ tile GEMMs; the streaming path has none.
    assert any("mm" in f for f in fwd_ops) == (rows > 8), fwd_ops
    biggest = max(mode.sizes)
    assert biggest[0] <= max(rows * vocab // 2, vocab), biggest


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_bad_dtype_is_a_clear_error(dtype):
    h = torch.ones(2, 8, dtype=dtype)
    w = torch.ones(5, 8, dtype=dtype)
    with pytest.raises(TypeError):
        op(h, w, w)
    with pytest.raises(TypeError, match="backend 'cpu'"):
        cpu.forward(h, w, w, None, temperature=1.0, softcap=None)


def test_bad_inputs_to_backend_are_clear_errors():
    h, w, e = torch.randn(2, 8), torch.randn(5, 8), torch.randn(5, 3)
    with pytest.raises(ValueError, match="unit last stride"):
        cpu.forward(h, w.T.contiguous().T, e, None, temperature=1.0, softcap=None)
    with pytest.raises(RuntimeError, match="must share one dtype"):
        cpu.forward(h, w.bfloat16(), e, None, temperature=1.0, softcap=None)
    with pytest.raises(RuntimeError, match="d="):
        cpu.forward(torch.randn(2, 7), w, e, None, temperature=1.0, softcap=None)
    with pytest.raises(RuntimeError, match="temperature"):
        cpu.forward(h, w, e, None, temperature=0.0, softcap=None)
    with pytest.raises(ValueError, match="temperature"):
        op(h, w, e, temperature=-1.0)
    with pytest.raises(ValueError, match="2-D"):
        cpu.forward(h[None], w, e, None, temperature=1.0, softcap=None)


def test_auto_prefers_cpu_backend():
    from gircse_kernels import dispatch

    assert dispatch.resolve_backend("auto", torch.device("cpu")) == ("cpu", cpu)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_worker_threads_inherit_grad_and_inference_mode(mode):
    """Under torch.inference_mode the state tensors are inference tensors: the worker threads must
    run in inference mode too (in-place updates would fail otherwise)."""
    h, w, e, b = make_inputs(Case(lead=(6,), vocab=3001, d=16, bias=True))
    ref = soft_token_embedding(h, w, e, b, backend="torch")
    with num_threads(2), getattr(torch, mode)():
        out = op(h, w, e, b)
        out32, lse = cpu.forward(h, w, e, b, temperature=1.0, softcap=None)
        g = torch.randn(6, 16)
        grads = cpu.backward(g, h, w, e, b, lse, (g * out32).sum(-1), temperature=1.0, softcap=None,
                             need_hidden=True, need_weight=True, need_embed=True, need_bias=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert all(x is not None and torch.isfinite(x).all() for x in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_fully_masked_rows_behave_like_torch_softmax(dtype, tied):
    check_fully_masked(op, dtype=dtype, tied=tied)

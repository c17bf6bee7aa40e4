"""The C++ CPU backend (backend="cpu") against the reference, on the grid every backend runs.

Every path a CPU can take is forced here, whatever this machine would pick: the tile GEMMs with the
native bf16 engine (where this CPU has one) and with the fp32 engine on upcast tiles (what a CPU
without native bf16 GEMMs runs), and the streaming path in each of its ISA clones this CPU can run.
Under ``GIRCSE_REQUIRE_EXTENSION=1`` (CI) a missing extension fails this file instead of skipping it.
"""
import contextlib
import functools
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gircse_kernels import cpu, soft_token_embedding, torch_chunked
from tests.gircse_kernels.op_cases import (
    GRID, Case, check_backward, check_forward, check_fully_masked, check_grad_filter_bound, make_inputs)

pytestmark = pytest.mark.skipif(not cpu.extension_required() and not cpu.available(),
                                reason=f"C++ extension unavailable: {cpu.load_error()}")

op = functools.partial(soft_token_embedding, backend="cpu")
CAPS = cpu.capabilities() if cpu.available() else {"isas": [], "bf16_gemm": False}


@contextlib.contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# Every path, as overrides of the module defaults (STREAM_ROWS, ISA, GEMM).
PATHS = {
    "tiles": dict(STREAM_ROWS=0),                     # native bf16 GEMMs where the CPU has them
    "tiles-fp32gemm": dict(STREAM_ROWS=0, GEMM="fp32"),  # upcast tiles: CPUs without native bf16 GEMMs
    "stream": dict(STREAM_ROWS=64),                   # the best ISA clone
    "stream-avx2": dict(STREAM_ROWS=64, ISA="avx2"),
    "stream-baseline": dict(STREAM_ROWS=64, ISA="baseline"),
}


def _path_runs(path, case):
    """Paths that differ from another one for this case and that this CPU can run."""
    settings = PATHS[path]
    if settings.get("ISA", "auto") not in ("auto", *CAPS["isas"]):
        return False
    if path == "tiles-fp32gemm":  # only bf16 inputs have a choice of engine
        return case.dtype == torch.bfloat16 and CAPS["bf16_gemm"]
    return True


def _grid(cases, paths=PATHS, threads=(1, 2)):
    params = []
    for path in paths:
        for case in cases:
            if not _path_runs(path, case):
                continue
            # The clones share the threading code of "stream": one thread count is enough for them.
            for t in threads if path in ("tiles", "tiles-fp32gemm", "stream") else threads[:1]:
                params.append(pytest.param(path, case, t, id=f"{path}-{case}-t{t}"))
    return params


@pytest.fixture
def cpu_path(request, monkeypatch):
    for name, value in PATHS[request.param].items():
        monkeypatch.setattr(cpu, name, value)
    return request.param


@pytest.mark.parametrize("cpu_path,case,threads", _grid(GRID), indirect=["cpu_path"])
def test_forward_matches_reference(cpu_path, case, threads):
    with num_threads(threads):
        check_forward(op, case)


_BACKWARD_GRID = [c for c in GRID if c.vocab * c.d <= 1_000_000]


@pytest.mark.parametrize("cpu_path,case,threads", _grid(_BACKWARD_GRID), indirect=["cpu_path"])
def test_backward_matches_reference(cpu_path, case, threads):
    with num_threads(threads):
        check_backward(op, case)


@pytest.mark.parametrize("cpu_path", list(PATHS), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_fully_masked_rows_behave_like_torch_softmax(cpu_path, dtype, tied):
    if not _path_runs(cpu_path, Case(dtype=dtype)):
        pytest.skip("path not distinct or not runnable here")
    for threads in (1, 2):
        with num_threads(threads):
            check_fully_masked(op, dtype=dtype, tied=tied)


def _run(h, w, e, b, g, tied, kw, **overrides):
    """out32, lse and every gradient of one call (temperature and softcap from kw)."""
    out32, lse = cpu.forward(h, w, e, b, tied=tied, **kw, **overrides)
    delta = (g.float() * out32).sum(-1)
    grads = cpu.backward(g, h, w, e, b, lse, delta, tied=tied, need_hidden=True, need_weight=True,
                         need_embed=not tied, need_bias=b is not None, **kw, **overrides)
    return [out32, lse] + [x for x in grads if x is not None]


def _close(x, y, rel):
    """|x - y| <= rel * max|y| elementwise (rel = 0: bit-equal)."""
    x, y = x.float(), y.float()
    if rel == 0:
        assert torch.equal(x, y)
    else:
        torch.testing.assert_close(x, y, rtol=0, atol=rel * y.abs().max().item())


# How closely the paths agree, relative to the largest magnitude of the result. out32 and lse are
# fp32 on every path; the gradients come back in the inputs' dtype, so after their final rounding
# (bf16: 2^-8 relative per element) they can differ by one unit of that dtype.
AGREE_FP32 = 4e-6                      # fp32 arithmetic throughout (streaming, fp32 GEMM engine)
AGREE_BF16_ENGINE = 4e-3               # native bf16 GEMMs: p and dz are rounded to bf16 operands
AGREE_BF16_ENGINE_GRADS = 8e-3         # ... and the gradients rounded to bf16 once more at the end
ROUNDING = {torch.float32: 4e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_paths_agree_to_fp32_accumulation(dtype):
    """Every path against the fp32-GEMM tile path (B = 1..16, V below and above one tile per thread,
    odd d with a vector remainder, bias, temperature, softcap, tied and untied), forward and every
    gradient, 1 and 2 threads: fp32 accumulation everywhere, so out32 / lse agree to ~1e-6."""
    kw = dict(temperature=0.8, softcap=6.0)
    for rows, vocab, d, d_e, tied in [(1, 7, 40, 24, False), (2, 200, 96, 96, True), (5, 1001, 100, 72, False),
                                      (16, 333, 64, 130, False)]:
        case = Case(lead=(rows,), vocab=vocab, d=d, d_embed=None if tied else d_e, bias=True, dtype=dtype, tied=tied)
        h, w, e, b = make_inputs(case)
        g = torch.randn(rows, e.shape[1], generator=torch.Generator().manual_seed(rows)).to(dtype)
        for threads in (1, 2):
            with num_threads(threads):
                ref = _run(h, w, e, b, g, tied, kw, stream_rows=0, gemm="fp32")
                for isa in CAPS["isas"]:
                    got = _run(h, w, e, b, g, tied, kw, stream_rows=64, isa=isa)
                    for i, (x, y) in enumerate(zip(got, ref)):
                        _close(x, y, AGREE_FP32 if i < 2 else ROUNDING[dtype])
                if dtype == torch.bfloat16 and CAPS["bf16_gemm"]:
                    got = _run(h, w, e, b, g, tied, kw, stream_rows=0, gemm="bf16")
                    for i, (x, y) in enumerate(zip(got, ref)):
                        _close(x, y, [AGREE_BF16_ENGINE, AGREE_FP32][i] if i < 2 else AGREE_BF16_ENGINE_GRADS)


def _fwd(h, w, e, b, **kw):
    return cpu.forward(h, w, e, b, temperature=kw.pop("temperature", 1.0), softcap=kw.pop("softcap", None),
                       tied=w is e, **kw)


@pytest.mark.parametrize("dtype,gemm", [(torch.float32, "auto"), (torch.bfloat16, "fp32"), (torch.bfloat16, "bf16")])
def test_tiling_and_threads_do_not_matter(dtype, gemm):
    """Tile sizes (odd ones, single rows, one split vs several) change rounding only."""
    if gemm == "bf16" and not CAPS["bf16_gemm"]:
        pytest.skip("no native bf16 GEMM on this CPU")
    h, w, e, b = make_inputs(Case(lead=(13,), vocab=517, d=24, d_embed=20, bias=True, dtype=dtype))
    ref, ref_lse = _fwd(h, w, e, b, temperature=0.7, softcap=4.0, stream_rows=0, gemm="fp32", tile_v=517 // 2 + 1)
    rel = AGREE_BF16_ENGINE if gemm == "bf16" else AGREE_FP32
    for threads in (1, 2):
        with num_threads(threads):
            for tile_v, row_block in [(0, 0), (1, 1), (7, 5), (100, 13), (258, 4)]:
                out, lse = _fwd(h, w, e, b, temperature=0.7, softcap=4.0, tile_v=tile_v, row_block=row_block,
                                stream_rows=0, gemm=gemm)
                _close(out, ref, rel)
                _close(lse, ref_lse, AGREE_FP32)


@pytest.mark.parametrize("dtype,gemm", [(torch.float32, "auto"), (torch.bfloat16, "fp32"), (torch.bfloat16, "bf16")])
def test_backward_tiling_and_row_groups_match(dtype, gemm):
    """Every gradient flag combination, odd tiles, 1 and 2 threads, the vocabulary-split schedule and
    the row-group schedule (a tiny partial budget: several groups share each tile's weight gradients),
    against the torch backend."""
    if gemm == "bf16" and not CAPS["bf16_gemm"]:
        pytest.skip("no native bf16 GEMM on this CPU")
    h, w, e, b = make_inputs(Case(lead=(70,), vocab=301, d=20, d_embed=12, bias=True, dtype=dtype))
    out32, lse = torch_chunked.forward(h, w, e, b, temperature=1.3, softcap=None)
    g = torch.randn(70, 12, generator=torch.Generator().manual_seed(3)).to(dtype)
    delta = (g.float() * out32).sum(-1)
    kw = dict(temperature=1.3, softcap=None, need_hidden=True, need_weight=True, need_embed=True, need_bias=True)
    ref = torch_chunked.backward(g, h, w, e, b, lse, delta, **kw)
    rel = AGREE_BF16_ENGINE_GRADS if gemm == "bf16" else ROUNDING[dtype]
    for threads in (1, 2):
        with num_threads(threads):
            for tile_v, row_block, budget in [(0, 0, 0), (7, 4, 0), (64, 1, 0), (0, 16, 1), (33, 9, 1)]:
                settings = dict(tile_v=tile_v, row_block=row_block, partial_budget=budget, stream_rows=0, gemm=gemm)
                if budget and threads == 2:
                    assert cpu.plan(70, 301, 20, 12, dtype, backward=True, **settings)["groups"] > 1
                got = cpu.backward(g, h, w, e, b, lse, delta, **settings, **kw)
                for x, y in zip(got, ref):
                    _close(x, y, rel)
    only_embed = cpu.backward(g, h, w, e, b, lse, delta, temperature=1.3, softcap=None, need_hidden=False,
                              need_embed=True, stream_rows=0, gemm=gemm)
    assert only_embed[0] is None and only_embed[1] is None and only_embed[3] is None
    _close(only_embed[2], ref[2], rel)


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_engine_dh_only_matches_every_gradient(tied):
    """A d_hidden-only call of the bf16 engine (LoRA training; it writes no [dz | p] operand for weight
    gradients) gives the same d_hidden bits as a call with every gradient, with one row block and with
    three, and both agree with the fp32 engine (d = 150, d_e = 136: no multiple of a vector width)."""
    if not CAPS["bf16_gemm"]:
        pytest.skip("no native bf16 GEMM on this CPU")
    rows, vocab, d = 40, 777, 150
    d_e = d if tied else 136
    h, w, e, b = make_inputs(Case(lead=(rows,), vocab=vocab, d=d, d_embed=None if tied else d_e, bias=True,
                                  dtype=torch.bfloat16, tied=tied))
    g = torch.randn(rows, d_e, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    kw = dict(temperature=0.9, softcap=None)
    ref = _run(h, w, e, b, g, tied, kw, stream_rows=0, gemm="fp32")
    for row_block in (0, 16):  # one row block, three
        for threads in (1, 2):
            with num_threads(threads):
                got = _run(h, w, e, b, g, tied, kw, stream_rows=0, gemm="bf16", row_block=row_block)
                for i, (x, y) in enumerate(zip(got, ref)):
                    _close(x, y, [AGREE_BF16_ENGINE, AGREE_FP32][i] if i < 2 else AGREE_BF16_ENGINE_GRADS)
                out32, lse = got[0], got[1]
                delta = (g.float() * out32).sum(-1)
                settings = dict(tied=tied, stream_rows=0, gemm="bf16", row_block=row_block, **kw)
                dh_only = cpu.backward(g, h, w, e, b, lse, delta, need_hidden=True, **settings)
                every = cpu.backward(g, h, w, e, b, lse, delta, need_hidden=True, need_weight=True,
                                     need_embed=not tied, need_bias=True, **settings)
                assert dh_only[1] is None and dh_only[2] is None and dh_only[3] is None
                _close(dh_only[0], every[0], 0)


@pytest.mark.parametrize("dtype,gemm", [(torch.float32, "auto"), (torch.bfloat16, "fp32"), (torch.bfloat16, "bf16")])
def test_forward_row_groups_match(dtype, gemm):
    """The forward's row-group schedule (partial budget exceeded) equals the split schedule."""
    if gemm == "bf16" and not CAPS["bf16_gemm"]:
        pytest.skip("no native bf16 GEMM on this CPU")
    h, w, e, b = make_inputs(Case(lead=(90,), vocab=1001, d=32, d_embed=16, bias=True, dtype=dtype))
    ref, ref_lse = _fwd(h, w, e, b, temperature=0.9, stream_rows=0, gemm=gemm)
    for threads in (1, 2):
        with num_threads(threads):
            plan = cpu.plan(90, 1001, 32, 16, dtype, partial_budget=1, stream_rows=0, gemm=gemm, row_block=16)
            assert plan["splits"] == 1 and plan["groups"] == threads
            out, lse = _fwd(h, w, e, b, temperature=0.9, stream_rows=0, gemm=gemm, partial_budget=1, row_block=16)
            _close(out, ref, AGREE_BF16_ENGINE if gemm == "bf16" else AGREE_FP32)
            _close(lse, ref_lse, AGREE_FP32)


@pytest.mark.parametrize("cpu_path", ["tiles", "tiles-fp32gemm", "stream"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_merged_gradient_is_sum_of_both(cpu_path, dtype):
    """With the same tensor as both weights the merged gradient (one GEMM over [dz; p] and [h; dO]
    in the tile path) is the sum of the two separate ones."""
    if not _path_runs(cpu_path, Case(dtype=dtype)):
        pytest.skip("path not distinct here")
    case = Case(lead=(21,), vocab=211, d=16, tied=True, dtype=dtype)
    h, w, _, _ = make_inputs(case)
    out32, lse = cpu.forward(h, w, w, None, temperature=1.0, softcap=None, tied=True)
    g = torch.randn(21, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    delta = (g.float() * out32).sum(-1)
    kw = dict(temperature=1.0, softcap=None, tied=True, need_hidden=False, need_weight=True, need_embed=True)
    merged = cpu.backward(g, h, w, w, None, lse, delta, merge_tied_grads=True, **kw)
    apart = cpu.backward(g, h, w, w, None, lse, delta, merge_tied_grads=False, **kw)
    assert merged[2] is None
    rel = AGREE_BF16_ENGINE_GRADS if cpu_path == "tiles" and dtype == torch.bfloat16 else ROUNDING[dtype]
    _close(merged[1], apart[1].float() + apart[2].float(), rel)


def _strided_views(w, e):
    """W as the transpose of a [d, V] matrix (strides (1, V)); E with a padded row stride and a last
    stride of 2."""
    w_t = w.T.contiguous().T
    wide = torch.zeros(e.shape[0], 2 * e.shape[1] + 3, dtype=e.dtype)
    wide[:, 3::2] = e
    e_s = wide[:, 3::2]
    assert w_t.stride() == (1, w.shape[0]) and e_s.stride(-1) == 2
    return w_t, e_s


@pytest.mark.parametrize("cpu_path", list(PATHS), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_weights_match_contiguous(cpu_path, dtype):
    """Any strides of W and E (a transposed view, a non-unit last stride) give the contiguous
    results, forward and every gradient, tied and untied, without a copy of the whole matrix."""
    if not _path_runs(cpu_path, Case(dtype=dtype)):
        pytest.skip("path not distinct or not runnable here")
    for tied in (False, True):
        case = Case(lead=(19,), vocab=8009, d=40, d_embed=None if tied else 24, bias=True, dtype=dtype, tied=tied)
        h, w, e, b = make_inputs(case)
        g = torch.randn(19, e.shape[1], generator=torch.Generator().manual_seed(5)).to(dtype)
        w_s, e_s = _strided_views(w, e)
        if tied:
            e_s = w_s
        kw = dict(temperature=0.9, softcap=None)
        ref = _run(h, w, e, b, g, tied, kw)
        got = _run(h, w_s, e_s, b, g, tied, kw)
        rel = AGREE_BF16_ENGINE if cpu_path == "tiles" and dtype == torch.bfloat16 else AGREE_FP32
        for i, (x, y) in enumerate(zip(got, ref)):
            _close(x, y, rel if i < 2 else max(rel, ROUNDING[dtype]))
        # No copy of the whole matrix: nothing of V * d / 2 elements or more besides the gradients.
        with num_threads(1), _LargestTensor() as mode:
            outputs = _run(h, w_s, e_s, b, g, tied, kw)
        assert mode.largest(outputs)[0] < w.numel() // 2, mode.largest(outputs)
    # Through the public op, with autograd.
    h, w, e, b = make_inputs(Case(lead=(4,), vocab=300, d=24, bias=True, dtype=dtype))
    w_s, e_s = _strided_views(w, e)
    hv, wv, ev = (t.clone().requires_grad_() for t in (h, w_s, e_s))
    out = op(hv, wv, ev, b)
    out.backward(torch.ones_like(out))
    h2, w2, e2 = (t.clone().requires_grad_() for t in (h, w, e))
    out2 = op(h2, w2, e2, b)
    out2.backward(torch.ones_like(out2))
    _close(out, out2, 2 ** -7)
    for x, y in ((hv, h2), (wv, w2), (ev, e2)):
        _close(x.grad, y.grad, 2 ** -7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("isa", ["auto", "avx2"])
def test_batch_invariant_rows_are_bit_identical_alone_and_in_a_batch(dtype, isa):
    """batch_invariant=True: a row's out32, lse and d_hidden are bit-for-bit the same computed alone
    (B = 1) or inside B = 37 (at any position), on 1 or 2 threads; masked bias, temperature, softcap."""
    if isa not in ("auto", *CAPS["isas"]):
        pytest.skip(f"{isa} not supported here")
    case = Case(lead=(37,), vocab=20011, d=72, d_embed=40, bias=True, mask="tail", dtype=dtype)
    h, w, e, b = make_inputs(case)
    g = torch.randn(37, 40, generator=torch.Generator().manual_seed(7)).to(dtype)
    kw = dict(temperature=0.7, softcap=8.0, batch_invariant=True, isa=isa)
    assert cpu.plan(37, 20011, 72, 40, dtype, batch_invariant=True)["path"] == "stream"

    def rows_of(rows, threads):
        with num_threads(threads):
            out32, lse = cpu.forward(h[rows], w, e, b, **kw)
            delta = (g[rows].float() * out32).sum(-1)
            dh = cpu.backward(g[rows], h[rows], w, e, b, lse, delta, **kw)[0]
        return out32, lse, dh

    full = rows_of(slice(None), 2)
    for threads in (1, 2):
        for r in (0, 5, 36):
            alone = rows_of(slice(r, r + 1), threads)
            for x, y in zip(alone, full):
                assert torch.equal(x[0], y[r]), (threads, r)
    assert torch.equal(rows_of(slice(None), 1)[2], full[2])
    # Large invariant batches run in passes of rows whose split partials fit the budget: here 16-row
    # passes (a small budget forces 3), which must not change a bit.
    kw["partial_budget"] = 6400
    assert cpu.plan(37, 20011, 72, 40, dtype, batch_invariant=True, partial_budget=6400)["groups"] == 3
    assert cpu.plan(37, 20011, 72, 40, dtype, batch_invariant=True, backward=True, partial_budget=6400)["groups"] == 3
    for x, y in zip(rows_of(slice(None), 2), full):
        assert torch.equal(x, y)
    # And it is the op: the same numbers as without the flag, to fp32 accuracy (sums over 20k terms).
    out32, _ = cpu.forward(h, w, e, b, temperature=0.7, softcap=8.0, stream_rows=0, gemm="fp32")
    _close(full[0], out32, 5 * AGREE_FP32)


def test_batch_invariant_partials_stay_within_the_budget_at_any_batch():
    """The streaming path's split partials (S x rows x width floats) stay under 64 MiB however large the
    invariant batch: B = 4096 at Qwen2-7B's shape runs in passes of rows (forward, and a dh-only backward)."""
    budget = 64 << 20
    for backward in (False, True):
        plan = cpu.plan(4096, 152064, 3584, 3584, torch.bfloat16, batch_invariant=True, backward=backward)
        assert plan["path"] == "stream" and plan["splits"] == 8
        rows_per_pass = -(-4096 // plan["groups"])
        assert plan["groups"] > 1 and 8 * rows_per_pass * (3584 + 2) * 4 <= budget
    assert cpu.plan(16, 152064, 3584, 3584, torch.bfloat16, batch_invariant=True)["groups"] == 1



def _naive_out_and_dh(h, w, g):
    """softmax(h W^T) @ W and its d_hidden for grad_out g, by torch's ops in the inputs' dtype."""
    h = h.clone().requires_grad_(True)
    out = torch.softmax(h @ w.T, -1) @ w
    return out.detach(), torch.autograd.grad(out, h, g)[0]


@pytest.mark.parametrize("rows,d,path", [(4, 32, "stream"), (16, 576, "stream"), (64, 32, "tiles")])
def test_fp32_vocabulary_sums_are_as_accurate_as_the_naive_formula(rows, d, path):
    """The streaming path sums a split's whole vocabulary range (V / S terms per output element) in
    fp32; as one sequential chain its error against fp64 was ~10x the naive fp32 formula's at
    SmolLM2's V = 49,152 (forward and d_hidden), enough to fail the authors' fp32 reference on the
    tiny qwen2 model. Its blocked sums stay within 3x of the naive formula, in every ISA clone, with
    and without batch invariance. h is scaled so the logits spread alike at both d (std ~1.1: many
    terms of one size, the hard case for a sum). The backward gets fp64's lse and delta rounded to
    fp32, so its own sums are measured: lse ~ 11 carries ~1e-6 of fp32 rounding whatever the sums,
    which alone puts d_hidden's error at ~2x the naive formula's at d = 576. The tile path (many rows)
    folds one tile's partial sums into the running ones per vocabulary tile, a short chain: measured at
    0.9-1.4x the naive formula's error (B = 64 and 256, d = 32 to 576, AMX Xeon)."""
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(49152, d, generator=gen) * 0.2
    h, g = torch.randn(rows, d, generator=gen) * (32 / d) ** 0.5, torch.randn(rows, d, generator=gen)
    exact = _naive_out_and_dh(h.double(), w.double(), g.double())
    naive_error = [(x.double() - y).abs().max().item() for x, y in zip(_naive_out_and_dh(h, w, g), exact)]
    lse = torch.logsumexp(h.double() @ w.double().T, -1).float()
    delta = (exact[0] * g.double()).sum(-1).float()
    for isa in CAPS["isas"]:
        for invariant in (False, True):
            stream_rows = 64 if path == "stream" else 8
            kw = dict(temperature=1.0, softcap=None, tied=True, batch_invariant=invariant, stream_rows=stream_rows,
                      isa=isa)
            # batch invariance puts every batch on the streaming path
            want = "stream" if invariant else path
            assert cpu.plan(rows, 49152, d, d, batch_invariant=invariant, stream_rows=stream_rows)["path"] == want
            out32 = cpu.forward(h, w, w, None, **kw)[0]
            dh = cpu.backward(g, h, w, w, None, lse, delta, **kw)[0]
            for name, got, want, naive in zip(("out32", "d_hidden"), (out32, dh), exact, naive_error):
                error = (got.double() - want).abs().max().item()
                assert error <= 3 * naive, (name, isa, invariant, error, naive)

def test_capabilities_and_plan():
    caps = cpu.capabilities()
    assert caps["isa"] == caps["isas"][0] and "baseline" in caps["isas"]
    assert caps["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    if caps["torch_capability"] == "AVX2":
        assert caps["isa"] == "avx2"
    assert caps["gemm_for_bf16"] == ("bf16" if caps["bf16_gemm"] else "fp32")
    assert caps["bf16_gemm"] <= (caps["avx512_bf16"] or caps["amx_bf16"])
    for isa in caps["isas"]:
        assert cpu.plan(2, 5000, 64, 64, isa=isa, stream_rows=8)["isa"] == isa
    assert cpu.plan(2, 5000, 64, 64, stream_rows=8)["path"] == "stream"
    assert cpu.plan(9, 5000, 64, 64, stream_rows=8)["path"] == "tiles"
    tiles = cpu.plan(300, 5000, 64, 64, torch.bfloat16)
    assert tiles["gemm"] == caps["gemm_for_bf16"]
    assert cpu.plan(300, 5000, 64, 64, torch.bfloat16, gemm="fp32")["gemm"] == "fp32"
    assert cpu.plan(300, 5000, 64, 64, torch.float32, gemm="bf16" if caps["bf16_gemm"] else "auto")["gemm"] == "fp32"
    assert cpu.plan(300, 5000, 63, 64, torch.bfloat16)["gemm"] == "fp32"  # odd d: no VNNI pairs
    if not caps["bf16_gemm"]:
        with pytest.raises(RuntimeError, match="no native bf16 GEMM"):
            cpu.plan(300, 5000, 64, 64, torch.bfloat16, gemm="bf16")
    for bad in set(("avx512", "avx2")) - set(caps["isas"]):
        with pytest.raises(RuntimeError, match="does not support"):
            cpu.plan(2, 5000, 64, 64, isa=bad)


def test_overrides_from_the_environment():
    code = "from gircse_kernels import cpu; print(cpu.ISA, cpu.GEMM)"
    env = dict(os.environ, GIRCSE_CPU_ISA="baseline", GIRCSE_CPU_GEMM="fp32")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout.split() == ["baseline", "fp32"]


def test_memory_is_bounded_whatever_the_thread_count():
    """At 64 threads, B = 4096, d = 3584 (the issue's example) the per-split partials stay within
    64 MiB (row groups take over from vocabulary splits) and a W + E tile within 512 KiB of bf16 (or
    the 256-row minimum), falling with d."""
    with num_threads(64):
        for backward in (False, True):
            for rows in (1, 64, 512, 4096):
                p = cpu.plan(rows, 152064, 3584, 3584, torch.bfloat16, backward=backward, stream_rows=0)
                if p["splits"] > 1:
                    assert p["splits"] * rows * (3584 + 16) * 4 <= 64 << 20, p
                assert p["splits"] * p["groups"] >= min(64, p["tiles"]) or p["groups"] == -(-rows // p["row_block"]), p
                assert p["tile_v"] == 256, p
            big = cpu.plan(4096, 152064, 3584, 3584, torch.bfloat16, backward=backward, stream_rows=0)
            assert big["splits"] == 1 and big["groups"] == 64, big
    narrow = cpu.plan(8, 49152, 64, 64, torch.bfloat16, stream_rows=0)["tile_v"]
    assert narrow > 256 and cpu.plan(8, 49152, 576, 576, torch.bfloat16, stream_rows=0)["tile_v"] == 256


def test_tuning_arguments_are_validated():
    h, w = torch.randn(2, 8), torch.randn(5, 8)
    call = functools.partial(cpu.forward, h, w, w, None, temperature=1.0, softcap=None)
    for bad in (65, -2, 2.5, True):
        with pytest.raises(ValueError, match="stream_rows"):
            call(stream_rows=bad)
    for name in ("tile_v", "row_block", "partial_budget"):
        with pytest.raises(ValueError, match=name):
            call(**{name: -1})
    with pytest.raises(ValueError, match="isa"):
        call(isa="sse9")
    with pytest.raises(ValueError, match="gemm"):
        call(gemm="int8")


@pytest.mark.parametrize("cpu_path", ["tiles", "stream"], indirect=True)
def test_grad_filter_error_within_documented_bound(cpu_path):
    check_grad_filter_bound(op)


class _LargestTensor(TorchDispatchMode):
    """Records every new tensor (not a view) an ATen op returns, C++ calls included."""

    def __init__(self):
        super().__init__()
        self.tensors, self.ops = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.tensors.append((t.numel(), str(func), t.untyped_storage().data_ptr()))
        return out

    def largest(self, outputs=()):
        """(numel, op) of the largest tensor that is not one of `outputs` (gradients, results)."""
        kept = {t.untyped_storage().data_ptr() for t in outputs if t is not None}
        return max(((n, f) for n, f, ptr in self.tensors if ptr not in kept), default=(0, ""))


@pytest.mark.parametrize("rows", [1, 8, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_never_allocates_batch_by_vocab(rows, dtype):
    """No op inside forward or backward creates a tensor of B*V/2 elements or more besides the
    results (at B = 1 not even a [1, V] buffer). B <= 8 streams (no GEMM at all), B = 300 runs the
    tile GEMMs (fp32: the mode sees ATen's mm; bf16: brgemm on this CPU, else upcast tiles), and
    batch_invariant=True streams at B = 300 too."""
    vocab, d = 16411, 8
    h, w, e, b = make_inputs(Case(lead=(rows,), vocab=vocab, d=d, bias=True, dtype=dtype))
    g = torch.randn(rows, d).to(dtype)
    for invariant in (False, True):
        # One thread: at::parallel_for then runs in this thread, where the dispatch mode is active.
        with num_threads(1), _LargestTensor() as mode:
            out32, lse = cpu.forward(h, w, e, b, temperature=1.0, softcap=2.0, batch_invariant=invariant)
            fwd_ops = set(mode.ops)
            grads = cpu.backward(g, h, w, e, b, lse, (g.float() * out32).sum(-1), temperature=1.0, softcap=2.0,
                                 need_hidden=True, need_weight=True, need_embed=True, need_bias=True,
                                 batch_invariant=invariant)
        if dtype == torch.float32:  # the mode really sees the C++ tile GEMMs; the streaming path has none
            assert any("mm" in f for f in fwd_ops) == (rows > 8 and not invariant), fwd_ops
        largest = mode.largest((out32, lse, *grads))
        assert largest[0] < rows * vocab // 2, largest


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
    with pytest.raises(ValueError, match="hidden needs a unit last stride"):
        cpu.forward(h.T.contiguous().T, torch.randn(5, 2), e, None, temperature=1.0, softcap=None)
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
    with pytest.raises(ValueError, match="lm_head_bias must be contiguous"):
        cpu.forward(h, w, e, torch.randn(10)[::2], temperature=1.0, softcap=None)


def test_auto_prefers_cpu_backend():
    from gircse_kernels import backends

    assert backends.resolve_backend("auto", torch.device("cpu")) == ("cpu", cpu)


@pytest.mark.parametrize("cpu_path", ["tiles", "stream"], indirect=True)
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_worker_threads_inherit_grad_and_inference_mode(cpu_path, mode):
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


def test_required_extension_is_an_error_not_a_fallback(monkeypatch):
    """GIRCSE_REQUIRE_EXTENSION=1 (CI): a missing compiled extension raises, no JIT, no fallback;
    without it the backend reports itself unavailable (here with the JIT switched off)."""
    import gircse_kernels

    monkeypatch.delattr(gircse_kernels, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "gircse_kernels._C", None)  # `from . import _C` fails
    for attr, value in (("_tried", False), ("_ext", None), ("_load_error", None)):
        monkeypatch.setattr(cpu, attr, value)
    monkeypatch.setenv("GIRCSE_REQUIRE_EXTENSION", "1")
    with pytest.raises(RuntimeError, match="required but unavailable.*GIRCSE_REQUIRE_EXTENSION"):
        cpu.available()
    monkeypatch.setattr(cpu, "_tried", False)
    monkeypatch.setenv("GIRCSE_REQUIRE_EXTENSION", "0")
    monkeypatch.setenv("GIRCSE_NO_JIT", "1")
    assert not cpu.available() and "GIRCSE_NO_JIT" in cpu.load_error()


@pytest.mark.skipif(not cpu.extension_required(), reason="only under GIRCSE_REQUIRE_EXTENSION=1")
def test_required_extension_is_the_compiled_one():
    from gircse_kernels import _C

    assert cpu.load_extension() is _C


@pytest.mark.parametrize("required", [False, True])
def test_setup_fails_loudly_when_the_extension_is_required(tmp_path, required):
    """A failing compiler: setup.py only warns normally, but fails under GIRCSE_REQUIRE_EXTENSION=1."""
    import shutil

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(root, name), tmp_path)
    shutil.copytree(os.path.join(root, "csrc"), tmp_path / "csrc")
    shutil.copytree(os.path.join(root, "gircse_kernels"), tmp_path / "gircse_kernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = dict(os.environ, CXX="/bin/false", GIRCSE_REQUIRE_EXTENSION="1" if required else "0")
    env.pop("GIRCSE_NO_EXTENSION", None)
    run = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert "C++ CPU extension not built" in run.stderr
    assert (run.returncode != 0) == required, run.stderr[-2000:]
    assert not list((tmp_path / "gircse_kernels").glob("_C*.so"))


def test_setup_lists_the_sources_the_jit_build_compiles():
    """setup.py names every C++ source explicitly; the JIT fallback compiles every csrc/*.cpp: the same files."""
    import ast
    import pathlib

    root = pathlib.Path(cpu.__file__).resolve().parent.parent
    setup = ast.parse((root / "setup.py").read_text())
    listed = [ast.literal_eval(node.value) for node in setup.body
              if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SOURCES" for t in node.targets)]
    assert listed == [[p.relative_to(root).as_posix() for p in cpu._sources()]]
    assert len(listed[0]) > 1


def test_jit_build_without_csrc_names_what_is_missing(tmp_path, monkeypatch):
    import re

    missing = tmp_path / "csrc"
    monkeypatch.setattr(cpu, "_CSRC", missing)
    with pytest.raises(ImportError, match=re.escape(f"no {missing}/*.cpp (installed without csrc/)")):
        cpu._jit_build()

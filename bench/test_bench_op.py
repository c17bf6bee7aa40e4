"""Op level: ``softmax(h W^T) @ E`` on every backend present against plain-PyTorch peers.

Three report sections:

* ``op``: every backend (``cpu`` C++ extension, ``torch`` chunked PyTorch, ``triton`` on CUDA) and the
  peers -- ``naive`` (``softmax(h @ W.T) @ E`` in the inputs' dtype, materializing [B, V]), ``chunked``
  (an online softmax over 8192-row vocabulary chunks written in PyTorch, differentiated by autograd)
  and ``sdpa`` (``F.scaled_dot_product_attention(h, W, E, scale=1)``; skipped on CPU above 50M logits,
  where it is the slowest peer by far) -- forward, forward+backward with only ``dh`` (LoRA training:
  the weights are frozen) and forward+backward with ``dW``/``dE`` too; bf16 and fp32; the real
  models' shapes. Time, achieved GB/s and TFLOP/s of the fastest backend, peak extra memory.
* ``op-small-batch`` (CPU): the C++ backend's two paths side by side -- tile GEMMs and the streaming
  pass -- and its automatic choice, at the batch sizes cached decoding runs (how the threshold
  ``gircse_kernels.cpu.STREAM_ROWS`` was chosen).
* ``decode``: one soft-token step (no grad) at small B against a plain copy of W measured in the
  same run: the step reads W (and E) once, so bandwidth is its figure of merit.

Every configuration is checked first: each method's output and gradients against the reference
(fp64 for fp32 inputs up to SmolLM2's size, else fp32; see ``truth``) with the bound of
``bench/checks.py`` (relative to the result's magnitude, plus plain PyTorch's same-dtype error;
the package's backends ``REL_TOL``, the peers the looser ``PEER_REL_TOL``).
FLOPs: forward ``2 B V (d + d_e)``; each backward pass adds the same for ``dh`` (``dp = dO E^T``,
``dh = dz W``) and again for ``dW``/``dE`` (recomputing the logits is not counted: it is an
implementation's choice). Bytes: W and E (E once when tied) read once per pass (fwd 1, fwd+bwd 2),
plus the weight gradients written.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from bench.checks import PEER_REL_TOL, check_close, relative_error
from bench.harness import available_bytes, time_methods
from gircse_kernels import reference, resolve_backend, soft_token_embedding

# (V, d, d_e, tied): the real models' LM head / input embeddings.
SHAPES = {
    "tiny": (3000, 64, 64, True),
    "tiny-untied": (3000, 64, 96, False),
    "smollm2-135m": (49152, 576, 576, True),
    "qwen2.5-0.5b": (151936, 896, 896, True),
    "mistral-7b": (32000, 4096, 4096, False),
    "qwen2-7b": (152064, 3584, 3584, False),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PASSES = ("fwd", "fwd+bwd dh", "fwd+bwd all")
REPS = {"quick": 1, "default": 2, "full": 5}


def grid_op_config(size: str, device: torch.device) -> list[tuple[str, str, int]]:
    """(shape, dtype, B) configurations of the ``op`` section for a run size."""
    if size == "quick":
        return [(s, dt, b) for s in ("tiny", "tiny-untied") for dt in DTYPES for b in (1, 8)]
    if device.type == "cuda":
        small, large = (1, 8, 32, 128, 512), (1, 8, 64, 512)
        if size == "default":
            small, large = (1, 32, 512), (1, 64)
        grid = [(s, "bf16", b) for s in ("smollm2-135m", "qwen2.5-0.5b") for b in small]
        grid += [(s, "bf16", b) for s in ("mistral-7b", "qwen2-7b") for b in large]
        return grid + [(s, "fp32", b) for s in ("smollm2-135m", "qwen2.5-0.5b") for b in (1, 64)]
    if size == "default":  # Qwen2.5's fp32 fwd+bwd at B = 64 alone would take minutes on 2 cores
        return [(s, dt, b) for s in ("smollm2-135m", "qwen2.5-0.5b") for dt in DTYPES for b in (1, 64)
                if (s, dt, b) != ("qwen2.5-0.5b", "fp32", 64)]
    grid = [(s, dt, b) for s in ("smollm2-135m", "qwen2.5-0.5b") for dt in DTYPES for b in (1, 8, 32, 128, 512)]
    return grid + [(s, dt, b) for s in ("mistral-7b", "qwen2-7b") for dt in DTYPES for b in (1, 8)]


# ---------------------------------------------------------------------- the methods
def naive(h, w, e):
    return torch.softmax(h @ w.T, dim=-1) @ e


def chunked(h, w, e, chunk=8192):
    """Online softmax over vocabulary chunks, GEMMs in the inputs' dtype, fp32 running statistics."""
    rows = h.shape[0]
    acc = h.new_zeros(rows, e.shape[1], dtype=torch.float32)
    run_max = h.new_full((rows, 1), float("-inf"), dtype=torch.float32)
    run_sum = h.new_zeros(rows, 1, dtype=torch.float32)
    # split (not slicing in the loop): autograd then concatenates the chunks' weight gradients once
    # instead of adding a full-size [V, d] gradient per chunk.
    for w_chunk, e_chunk in zip(w.split(chunk), e.split(chunk)):
        z = (h @ w_chunk.T).float()
        new_max = torch.maximum(run_max, z.amax(dim=1, keepdim=True))
        rescale = torch.exp(run_max - new_max)
        p = torch.exp(z - new_max)
        run_sum = run_sum * rescale + p.sum(dim=1, keepdim=True)
        acc = acc * rescale + (p.to(h.dtype) @ e_chunk).float()
        run_max = new_max
    return (acc / run_sum).to(h.dtype)


def sdpa(h, w, e):
    return F.scaled_dot_product_attention(h[None, None], w[None, None], e[None, None], scale=1.0)[0, 0]


def backend_op(name):
    def run(h, w, e):
        return soft_token_embedding(h, w, e, backend=name)
    return run


def backends(device: torch.device) -> list[str]:
    """The op's backends that run on ``device`` here (triton: CUDA only; the interpreter is for tests)."""
    present = []
    for name in ("triton", "cpu", "torch"):
        try:
            resolve_backend(name, device)
        except (ValueError, RuntimeError):
            continue
        present.append(name)
    return present


def methods(device, vocab, rows) -> dict:
    peers = {"naive": naive, "chunked": chunked}
    if device.type == "cuda" or rows * vocab <= 50_000_000:
        peers["sdpa"] = sdpa
    return peers, {name: backend_op(name) for name in backends(device)}


def make_inputs(shape, dtype, rows, device, seed=0):
    vocab, d, de, tied = shape
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(vocab, d, generator=g) / d ** 0.25).to(device=device, dtype=dtype)
    e = w if tied else torch.randn(vocab, de, generator=g).to(device=device, dtype=dtype)
    h = (torch.randn(rows, d, generator=g) / d ** 0.25).to(device=device, dtype=dtype)
    dout = torch.randn(rows, de, generator=g).to(device=device, dtype=dtype)  # non-uniform upstream grad
    return h, w, e, dout


def pass_fn(fn, pass_, h, w, e, dout):
    """A zero-argument callable running ``fn`` for one pass; returns (out, grads dict)."""
    tied = e is w

    def run():
        if pass_ == "fwd":
            with torch.no_grad():
                return fn(h, w, e), {}
        x = h.detach().requires_grad_(True)
        if pass_ == "fwd+bwd dh":
            out = fn(x, w, e)
            out.backward(dout)
            return out, {"dh": x.grad}
        wl = w.detach().requires_grad_(True)
        el = wl if tied else e.detach().requires_grad_(True)
        out = fn(x, wl, el)
        out.backward(dout)
        grads = {"dh": x.grad, "dW": wl.grad}
        if not tied:
            grads["dE"] = el.grad
        return out, grads
    return run


def _results(out_and_grads) -> dict:
    """``{"out": out, "dh": ..., ...}`` from a pass's ``(out, grads)``."""
    out, grads = out_and_grads
    return {"out": out, **grads}


def truth(pass_, h, w, e, dout):
    """Reference result: fp32 for low-precision inputs (its error is ~1e-6, far below their bounds);
    fp64 for fp32 inputs unless the fp64 weight copies would exceed 1 GB (fp64 GEMMs are slow on CPU)."""
    small = (w.numel() + (0 if e is w else e.numel())) * 8 <= 1e9
    acc = torch.float64 if h.dtype == torch.float32 and small else torch.float32
    hr, wr = h.detach().to(acc), w.detach().to(acc)
    er = wr if e is w else e.detach().to(acc)
    return pass_fn(lambda a, b, c: reference.soft_token_embedding(a, b, c), pass_, hr, wr, er, dout.to(acc))()


def flops_and_bytes(pass_, shape, rows, dtype):
    vocab, d, de, tied = shape
    size = torch.finfo(dtype).bits // 8
    weights = vocab * (d if tied else d + de) * size
    base = 2 * rows * vocab * (d + de)
    if pass_ == "fwd":
        return base, weights
    if pass_ == "fwd+bwd dh":
        return 2 * base, 2 * weights
    return 3 * base, 3 * weights  # reads twice, writes dW (and dE) once


# ---------------------------------------------------------------------- the op section
@pytest.fixture(scope="module")
def op_table(report, device):
    section = report.section(
        "op", "Op: every backend against PyTorch peers",
        "`softmax(h W^T) @ E`, no bias, T = 1; times in ms (best of the round-robin repetitions after a "
        "warmup). `naive` materializes [B, V]; `chunked` is an 8192-row online softmax in PyTorch "
        "(autograd through the loop); `sdpa` = `F.scaled_dot_product_attention(h, W, E, scale=1)`. "
        "`best` = the fastest backend of the package; GB/s and TFLOP/s are its achieved rates "
        "(bytes: W and E read once per pass, weight gradients written; FLOPs: 2BV(d+d_e) per pass, "
        "x2 with dh, x3 with dW/dE). Peak extra memory (MiB) of the call, naive vs best backend.")
    return section.table("grid", f"Op grid ({device.type})", [
        ("shape", "shape"), ("dtype", "dtype"), ("B", "B", "int"), ("pass", "pass"),
        ("naive", "naive ms", "ms"), ("chunked", "chunked ms", "ms"), ("sdpa", "sdpa ms", "ms"),
        ("torch", "torch ms", "ms"), ("cpu", "cpu ms", "ms"), ("triton", "triton ms", "ms"),
        ("best", "best"), ("best_vs_naive", "best / naive", "ratio"),
        ("best_vs_peer", "best / fastest peer", "ratio"), ("gbs", "GB/s", "gbs"), ("tflops", "TFLOP/s", "tflops"),
        ("naive_mib", "naive MiB", "mib"), ("best_mib", "best MiB", "mib"), ("cpu_busy", "cpu busy", "ratio")])


def cell_peak_bytes(shape, dtype, rows) -> int:
    """An upper estimate of what one ``op`` cell holds at its peak: the inputs, the reference's fp32 weight
    gradients, one method's gradients with its fp32 accumulators (together about twice the weights in
    fp32), the naive peer's [B, V] buffers, and 1 GiB for the process and the allocator. Measured on the
    24 GiB EPYC: Qwen2-7B B = 1 peaked at 9.1 GB RSS in bf16 (estimate 12.0 GB), 11.2 GB in fp32 (14.2 GB)."""
    vocab, d, de, tied = shape
    fp32_weights = vocab * (d + (0 if tied else de)) * 4
    inputs = fp32_weights * torch.finfo(dtype).bits // 32 + rows * (d + de) * 4
    return inputs + 2 * fp32_weights + 8 * rows * vocab * 4 + (1 << 30)


def test_bench_op(op_config, op_table, report, size, device):
    shape_name, dtype_name, rows = op_config
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    need, free = cell_peak_bytes(shape, dtype, rows), available_bytes(device)
    if free is not None and need > free:  # e.g. Qwen2-7B in fp32 on a small machine: skip it, say so
        why = (f"{shape_name} {dtype_name} B={rows} not run: it needs about {need / 2**30:.1f} GiB, "
               f"{free / 2**30:.1f} GiB were available")
        op_table.note = f"{op_table.note} {why}.".strip()
        pytest.skip(why)
    torch.manual_seed(0)
    h, w, e, dout = make_inputs(shape, dtype, rows, device)
    peers, ours = methods(device, shape[0], rows)
    every = {**peers, **ours}
    for pass_ in PASSES:
        # Alive at once: the reference, one method's results and the baseline's errors (at Qwen2-7B's
        # shape one set of weight gradients is 2-4 GB).
        refs = _results(truth(pass_, h, w, e, dout))
        base = {k: relative_error(v, refs[k]) for k, v in _results(pass_fn(naive, pass_, h, w, e, dout)()).items()}
        where = f"{shape_name} {dtype_name} B={rows} {pass_}"
        for name, fn in every.items():
            tol = dict(rel_tol=PEER_REL_TOL[dtype]) if name in peers else {}
            results = _results(pass_fn(fn, pass_, h, w, e, dout)())
            for k, ref in refs.items():
                check_close(report, "op", f"{name} {where} {k}", results[k], ref, dtype=dtype, baseline=base[k], **tol)
            del results
        del refs, ref
        timed = time_methods({n: pass_fn(fn, pass_, h, w, e, dout) for n, fn in every.items()},
                             reps=REPS[size], device=device)
        best = min(ours, key=lambda n: timed[n].seconds)
        peer = min(peers, key=lambda n: timed[n].seconds)
        flops, moved = flops_and_bytes(pass_, shape, rows, dtype)
        t = timed[best].seconds
        op_table.add(shape=shape_name, dtype=dtype_name, B=rows, **{"pass": pass_},
                     **{n: m.seconds for n, m in timed.items()}, best=best,
                     best_vs_naive=t / timed["naive"].seconds, best_vs_peer=t / timed[peer].seconds,
                     gbs=moved / t, tflops=flops / t, naive_mib=timed["naive"].peak_mib,
                     best_mib=timed[best].peak_mib, cpu_busy=timed[best].cpu_busy,
                     extra={"fastest_peer": peer, "peak_mib": {n: m.peak_mib for n, m in timed.items()},
                            "flops": flops, "bytes": moved, "V": shape[0], "d": shape[1], "d_e": shape[2],
                            "tied": shape[3]})


# ---------------------------------------------------------------------- small batch: C++ paths
def cpu_path(stream_rows):
    """The C++ backend with its small-batch threshold forced (-1: the automatic choice)."""
    from gircse_kernels import cpu

    def run(h, w, e):
        old = cpu.STREAM_ROWS
        cpu.STREAM_ROWS = stream_rows
        try:
            return soft_token_embedding(h, w, e, backend="cpu")
        finally:
            cpu.STREAM_ROWS = old
    return run


def small_batch_grid(size):
    if size == "quick":
        return [("tiny", b) for b in (1, 4)]
    if size == "default":
        return [("smollm2-135m", b) for b in (1, 4, 16)]
    return [(s, b) for s in ("smollm2-135m", "qwen2.5-0.5b") for b in (1, 2, 4, 8, 16)]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_bench_cpu_small_batch(dtype_name, report, size, device):
    if device.type != "cpu" or "cpu" not in backends(device):
        pytest.skip("the C++ backend's two paths: CPU only, extension built")
    section = report.section(
        "op-small-batch", "Op on CPU at small batch: C++ streaming pass vs tile GEMMs",
        "Cached decoding embeds one soft token per sequence per step, so B is the number of sequences "
        "encoded together. `tiles` forces the tile-GEMM path (`STREAM_ROWS = 0`), `stream` the streaming "
        "pass (`STREAM_ROWS = 16`), `auto` the backend's default threshold; ms, best of the round-robin "
        "repetitions. fwd+bwd: only `h` requires grad.")
    table = section.table(dtype_name, dtype_name, [
            ("shape", "shape"), ("B", "B", "int"), ("pass", "pass"), ("naive", "naive", "ms"),
            ("tiles", "tiles", "ms"), ("stream", "stream", "ms"), ("auto", "auto", "ms"),
            ("auto_vs_naive", "auto / naive", "ratio"), ("stream_vs_tiles", "stream / tiles", "ratio")])
    dtype = DTYPES[dtype_name]
    fns = {"naive": naive, "tiles": cpu_path(0), "stream": cpu_path(16), "auto": cpu_path(-1)}
    for shape_name, rows in small_batch_grid(size):
        h, w, e, dout = make_inputs(SHAPES[shape_name], dtype, rows, torch.device("cpu"))
        for pass_ in PASSES[:2]:
            ref_out, ref_grads = truth(pass_, h, w, e, dout)
            base_out, base_grads = pass_fn(naive, pass_, h, w, e, dout)()
            for name, fn in fns.items():
                out, grads = pass_fn(fn, pass_, h, w, e, dout)()
                where = f"{name} {shape_name} {dtype_name} B={rows} {pass_}"
                tol = dict(rel_tol=PEER_REL_TOL[dtype]) if name == "naive" else {}
                check_close(report, "op-small-batch", f"{where} out", out, ref_out, dtype=dtype, baseline=base_out,
                            **tol)
                if grads:
                    check_close(report, "op-small-batch", f"{where} dh", grads["dh"], ref_grads["dh"],
                                dtype=dtype, baseline=base_grads["dh"], **tol)
            timed = time_methods({n: pass_fn(fn, pass_, h, w, e, dout) for n, fn in fns.items()},
                                 reps=REPS[size] + 2)
            table.add(shape=shape_name, B=rows, **{"pass": pass_}, **{n: m.seconds for n, m in timed.items()},
                      auto_vs_naive=timed["auto"].seconds / timed["naive"].seconds,
                      stream_vs_tiles=timed["stream"].seconds / timed["tiles"].seconds)


# ---------------------------------------------------------------------- decode step bandwidth
def decode_grid(size, device):
    if size == "quick":
        return [("tiny", dt) for dt in DTYPES], (1, 8)
    shapes = ("smollm2-135m", "qwen2.5-0.5b") + (("mistral-7b", "qwen2-7b") if device.type == "cuda" else ())
    dtypes = ("bf16",) if device.type == "cuda" else tuple(DTYPES)
    return [(s, dt) for dt in dtypes for s in shapes], (1, 4, 16, 64)


def test_bench_decode_step(report, size, device):
    from gircse_kernels.triton.config import choose_config, num_sms

    section = report.section(
        "decode", "Decode step: one soft token (no grad) against a copy of W",
        "At small B a step reads W (and E) once: bytes = W (+ E untied) + hidden + output; `copy` = "
        "`dst.copy_(W)` timed in the same rounds (it reads and writes, so its bandwidth counts the bytes "
        "twice). Backend: `auto` (Triton on CUDA, the C++ extension on CPU).")
    table = section.table("steps", f"Decode step ({device.type})", [
        ("shape", "shape"), ("dtype", "dtype"), ("B", "B", "int"), ("config", "config"),
        ("step", "step ms", "ms"), ("gbs", "GB/s", "gbs"), ("copy_gbs", "copy GB/s", "gbs"),
        ("fraction", "fraction of copy", "ratio"), ("cpu_busy", "cpu busy", "ratio")])
    grid, batches = decode_grid(size, device)
    for shape_name, dtype_name in grid:
        shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
        _, w, e, _ = make_inputs(shape, dtype, 1, device)
        dst = torch.empty_like(w)
        for rows in batches:
            h, _, _, dout = make_inputs(shape, dtype, rows, device, seed=rows)
            step = functools.partial(soft_token_embedding, h, w, e, backend="auto")
            with torch.no_grad():
                ref_out, _ = truth("fwd", h, w, e, dout)
                check_close(report, "decode", f"{shape_name} {dtype_name} B={rows}", step(), ref_out, dtype=dtype,
                            baseline=naive(h, w, e))
                timed = time_methods({"step": step, "copy": lambda: dst.copy_(w)}, reps=REPS[size] + 2,
                                     device=device)
            size_b = torch.finfo(dtype).bits // 8
            moved = w.numel() * size_b + (0 if e is w else e.numel() * size_b) + rows * (shape[1] + shape[2]) * size_b
            copy_bw = 2 * w.numel() * size_b / timed["copy"].seconds
            config = f"backend {resolve_backend('auto', device)[0]}"
            if device.type == "cuda":
                cfg = choose_config(rows, shape[0], shape[1], shape[2], dtype, num_sms(device))
                config = f"{cfg.kind} M{cfg.block_m} x{cfg.num_splits} splits"
            bw = moved / timed["step"].seconds
            table.add(shape=shape_name, dtype=dtype_name, B=rows, config=config, step=timed["step"].seconds,
                      gbs=bw, copy_gbs=copy_bw, fraction=bw / copy_bw, cpu_busy=timed["step"].cpu_busy)

"""C++ CPU backend (``backend="cpu"``): a thin typed wrapper around the extension ``gircse_kernels._C``.

The extension (the C++ sources in ``csrc/``, described in ``csrc/README.md``) is normally compiled by
``pip install`` (setup.py, CppExtension + ninja). When the installed package has no compiled ``_C`` (no
compiler at install time, or a source checkout), the first use tries a JIT build of the same sources with
``torch.utils.cpp_extension.load`` (cached under ``$GIRCSE_EXT_DIR`` or torch's extension directory);
if that fails too, :func:`available` returns False and ``backend="auto"`` falls back to
``backend="torch"`` with a one-time warning (see ``backends.py``). ``GIRCSE_NO_JIT=1`` disables the
JIT attempt. ``GIRCSE_REQUIRE_EXTENSION=1`` (set by CI) makes a missing compiled ``_C`` an error
instead: no JIT, no fallback, :func:`load_extension` and :func:`available` raise.

Backend contract (shared by every backend module, see ``autograd.py``):
``forward(...) -> (out32 [B, d_e] fp32, lse [B] fp32)`` and
``backward(...) -> (d_hidden, d_lm_head_weight, d_embed_weight, d_lm_head_bias)``. ``hidden`` needs a
unit last stride; the weights may have any strides (a transposed view is read tile by tile, never
copied whole). Never a [B, V] buffer.

Two paths (details in ``csrc/README.md``): small batches (B <= 8 in bf16 with native bf16 GEMMs, else
B <= 16) stream each W / E row once (vector code cloned for AVX512, AVX2 and baseline x86-64, chosen
from the CPU); larger ones run tile GEMMs, with native bf16 GEMMs (fp32 output) where the CPU has
them (AVX512-BF16, AMX) and fp32 GEMMs on upcast tiles elsewhere. Precision: the streaming path and
the fp32 GEMMs accumulate everything in fp32 (out32 within ~1e-6 of the fp64 result, relative); the
native bf16 GEMMs round their operands p and dz to bf16 (out32 within ~2e-3, like FlashAttention).
Extra memory: the tile path's per-split partials stay under 64 MiB whatever the thread count (row
groups take over from vocabulary splits for large B x d), plus tile-sized buffers per thread; the
streaming path's per-split partials plus a block accumulator per thread (16 x d_e floats forward,
B x d backward, counted in the same 64 MiB when a batch-invariant backward runs in passes).

``batch_invariant=True`` makes a row's output, lse and d_hidden bit-for-bit independent of the batch
it is in and of the thread count (for one ISA clone): every B streams, over a number of vocabulary
splits fixed by V (S = clamp(V // 8192, 1, 8)); batches whose partials (S x B x d_e floats forward,
S x B x d backward) would exceed 64 MiB run in passes of rows that fit it (a backward with weight
gradients in one pass), which changes no row's bits. Large batches run at the streaming kernel's fp32
speed instead of the GEMMs'. Knobs, for tests and benchmarks (a keyword argument wins over the module
attribute, which wins over the environment):

``STREAM_ROWS`` / ``stream_rows=``
    batches of at most this many rows stream: -1 = automatic, 0 = never, at most 64.
``ISA`` / ``isa=`` / ``$GIRCSE_CPU_ISA``
    the streaming clone: "auto", "avx512", "avx2" or "baseline" (an error if the CPU lacks it).
``GEMM`` / ``gemm=`` / ``$GIRCSE_CPU_GEMM``
    the tile GEMMs of bf16 inputs: "auto", "bf16" (native bf16, an error where there is none) or
    "fp32" (upcast tiles). fp32 and fp16 inputs always run fp32 GEMMs.
``tile_v=``, ``row_block=``
    the tile path's vocabulary tile and row block (0 = automatic).
``partial_budget=``
    bytes the per-split partial accumulators may take (0 = 64 MiB); beyond it, the tile path spreads
    rows over row groups instead of vocabulary splits and the streaming path runs rows in passes.

:func:`capabilities` says what the CPU offers; :func:`plan` which path and configuration a call of
given sizes takes.
"""
from __future__ import annotations

import os
import pathlib
import threading
import types
import warnings

import torch

_CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
_lock = threading.Lock()
_ext: types.ModuleType | None = None
_load_error: str | None = None
_tried = False


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def extension_required() -> bool:
    """True under ``GIRCSE_REQUIRE_EXTENSION=1``: a missing compiled extension is an error (CI)."""
    return _env_flag("GIRCSE_REQUIRE_EXTENSION")


def _sources() -> list[pathlib.Path]:
    """The extension's C++ sources: every ``.cpp`` in ``csrc/`` (setup.py lists the same files)."""
    return sorted(_CSRC.glob("*.cpp"))


def _jit_build() -> types.ModuleType:
    from torch.utils import cpp_extension

    sources = _sources()
    if not sources:
        raise ImportError(f"C++ sources not found: no {_CSRC}/*.cpp (installed without csrc/)")
    build_dir = os.environ.get("GIRCSE_EXT_DIR")
    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
    return cpp_extension.load(
        name="gircse_kernels_C_jit", sources=[str(s) for s in sources],
        extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
        build_directory=build_dir, verbose=False,
    )


def load_extension() -> types.ModuleType | None:
    """The compiled extension: the installed ``gircse_kernels._C``, else a JIT build, else None
    (with ``GIRCSE_REQUIRE_EXTENSION=1``: the installed ``_C`` or a RuntimeError)."""
    global _ext, _load_error, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                from . import _C  # built by setup.py

                _ext = _C
            except ImportError as exc:
                _load_error = f"gircse_kernels._C not built ({exc})"
                if extension_required():
                    _load_error += "; GIRCSE_REQUIRE_EXTENSION=1 forbids the JIT build and the torch fallback"
                elif _env_flag("GIRCSE_NO_JIT"):
                    _load_error += "; JIT build disabled by GIRCSE_NO_JIT"
                else:
                    try:
                        _ext = _jit_build()
                    except Exception as jit_exc:  # no compiler, missing headers, ...: backend="torch"
                        _load_error += f"; JIT build failed: {type(jit_exc).__name__}: {jit_exc}"
                        warnings.warn(f"gircse_kernels: the C++ CPU extension is unavailable ({_load_error})",
                                      RuntimeWarning, stacklevel=2)
        if _ext is None and extension_required():
            raise RuntimeError(f"gircse_kernels: the C++ CPU extension is required but unavailable: {_load_error}")
        return _ext


def available() -> bool:
    """True when the C++ extension is built (or could be JIT-compiled now)."""
    return load_extension() is not None


def load_error() -> str | None:
    """Why the extension is unavailable (None when it loaded)."""
    try:
        load_extension()
    except RuntimeError:
        pass
    return _load_error


def _ext_or_raise() -> types.ModuleType:
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"gircse_kernels C++ CPU backend unavailable: {_load_error}")
    return ext


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Process-wide overrides (see the module docstring); tests and benchmarks set them.
STREAM_ROWS = -1
ISA = os.environ.get("GIRCSE_CPU_ISA", "auto")
GEMM = os.environ.get("GIRCSE_CPU_GEMM", "auto")
_ISAS = ("auto", "avx512", "avx2", "baseline")
_GEMMS = ("auto", "bf16", "fp32")


def _stream_rows(value):
    value = STREAM_ROWS if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= 64:
        raise ValueError(f"backend 'cpu': stream_rows must be an int in [-1, 64], got {value!r}")
    return value


def _choice(name, value, default, allowed):
    value = default if value is None else value
    if value not in allowed:
        raise ValueError(f"backend 'cpu': {name} must be one of {allowed}, got {value!r}")
    return value


def _tuning(tile_v, row_block, partial_budget, stream_rows, isa, gemm):
    for name, value in (("tile_v", tile_v), ("row_block", row_block), ("partial_budget", partial_budget)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"backend 'cpu': {name} must be an int >= 0 (0 = automatic), got {value!r}")
    return dict(tile_v=tile_v, row_block=row_block, partial_budget=partial_budget,
                stream_rows=_stream_rows(stream_rows), isa=_choice("isa", isa, ISA, _ISAS),
                gemm=_choice("gemm", gemm, GEMM, _GEMMS))


def _check(hidden, lm_head_weight, embed_weight, lm_head_bias):
    for name, t in (("hidden", hidden), ("lm_head_weight", lm_head_weight), ("embed_weight", embed_weight),
                    ("lm_head_bias", lm_head_bias)):
        if t is None:
            continue
        if t.device.type != "cpu":
            raise ValueError(f"backend 'cpu': {name} must be a CPU tensor, got {t.device}")
        if t.dtype not in _DTYPES:
            raise TypeError(
                f"backend 'cpu': {name} has dtype {t.dtype}; supported: float32, bfloat16, float16")
    if hidden.dim() != 2:
        raise ValueError(f"backend 'cpu': hidden must be 2-D [B, d], got shape {tuple(hidden.shape)}")
    if hidden.stride(-1) != 1:
        raise ValueError(f"backend 'cpu': hidden needs a unit last stride, got strides {hidden.stride()}")
    if lm_head_bias is not None and lm_head_bias.stride(-1) != 1:
        raise ValueError(f"backend 'cpu': lm_head_bias must be contiguous, got strides {lm_head_bias.stride()}")


def forward(hidden, lm_head_weight, embed_weight, lm_head_bias, *, temperature, softcap, tied=False,
            batch_invariant=False, tile_v=0, row_block=0, partial_budget=0, stream_rows=None, isa=None, gemm=None):
    """``(out32, lse)``. Tuning keywords as in the module docstring (None = the module default)."""
    _check(hidden, lm_head_weight, embed_weight, lm_head_bias)
    return _ext_or_raise().forward(hidden, lm_head_weight, embed_weight, lm_head_bias, float(temperature),
                                   None if softcap is None else float(softcap), bool(tied), bool(batch_invariant),
                                   **_tuning(tile_v, row_block, partial_budget, stream_rows, isa, gemm))


def backward(grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, *, temperature,
             softcap, tied=False, need_hidden=True, need_weight=False, need_embed=False, need_bias=False,
             merge_tied_grads=False, grad_filter_eps=0.0, batch_invariant=False, tile_v=0, row_block=0,
             partial_budget=0, stream_rows=None, isa=None, gemm=None):
    _check(hidden, lm_head_weight, embed_weight, lm_head_bias)
    return _ext_or_raise().backward(
        grad_out.to(hidden.dtype).contiguous(), hidden, lm_head_weight, embed_weight, lm_head_bias,
        lse.float().contiguous(), delta.float().contiguous(), float(temperature),
        None if softcap is None else float(softcap), bool(tied), bool(need_hidden), bool(need_weight),
        bool(need_embed), bool(need_bias and lm_head_bias is not None), bool(merge_tied_grads),
        float(grad_filter_eps), bool(batch_invariant),
        **_tuning(tile_v, row_block, partial_budget, stream_rows, isa, gemm),
    )


def capabilities() -> dict:
    """What this CPU offers the backend: ``isa`` (the streaming clone ``isa="auto"`` runs), ``isas``
    (every clone it can run), ``avx512_bf16`` / ``amx_bf16`` (CPUID), ``bf16_gemm`` (native bf16 GEMMs
    usable: one of those plus a working oneDNN brgemm), ``gemm_for_bf16`` (the tile engine bf16 inputs
    get by default) and ``torch_capability`` (``torch.backends.cpu.get_cpu_capability()``)."""
    caps = dict(_ext_or_raise().capabilities())
    caps["isas"] = list(caps["isas"])
    caps["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    return caps


def plan(rows, vocab, d, d_e, dtype=torch.float32, *, backward=False, batch_invariant=False, tile_v=0, row_block=0,
         partial_budget=0, stream_rows=None, isa=None, gemm=None) -> dict:
    """The path ("stream" or "tiles") and configuration a call with these sizes takes under the
    current thread count and overrides: ``isa``, ``splits``, ``groups`` (tiles: row groups; streaming:
    row passes, for a backward those of a d_hidden-only call), and for tiles ``gemm``, ``tile_v``,
    ``row_block``, ``tiles``."""
    if dtype not in _DTYPES:
        raise TypeError(f"backend 'cpu': dtype must be one of {_DTYPES}, got {dtype}")
    return dict(_ext_or_raise().plan(int(rows), int(vocab), int(d), int(d_e), str(dtype).replace("torch.", ""),
                                     bool(backward), bool(batch_invariant),
                                     **_tuning(tile_v, row_block, partial_budget, stream_rows, isa, gemm)))

"""C++ CPU backend (``backend="cpu"``): a thin typed wrapper around the extension ``gircse_kernels._C``.

The extension (``csrc/soft_token_embedding.cpp``) is normally compiled by ``pip install`` (setup.py,
CppExtension + ninja). When the installed package has no compiled ``_C`` (no compiler at install
time, or a source checkout), the first use tries a JIT build of the same source with
``torch.utils.cpp_extension.load`` (cached under ``$GIRCSE_EXT_DIR`` or torch's extension directory);
if that fails too, :func:`available` returns False and ``backend="auto"`` falls back to
``backend="torch"`` with a one-time warning (see ``dispatch.py``). ``GIRCSE_NO_JIT=1`` disables the
JIT attempt.

Backend contract (shared by every backend module, see ``autograd.py``):
``forward(...) -> (out32 [B, d_e] fp32, lse [B] fp32)`` and
``backward(...) -> (d_hidden, d_lm_head_weight, d_embed_weight, d_lm_head_bias)``.
Parallel over vocabulary splits (one per ATen thread, so B = 1 uses every core), fp32/bf16 natively
(fp16 tiles are upcast to fp32), never a [B, V] buffer. Batches of at most ``STREAM_ROWS`` rows (the
cached-decoding case) take a streaming path that reads each W / E row once per call instead of tile
GEMMs.
"""
from __future__ import annotations

import os
import pathlib
import threading
import types
import warnings

import torch

_SOURCE = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "soft_token_embedding.cpp"
_lock = threading.Lock()
_ext: types.ModuleType | None = None
_load_error: str | None = None
_tried = False


def _jit_build() -> types.ModuleType:
    from torch.utils import cpp_extension

    if not _SOURCE.is_file():
        raise ImportError(f"C++ source {_SOURCE} not found (installed without csrc/)")
    build_dir = os.environ.get("GIRCSE_EXT_DIR")
    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
    return cpp_extension.load(
        name="gircse_kernels_C_jit", sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
        build_directory=build_dir, verbose=False,
    )


def load_extension() -> types.ModuleType | None:
    """The compiled extension: the installed ``gircse_kernels._C``, else a JIT build, else None."""
    global _ext, _load_error, _tried
    with _lock:
        if _tried:
            return _ext
        _tried = True
        try:
            from . import _C  # built by setup.py

            _ext = _C
            return _ext
        except ImportError as exc:
            _load_error = f"gircse_kernels._C not built ({exc})"
        if os.environ.get("GIRCSE_NO_JIT", "0") not in ("", "0"):
            _load_error += "; JIT build disabled by GIRCSE_NO_JIT"
            return None
        try:
            _ext = _jit_build()
        except Exception as exc:  # no compiler, missing headers, ...: fall back to backend="torch"
            _load_error += f"; JIT build failed: {type(exc).__name__}: {exc}"
            warnings.warn(f"gircse_kernels: the C++ CPU extension is unavailable ({_load_error})",
                          RuntimeWarning, stacklevel=2)
        return _ext


def available() -> bool:
    """True when the C++ extension is built (or could be JIT-compiled now)."""
    return load_extension() is not None


def load_error() -> str | None:
    """Why the extension is unavailable (None when it loaded)."""
    load_extension()
    return _load_error


def _ext_or_raise() -> types.ModuleType:
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"gircse_kernels C++ CPU backend unavailable: {_load_error}")
    return ext


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Batches of at most this many rows take the streaming path of csrc/soft_token_embedding.cpp: -1 =
# the extension's default (bf16: 4, fp32 / fp16: 8, measured by bench/test_bench_cpu_small_batch.py),
# 0 = never, at most 16. A ``stream_rows`` argument overrides it per call; tests set it to run both
# paths on one grid.
STREAM_ROWS = -1


def _stream_rows(value):
    value = STREAM_ROWS if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= 16:
        raise ValueError(f"backend 'cpu': stream_rows must be an int in [-1, 16], got {value!r}")
    return value


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
        if t.dim() == 2 and t.stride(-1) != 1:
            raise ValueError(f"backend 'cpu': {name} needs a unit last stride, got strides {t.stride()}")
    if hidden.dim() != 2:
        raise ValueError(f"backend 'cpu': hidden must be 2-D [B, d], got shape {tuple(hidden.shape)}")


def forward(hidden, lm_head_weight, embed_weight, lm_head_bias, *, temperature, softcap, tied=False,
            tile_v=0, row_block=0, stream_rows=None):
    """``(out32, lse)``; ``tile_v`` / ``row_block`` override the automatic tiling (0 = automatic),
    ``stream_rows`` the small-batch threshold (None = ``STREAM_ROWS``)."""
    _check(hidden, lm_head_weight, embed_weight, lm_head_bias)
    return _ext_or_raise().forward(hidden, lm_head_weight, embed_weight, lm_head_bias, float(temperature),
                                   None if softcap is None else float(softcap), bool(tied), int(tile_v),
                                   int(row_block), _stream_rows(stream_rows))


def backward(grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, *, temperature,
             softcap, tied=False, need_hidden=True, need_weight=False, need_embed=False, need_bias=False,
             merge_tied_grads=False, grad_filter_eps=0.0, tile_v=0, row_block=0, stream_rows=None):
    _check(hidden, lm_head_weight, embed_weight, lm_head_bias)
    return _ext_or_raise().backward(
        grad_out.to(hidden.dtype).contiguous(), hidden, lm_head_weight, embed_weight, lm_head_bias,
        lse.float().contiguous(), delta.float().contiguous(), float(temperature),
        None if softcap is None else float(softcap), bool(tied), bool(need_hidden), bool(need_weight),
        bool(need_embed), bool(need_bias and lm_head_bias is not None), bool(merge_tied_grads),
        float(grad_filter_eps), int(tile_v), int(row_block), _stream_rows(stream_rows),
    )

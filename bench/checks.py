"""Correctness checks that run before a benchmark reports a figure.

Every check compares a result with its reference through the **relative** error
``max |result - reference| / max |reference|``, so the tolerance scales with the output's magnitude:
an all-zeros (or otherwise wrong) output has relative error 1 and fails in any dtype, whatever the
magnitude of the true result. A reference that is itself all zeros cannot judge anything and is an
error. Low-precision results are judged like the kernel tests' oracle (``tests/gircse_kernels/
op_cases.py``): the bound is the relative error of plain PyTorch in the same dtype plus ``REL_TOL``.
"""
from __future__ import annotations

import torch

# Relative tolerance on top of plain PyTorch's own same-dtype error (max-normalized).
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# For the peers a benchmark compares against (other people's formulations in plain PyTorch, e.g. an
# online softmax whose autograd runs in bf16: its dW is 7% off at SmolLM2 B=1): loose enough for
# their own rounding, tight enough to reject a broken peer, whose ratios would mean nothing.
PEER_REL_TOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 0.15, torch.float16: 0.05}
# Cached generation against the uncached oracle on a real model: the same math with GEMMs of other
# shapes (one-row steps vs whole sequences), so fp32 round-off that 30 layers and K soft-token
# feedback steps carry to ~2e-4 of the embedding's scale (SmolLM2, K = 5).
MODEL_REL_TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


class CheckFailed(AssertionError):
    pass


# Elements compared per step: fp64 copies of a chunk, never of a whole result (a Qwen2-7B dW is 545M
# elements; whole fp64 copies of it, its reference and their difference would take 13 GB).
_CHUNK = 1 << 22


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |result - reference| / max |reference|`` in fp64 (inf when the result is not finite),
    computed chunk by chunk so the extra memory is a few fp64 chunks whatever the tensors' size."""
    if result.shape != reference.shape:
        raise CheckFailed(f"shape {tuple(result.shape)} != reference shape {tuple(reference.shape)}")
    result, reference = result.detach().reshape(-1), reference.detach().reshape(-1)
    scale, worst, reference_finite, result_finite = 0.0, 0.0, True, True
    for start in range(0, reference.numel(), _CHUNK):
        ref = reference[start:start + _CHUNK].double().cpu()
        res = result[start:start + _CHUNK].double().cpu()
        reference_finite = reference_finite and bool(torch.isfinite(ref).all())
        result_finite = result_finite and bool(torch.isfinite(res).all())
        if not reference_finite:
            break
        scale = max(scale, ref.abs().max().item())
        if result_finite:
            worst = max(worst, (res - ref).abs().max().item())
    if not scale > 0 or not reference_finite:
        raise CheckFailed("degenerate reference (all zeros or not finite): it cannot judge a result")
    return worst / scale if result_finite else float("inf")


def check_close(report, section: str, what: str, result: torch.Tensor, reference: torch.Tensor, *,
                dtype: torch.dtype | None = None, baseline: torch.Tensor | float | None = None,
                rel_tol: float | None = None) -> float:
    """Raise :class:`CheckFailed` unless ``result`` matches ``reference`` (see the module docstring);
    record the check in ``report`` (may be None) and return the relative error.

    ``dtype``: the precision the result was computed in (picks ``REL_TOL``; default the result's).
    ``baseline``: plain PyTorch's result in that dtype, or its relative error already computed with
    :func:`relative_error` (so a large baseline need not stay alive); it is added to the bound.
    """
    dtype = dtype or result.dtype
    bound = REL_TOL[dtype] if rel_tol is None else rel_tol
    if isinstance(baseline, torch.Tensor):
        bound += relative_error(baseline, reference)
    elif baseline is not None:
        bound += float(baseline)
    error = relative_error(result, reference)
    if report is not None:
        report.record_check(section, what, error, bound)
    if not error <= bound:
        raise CheckFailed(f"{what}: relative error {error:.3e} > bound {bound:.3e}")
    return error


def check_all_close(report, section: str, what: str, results: dict, references: dict, **kwargs) -> None:
    """:func:`check_close` for each name in ``references`` (e.g. gradients by parameter name)."""
    missing = set(references) - set(results)
    if missing:
        raise CheckFailed(f"{what}: no result for {sorted(missing)}")
    for name, reference in references.items():
        check_close(report, section, f"{what} {name}", results[name], reference, **kwargs)

"""Argument checking shared by every backend of the op.

Every public entry point calls :func:`check_op_inputs` first, so a bad call fails the same way
whichever backend would have run it, with an error that names the offending argument.
"""
from __future__ import annotations

import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "triton", "cpu", "torch")


def _check_tensor(name: str, value, ndim: int | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")


def check_op_inputs(
    hidden,
    lm_head_weight,
    embed_weight,
    lm_head_bias,
    temperature,
    softcap,
    *,
    allowed_dtypes=SUPPORTED_DTYPES + (torch.float64,),
) -> None:
    """Validate the arguments of ``soft_token_embedding``; raise TypeError/ValueError naming them."""
    _check_tensor("hidden", hidden)
    _check_tensor("lm_head_weight", lm_head_weight, ndim=2)
    _check_tensor("embed_weight", embed_weight, ndim=2)
    if lm_head_bias is not None:
        _check_tensor("lm_head_bias", lm_head_bias, ndim=1)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension [..., d], got a 0-D tensor")

    vocab, d = lm_head_weight.shape
    if vocab == 0:
        raise ValueError("lm_head_weight must have at least one row (vocabulary size V >= 1)")
    if d == 0 or embed_weight.shape[1] == 0:
        raise ValueError("lm_head_weight and embed_weight must have a non-empty last dimension")
    if hidden.shape[-1] != d:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal lm_head_weight.shape[1] ({d})"
        )
    if embed_weight.shape[0] != vocab:
        raise ValueError(
            f"embed_weight must have V={vocab} rows like lm_head_weight, got {embed_weight.shape[0]}"
        )
    if lm_head_bias is not None and lm_head_bias.shape[0] != vocab:
        raise ValueError(f"lm_head_bias must have shape [{vocab}], got {tuple(lm_head_bias.shape)}")
    if hidden.numel() == 0:
        raise ValueError(f"hidden must hold at least one row, got shape {tuple(hidden.shape)} (empty batch)")

    named = [("hidden", hidden), ("lm_head_weight", lm_head_weight), ("embed_weight", embed_weight)]
    if lm_head_bias is not None:
        named.append(("lm_head_bias", lm_head_bias))
    for name, t in named:
        if t.device != hidden.device:
            raise ValueError(
                f"{name} is on {t.device} but hidden is on {hidden.device}; all inputs must share one device"
            )
    dtype = compute_dtype(hidden, lm_head_weight, embed_weight)
    if dtype not in allowed_dtypes:
        raise TypeError(
            f"the op would compute in {dtype} (see the dtype policy in gircse_kernels.dispatch: under autocast "
            f"the autocast dtype, else lm_head_weight's / embed_weight's promoted dtype); expected one of "
            f"{', '.join(str(x) for x in allowed_dtypes)}"
            + ("; gircse_kernels.reference computes in float64" if dtype == torch.float64 else "")
        )

    check_logit_options(temperature, softcap)


def check_positive_finite(name: str, value, *, optional: bool = False) -> None:
    """``value`` must be a real number in (0, inf) (or None where ``optional``); bools are refused."""
    if optional and value is None:
        return
    expected = "None or a positive float" if optional else "a positive float"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    # Comparisons rather than math.isfinite: they also work on the symbolic floats of
    # torch.compile(dynamic=True), and reject NaN and inf alike.
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be {expected.replace('float', 'finite number')}, got {value}")


def check_logit_options(temperature, softcap) -> None:
    """The op's temperature (positive, finite) and optional softcap (None, or positive and finite)."""
    check_positive_finite("temperature", temperature)
    check_positive_finite("softcap", softcap, optional=True)


def compute_dtype(hidden: torch.Tensor, lm_head_weight: torch.Tensor, embed_weight: torch.Tensor) -> torch.dtype:
    """The dtype the op computes in and returns (the mixed-precision policy, one for every backend).

    Under ``torch.autocast`` for the inputs' device type: the autocast dtype (like ``F.linear``).
    Otherwise the weights decide: ``torch.promote_types(lm_head_weight.dtype, embed_weight.dtype)``;
    ``hidden`` (and the bias) are cast to it, so bf16 activations meet fp32 weights without copying
    the weights. Accumulation is fp32 in every case.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(lm_head_weight.dtype, embed_weight.dtype)


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_grad_filter(grad_filter_eps) -> None:
    if isinstance(grad_filter_eps, bool) or not isinstance(grad_filter_eps, numbers.Real):
        raise TypeError(f"grad_filter_eps must be a float in [0, 1), got {type(grad_filter_eps).__name__}")
    if not (0.0 <= grad_filter_eps < 1.0):
        raise ValueError(f"grad_filter_eps must be in [0, 1), got {grad_filter_eps}")

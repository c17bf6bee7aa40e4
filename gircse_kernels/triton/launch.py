"""Host-side pieces every phase's launch plans share (no Triton import: plans are built on meta tensors too).

``Launch`` is one kernel launch as data -- kernel, grid, runtime arguments, constexprs, warps, stages --
so the launchers run exactly what the AOT gate compiles and the roofline model costs. ``tile_flags`` and
``weights_args`` are the constexprs and the shape / stride arguments the fused kernels have in common.
``interpreting`` says whether the Triton interpreter runs the kernels (CPU tensors; the launchers then
upcast 16-bit dot operands, which the interpreter miscomputes).
"""
from __future__ import annotations

import dataclasses
import os

import torch

from .config import KernelConfig


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclasses.dataclass
class Launch:
    """One kernel launch: runtime arguments in the kernel's parameter order, constexprs, options."""
    name: str
    kernel: object
    grid: tuple
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def tile_flags(kc: KernelConfig, dtype, tied, has_bias, has_softcap, upcast) -> dict:
    return dict(
        BLOCK_M=kc.block_m, BLOCK_V=kc.block_v, BLOCK_D=kc.block_d, BLOCK_DE=kc.block_de,
        SINGLE_D=kc.single_d, ACC_IN_REGS=kc.acc_in_registers,
        # Tile reuse needs the value tile to be the W tile exactly: same matrix, same width.
        TIED=bool(tied) and kc.d == kc.d_embed,
        HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, UPCAST=upcast, IEEE=dtype == torch.float32,
    )


def weights_args(hidden, lm_head_weight, embed_weight):
    return dict(B=hidden.shape[0], V=lm_head_weight.shape[0], D=lm_head_weight.shape[1], DE=embed_weight.shape[1],
                stride_h=hidden.stride(0), stride_wv=lm_head_weight.stride(0), stride_wd=lm_head_weight.stride(1),
                stride_ev=embed_weight.stride(0), stride_ed=embed_weight.stride(1))

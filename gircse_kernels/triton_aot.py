"""Ahead-of-time gate: compile every Triton kernel in every configuration the dispatcher can pick.

No GPU is needed: ``triton.compile`` targets sm_80 / sm_90 directly, and the ``ptxas`` shipped in the
Triton wheel reports registers, spills and shared memory per kernel. This catches what the
interpreter forgives (layout / shape errors, register blow-ups) on any machine.

    python -m gircse_kernels.triton_aot            # sm_80 and sm_90, prints a table, exit 1 on failure

Must run without ``TRITON_INTERPRET`` (the interpreter has no compiler); kernels are compiled with
``UPCAST=False``, the flag the launcher sets on real GPUs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import torch

from .triton_config import MAX_SPLITS, KernelConfig, choose_config

# Shapes that reach every configuration: decode (B=1), mid and large batches; d that fits registers
# (SmolLM-like widths are chunked) and a 7B-class width.
DISPATCH_ROWS = (1, 64, 4096)
DISPATCH_DIMS = ((96, 96), (576, 576), (4096, 4096))
DISPATCH_VOCAB = 49152
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Opt-in shared memory per block (A100: 163 KiB, H100: 227 KiB): a config above it would fail to launch.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
# Two specializations of the optional features: everything off, and everything on.
VARIANTS = {
    "plain": dict(TIED=False, HAS_BIAS=False, HAS_SOFTCAP=False, FILTER=False, MERGE=False),
    "full": dict(TIED=True, HAS_BIAS=True, HAS_SOFTCAP=True, FILTER=True, MERGE=True),
}


def dispatcher_configs(num_sms: int = 132) -> list[tuple[torch.dtype, KernelConfig]]:
    """Every distinct kernel specialization ``choose_config`` returns over the dispatch shapes."""
    seen, out = set(), []
    for dtype in DTYPES:
        for rows in DISPATCH_ROWS:
            for d, de in DISPATCH_DIMS:
                cfg = choose_config(rows, DISPATCH_VOCAB, d, de, dtype, num_sms)
                key = (dtype, cfg.block_m, cfg.block_v, cfg.block_d, cfg.block_de, cfg.single_d,
                       cfg.acc_in_registers, cfg.num_warps, cfg.num_stages)
                if key not in seen:
                    seen.add(key)
                    out.append((dtype, cfg))
    return out


def _kernel_specs(cfg: KernelConfig, dtype: torch.dtype, variant: dict):
    from . import triton_fused as tf

    ptr, f32p = f"*{DTYPES[dtype]}", "*fp32"
    blocks = dict(BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, BLOCK_DE=cfg.block_de,
                  SINGLE_D=cfg.single_d, ACC_IN_REGS=cfg.acc_in_registers, TIED=variant["TIED"],
                  HAS_BIAS=variant["HAS_BIAS"], HAS_SOFTCAP=variant["HAS_SOFTCAP"], UPCAST=False,
                  IEEE=dtype == torch.float32)
    sizes = dict(B="i32", V="i32", D="i32", DE="i32", stride_h="i64", stride_w="i64", stride_e="i64")
    forward = dict(h_ptr=ptr, w_ptr=ptr, e_ptr=ptr, b_ptr=ptr, part_acc_ptr=f32p, part_max_ptr=f32p,
                   part_sum_ptr=f32p, **sizes, tiles_per_split="i32", inv_temperature="fp32", softcap="fp32")
    combine = dict(part_acc_ptr=f32p, part_max_ptr=f32p, part_sum_ptr=f32p, out_ptr=f32p, lse_ptr=f32p,
                   B="i32", DE="i32", S="i32")
    backward_common = dict(h_ptr=ptr, w_ptr=ptr, e_ptr=ptr, b_ptr=ptr, g_ptr=ptr, lse_ptr=f32p, delta_ptr=f32p)
    bsizes = dict(**sizes, stride_g="i64")
    hidden = dict(**backward_common, part_dh_ptr=f32p, **bsizes, tiles_per_split="i32",
                  inv_temperature="fp32", softcap="fp32", filter_eps="fp32")
    weights = dict(**backward_common, dw_ptr=f32p, de_ptr=f32p, db_ptr=f32p, **bsizes,
                   inv_temperature="fp32", softcap="fp32", filter_eps="fp32")
    filt = dict(FILTER=variant["FILTER"])
    need = dict(NEED_W=True, NEED_E=True, NEED_B=variant["HAS_BIAS"], MERGE=variant["MERGE"])
    return [
        ("forward_partials", tf._forward_partials_kernel, forward, blocks),
        ("combine", tf._combine_kernel, combine, dict(BLOCK_S=MAX_SPLITS, BLOCK_DE=tf.COMBINE_BLOCK_DE)),
        ("backward_hidden", tf._backward_hidden_kernel, hidden, {**blocks, **filt}),
        ("backward_weights", tf._backward_weights_kernel, weights,
         {**blocks, **filt, **need, "BLOCK_V": cfg.weights_block_v}),
    ]


@dataclasses.dataclass
class Report:
    kernel: str
    arch: int
    dtype: str
    variant: str
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int


_PTXAS_LINE = re.compile(r"Used (\d+) registers")


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path  # the same ptxas Triton used for this arch (it ships in the wheel)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # Triton's own ptxas flags, so the numbers are those of the cubin Triton builds.
        res = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name=sm_{arch}a" if arch == 90 else f"--gpu-name=sm_{arch}",
                              src, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{res.stderr}")
    regs = int(_PTXAS_LINE.search(res.stderr).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", res.stderr).group(1))
    return regs, spill


def _jobs(archs, configs, variants):
    for dtype, cfg in configs:
        label = (f"M{cfg.block_m} V{cfg.block_v}/{cfg.weights_block_v} D{cfg.block_d}{'' if cfg.single_d else '*'} "
                 f"DE{cfg.block_de}{'' if cfg.acc_in_registers else '*'} w{cfg.num_warps} s{cfg.num_stages}")
        for variant in variants:
            for index, (name, *_rest) in enumerate(_kernel_specs(cfg, dtype, VARIANTS[variant])):
                if name == "combine" and (variant != "plain" or dtype != torch.float32):
                    continue  # dtype- and feature-independent: compile it once per config
                for arch in archs:
                    yield dtype, cfg, variant, index, arch, label


def _compile_one(job) -> Report:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dtype, cfg, variant, index, arch, label = job
    name, fn, signature, constexprs = _kernel_specs(cfg, dtype, VARIANTS[variant])[index]
    compiled = triton.compile(
        ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )
    regs, spill = _ptxas_report(compiled.asm["ptx"], arch)
    if compiled.metadata.shared > SHARED_MEMORY_LIMIT[arch]:
        raise RuntimeError(f"{name} {label} {DTYPES[dtype]} needs {compiled.metadata.shared} B of shared memory; "
                           f"sm_{arch} allows {SHARED_MEMORY_LIMIT[arch]}")
    return Report(name, arch, DTYPES[dtype], variant, label, regs, spill, compiled.metadata.shared)


def compile_all(archs=(80, 90), configs=None, variants=tuple(VARIANTS), jobs=None) -> list[Report]:
    """Compile every (kernel, config, dtype, variant, arch); raises on the first failure."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("triton_aot needs TRITON_INTERPRET unset (the interpreter cannot compile)")
    work = list(_jobs(archs, configs or dispatcher_configs(), variants))
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile_one(job) for job in work]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_one, work))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiler processes (default: all cores)")
    args = parser.parse_args(argv)
    reports = compile_all(tuple(args.arch), jobs=args.jobs)
    print("config: rows M, vocab tile V/weights-kernel tile, D / DE blocks (* = chunked through L2), warps, stages;"
          " spill = bytes of spill stores")
    print(f"{'kernel':<18} {'sm':>3} {'dtype':<5} {'variant':<7} {'config':<36} {'regs':>4} {'spill':>6} {'smem':>7}")
    for r in reports:
        print(f"{r.kernel:<18} {r.arch:>3} {r.dtype:<5} {r.variant:<7} {r.config:<36} {r.registers:>4} "
              f"{r.spill_bytes:>6} {r.shared_bytes:>7}")
    print(f"compiled {len(reports)} kernels OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

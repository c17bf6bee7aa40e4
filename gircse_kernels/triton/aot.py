"""Ahead-of-time gate: compile what the JIT compiles, for every configuration the dispatcher returns.

No GPU is needed: ``triton.compile`` targets sm_80 / sm_90 directly, and the ``ptxas`` shipped in the
Triton wheel reports registers, spills and shared memory per kernel. This catches what the
interpreter forgives (layout / shape errors, register blow-ups, shared memory over the limit).

What is compiled is what runs. Each job builds its launches with the launchers' own plan builders
(``forward.forward_plan`` & co., on meta tensors) and derives the specialization exactly as
Triton's JIT does from the arguments (``jit_specialization``): an integer argument equal to 1 becomes
a constant, one divisible by 16 gets ``tt.divisibility = 16``, and so does a 16-byte-aligned
pointer. Without those attributes the compiler emits scalar loads and no ``cp.async`` pipeline (a
different kernel); the gate compiles both the aligned specialization and an unaligned one
(pointers and integers without the attribute: a tensor sliced at an odd offset or an odd width).

Checks on every compiled kernel (a failure raises):
  * shared memory within the architecture's opt-in limit;
  * 16-bit kernels keep 16-bit ``tt.dot`` operands (the interpreter-only ``UPCAST`` is off);
  * read-modify-write discipline (``audit_barriers``): for every argument the kernel both loads
    and stores, each store reaches no later load of that argument -- after its innermost loop, or in a
    later iteration of any enclosing loop -- without a CTA barrier in between (checked on the TTGIR,
    i.e. after software pipelining; an innermost chunk loop touches a different chunk per iteration).

    python -m gircse_kernels.triton.aot                         # complete-by-kind subset, sm_80 + sm_90
    python -m gircse_kernels.triton.aot --all --markdown bench/results/triton_aot.md

Must run without ``TRITON_INTERPRET`` (the interpreter has no compiler).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from .config import OpConfig, choose_config, dtype_name

# Opt-in shared memory per block (A100: 163 KiB, H100/H200: 227 KiB): a config above it cannot launch.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
ARCHS = (80, 90)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The real models' LM heads (V, d, d_e, tied): every chunked configuration is reached by them.
REAL_SHAPES = {
    "SmolLM2-135M": (49152, 576, 576, True),
    "Qwen2.5-0.5B": (151936, 896, 896, True),
    "Mistral-7B": (32000, 4096, 4096, False),
    "Qwen2-7B": (152064, 3584, 3584, False),
}
REAL_WIDTHS = (576, 896, 3584, 4096)
# Batch sizes of every regime: decode (B = 1 is specialized to a constant by the JIT), 16 rows, odd
# and aligned mid batches, large batches (no fused backward).
ALL_ROWS = (1, 16, 17, 64, 4096)
# Feature widths reaching the block classes: 16 and 64 (d <= 64), 128 in registers, and chunked; every
# pairing, d != d_e included. (32 compiles like its neighbours; the AOT test covers it by kind.)
SMALL_DIMS = (16, 64, 96)
ALL_DIMS = tuple((d, de) for d in SMALL_DIMS + (576,) for de in SMALL_DIMS + (576,))
VARIANTS = ("plain", "full")  # optional features all off / all on (bias, softcap, tied, filter, every grad)
KERNELS = ("forward_partials", "combine", "backward_hidden", "backward_tiles", "sum_splits", "chunk_softmax",
           "chunk_grad")
# Kernels whose compiled form does not depend on the tile configuration (only on dtype and features).
SHAPELESS = ("combine", "sum_splits", "chunk_softmax", "chunk_grad")


# ----------------------------------------------------------------------------------------------
# Launches and the JIT's specialization
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Job:
    """One compile: a launch of the plan for (shape, variant), specialized as the JIT would."""
    kernel: str
    dtype: torch.dtype
    rows: int
    vocab: int
    d: int
    d_embed: int
    batch_invariant: bool
    variant: str
    aligned: bool
    arch: int


def plan_launches(cfg: OpConfig, variant: str):
    """The launches the backend makes for ``cfg`` (meta tensors: nothing is allocated)."""
    from .backward_dh import backward_hidden_plan
    from .backward_tiles import backward_tiles_plan
    from .forward import forward_plan
    from .gemm_path import chunk_grad_launch, chunk_softmax_launch

    full = variant == "full"
    meta = dict(dtype=cfg.dtype, device="meta")
    hidden = torch.empty(cfg.row_group, cfg.d, **meta)
    tied = full and cfg.d == cfg.d_embed
    weight = torch.empty(cfg.vocab, cfg.d, **meta)
    embed = weight if tied else torch.empty(cfg.vocab, cfg.d_embed, **meta)
    bias = torch.empty(cfg.vocab, **meta) if full else None
    grad_out = torch.empty(cfg.row_group, cfg.d_embed, **meta)
    lse = torch.empty(cfg.row_group, dtype=torch.float32, device="meta")
    out32 = torch.empty(cfg.row_group, cfg.d_embed, dtype=torch.float32, device="meta")
    common = dict(temperature=0.7, softcap=30.0 if full else None, tied=tied, upcast=False)
    grads = dict(grad_filter_eps=1e-4 if full else 0.0)
    launches = forward_plan(cfg, hidden, weight, embed, bias, out32, lse, **common)
    launches += backward_hidden_plan(cfg, grad_out, hidden, weight, embed, bias, lse, lse, torch.empty_like(hidden),
                                     **common, **grads)
    launches += backward_tiles_plan(
        cfg, grad_out, hidden, weight, embed, bias, lse, lse, need_hidden=cfg.fold_backward, need_weight=True,
        need_embed=True, need_bias=full, merge_tied_grads=tied, **common, **grads)[0]
    # The GEMM path's elementwise kernels (a [rows, chunk] slice of its buffers; dtype- and feature-specific).
    chunk = max(cfg.gemm_chunk, 128)
    z = torch.empty(cfg.row_group, chunk, dtype=torch.float32, device="meta")
    p = torch.empty(cfg.row_group, chunk, **meta)
    db_part = torch.empty(2, chunk, dtype=torch.float32, device="meta") if full else None
    scalars = dict(temperature=common["temperature"], softcap=common["softcap"])
    launches.append(chunk_softmax_launch(z, bias, p, lse, lse, lse, 0, **scalars))
    launches.append(chunk_grad_launch(z, z, bias, lse, lse, p, p, db_part, 0, **scalars))
    return {launch.name: launch for launch in launches}


def jit_specialization(launch, aligned: bool = True):
    """(signature, constexprs, attrs) for ``triton.compile``, exactly as Triton's JIT derives them from the
    launch's arguments: its own binder and ``_pack_args`` (so the compiled kernel -- and Triton's cache
    key -- is the JIT's; meta tensors specialize as 16-byte aligned, like the caching allocator's). Not
    ``aligned``: the divisibility attributes are dropped (a tensor at an odd offset, odd widths). Falls
    back to ``rule_specialization`` where the JIT's internals differ."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        kernel = launch.kernel
        backend = make_backend(GPUTarget("cuda", 90, 32))
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        options = dict(num_warps=launch.num_warps, num_stages=launch.num_stages)
        bound, spec, opts = binder(**launch.args, **launch.constexprs, **options)
        _, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, spec, opts)
    except (ImportError, AttributeError, TypeError, ValueError):
        signature, constexprs, attrs = rule_specialization(launch)
    if not aligned:
        attrs = {k: [a for a in v if a[0] != "tt.divisibility"] for k, v in attrs.items()}
    return signature, constexprs, attrs


def rule_specialization(launch):
    """The JIT's specialization rule, written out: tensors ``*<dtype>`` with ``tt.divisibility=16`` (the
    caching allocator aligns them), integers equal to 1 become constexprs, others i32 / i64 with
    divisibility 16 when divisible by 16, floats fp32; attrs listed for every other parameter."""
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(launch.kernel.arg_names):
        if name in launch.constexprs:
            signature[name], constexprs[name] = "constexpr", launch.constexprs[name]
            attrs[(index,)] = []
            continue
        value = launch.args[name]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + dtype_name(value.dtype)
            divisible = True
        elif isinstance(value, bool):
            signature[name] = "u1"
            continue
        elif isinstance(value, int):
            if value == 1:
                signature[name], constexprs[name] = "constexpr", 1
                attrs[(index,)] = []
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            divisible = value % 16 == 0
        elif isinstance(value, float):
            signature[name] = "fp32"
            continue
        else:
            raise TypeError(f"{launch.name}: cannot specialize argument {name}={value!r}")
        attrs[(index,)] = [["tt.divisibility", 16]] if divisible else []
    return signature, constexprs, attrs


# ----------------------------------------------------------------------------------------------
# Checks on the compiled artifacts
# ----------------------------------------------------------------------------------------------
_DOT = re.compile(r"tt\.dot .*: tensor<[^>]*x(\w+)(?:, #[^>]*)?> \* tensor<[^>]*x(\w+)(?:, #[^>]*)?>")


def dot_operand_types(ttir: str) -> list[tuple[str, str]]:
    """Element types of the two operands of every ``tt.dot`` in the TTIR."""
    return _DOT.findall(ttir)


_ASSIGN = re.compile(r"^\s*(%[\w#]+)(?::\d+)? = ([\w.]+)(.*)$")
_FOR = re.compile(r"scf\.for .*iter_args\((.*?)\) ->")
_VALUE = re.compile(r"%[\w]+")
_ARG = re.compile(r"%(\w+): !tt\.ptr")
_BARRIER = ("gpu.barrier", "ttg.barrier")
_GLOBAL_LOADS = ("tt.load", "ttg.async_copy_global_to_local")
_POINTER_OPS = ("tt.splat", "tt.addptr", "tt.broadcast", "tt.expand_dims", "tt.reshape", "ttg.convert_layout",
                "arith.select", "tt.trans")


def audit_barriers(ttgir: str) -> list[str]:
    """Stores that can reach a later load of the same argument with no barrier in between.

    Pointer provenance is followed through splat / addptr / broadcast / layout conversions and loop
    iter_args. For a store inside loops L0 (innermost) ... Lk: the rest of L0's body, then for each
    enclosing loop its remaining body, its wrap-around to the start of its body (the next iteration)
    and the code after it must each meet a barrier before any load of that argument. L0 itself is
    exempt -- its later iterations and the next-chunk loads the software pipeliner moves after the
    store: our innermost loops walk disjoint chunks (``_rmw_product``, ``_fill_rows``) or disjoint
    row blocks. Returns human-readable violations (empty: clean).
    """
    lines = ttgir.splitlines()
    origin: dict[str, set] = {}
    for name in _ARG.findall(next(line for line in lines if "tt.func" in line)):
        origin["%" + name] = {name}
    loops, stack, events = [], [], []  # loops: (start, end); events: (line, kind, arg)
    for i, line in enumerate(lines):
        text = line.strip()
        if "scf.for" in text:
            for pair in (_FOR.search(text).group(1).split(", ") if _FOR.search(text) else []):
                lhs, _, rhs = pair.partition(" = ")
                if rhs.strip() in origin:
                    origin[lhs.strip()] = origin[rhs.strip()]
            stack.append(i)
        elif text.startswith("}") and stack and _closes_loop(lines, stack[-1], i):
            loops.append((stack.pop(), i))
        match = _ASSIGN.match(line)
        op = match.group(2) if match else text.split(" ", 1)[0]
        operands = _VALUE.findall(match.group(3) if match else text)
        if match and op in _POINTER_OPS:
            found = set().union(*(origin.get(v, set()) for v in operands))
            if found:
                origin[match.group(1)] = found
        if op in _GLOBAL_LOADS and operands:
            for arg in origin.get(operands[0], ()):
                events.append((i, "load", arg))
        elif op == "tt.store" and operands:
            for arg in origin.get(operands[0], ()):
                events.append((i, "store", arg))
        elif op in _BARRIER or text.startswith(_BARRIER):
            events.append((i, "barrier", None))

    def first(arg, lo, hi):
        for line, kind, a in events:
            if lo <= line < hi and (kind == "barrier" or (kind == "load" and a == arg)):
                return kind
        return None

    end = len(lines)
    violations = []
    for line, kind, arg in events:
        if kind != "store":
            continue
        enclosing = sorted((lp for lp in loops if lp[0] < line < lp[1]), key=lambda lp: lp[0], reverse=True)
        segments = []  # (lo, hi) ranges every continuation of the store passes through, in order
        if enclosing:
            inner = enclosing[0]
            segments.append(("inner", line + 1, inner[1]))
            prev_end = inner[1]
            for loop in enclosing[1:]:
                segments.append(("after", prev_end + 1, loop[1]))
                segments.append(("wrap", loop[0] + 1, loop[1]))
                prev_end = loop[1]
            segments.append(("after", prev_end + 1, end))
        else:
            segments.append(("after", line + 1, end))
        for label, lo, hi in segments:
            if label == "inner":  # the rest of the store's own chunk walk: only a barrier matters here
                if any(kind == "barrier" and lo <= at < hi for at, kind, _ in events):
                    break
                continue
            hit = first(arg, lo, hi)
            if hit == "barrier" and label == "after":
                break  # every continuation passes this barrier
            if hit == "load":
                violations.append(f"store to {arg} (ttgir line {line + 1}) reaches a load at lines {lo + 1}-{hi} "
                                  f"({label}) without a barrier")
                break
    return violations


def _closes_loop(lines, start, i) -> bool:
    """Whether the ``}`` on line i closes the region opened on line ``start`` (brace depth)."""
    depth = 0
    for line in lines[start:i + 1]:
        depth += line.count("{") - line.count("}")
    return depth == 0


# ----------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
    kernel: str
    arch: int
    dtype: str
    variant: str
    aligned: bool
    config: str
    shape: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    cp_async: int      # cp.async instructions in the PTX (software-pipelined global loads)
    barriers: int      # CTA barriers in the TTGIR from tl.debug_barrier
    chunked: bool
    seconds: float


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path if hasattr(get_ptxas(arch), "path") else get_ptxas(arch)[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        res = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{res.stderr}")
    regs = int(re.search(r"Used (\d+) registers", res.stderr).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", res.stderr).group(1))
    return regs, spill


def config_label(launch) -> str:
    c = launch.constexprs
    if "BLOCK_M" not in c:  # the shape-independent kernels: their block constants
        blocks = " ".join(f"{k[6:]}{v}" for k, v in c.items() if k.startswith("BLOCK_"))
        return f"{blocks} w{launch.num_warps}"
    return (f"M{c['BLOCK_M']} V{c['BLOCK_V']} D{c['BLOCK_D']}{'' if c['SINGLE_D'] else '*'} "
            f"DE{c['BLOCK_DE']}{'' if c['ACC_IN_REGS'] else '*'} w{launch.num_warps} s{launch.num_stages}")


def job_launch(job: Job):
    cfg = choose_config(job.rows, job.vocab, job.d, job.d_embed, job.dtype, 132, batch_invariant=job.batch_invariant)
    return plan_launches(cfg, job.variant)[job.kernel]


def compile_job(job: Job) -> Report:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.time()
    launch = job_launch(job)
    signature, constexprs, attrs = jit_specialization(launch, job.aligned)
    compiled = triton.compile(ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", job.arch, 32),
                              options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
    label = f"{launch.name} {config_label(launch)} {dtype_name(job.dtype)} {job.variant} sm_{job.arch}"
    if compiled.metadata.shared > SHARED_MEMORY_LIMIT[job.arch]:
        raise RuntimeError(f"{label} needs {compiled.metadata.shared} B of shared memory; "
                           f"sm_{job.arch} allows {SHARED_MEMORY_LIMIT[job.arch]}")
    if job.dtype != torch.float32:
        wide = [ops for ops in dot_operand_types(compiled.asm["ttir"]) if "f32" in ops]
        if wide:
            raise RuntimeError(f"{label}: 16-bit kernel has fp32 dot operands {wide} (interpreter upcast on?)")
    violations = audit_barriers(compiled.asm["ttgir"])
    if violations:
        raise RuntimeError(f"{label}: read-modify-write without a barrier:\n" + "\n".join(violations))
    regs, spill = _ptxas_report(compiled.asm["ptx"], job.arch)
    ttgir = compiled.asm["ttgir"]
    return Report(
        kernel=launch.name, arch=job.arch, dtype=dtype_name(job.dtype), variant=job.variant, aligned=job.aligned,
        config=config_label(launch), shape=f"B{job.rows} V{job.vocab} d{job.d} de{job.d_embed}"
        + (" inv" if job.batch_invariant else ""), registers=regs, spill_bytes=spill,
        shared_bytes=compiled.metadata.shared, cp_async=compiled.asm["ptx"].count("cp.async.cg")
        + compiled.asm["ptx"].count("cp.async.ca"),
        barriers=sum(ttgir.count(b) for b in _BARRIER), chunked="*" in config_label(launch),
        seconds=time.time() - start)


# ----------------------------------------------------------------------------------------------
# Enumeration
# ----------------------------------------------------------------------------------------------
def _identity(job: Job):
    """Two jobs are the same configuration when their launches agree in every constexpr (tile shapes,
    modes, feature flags), pointer dtypes, warps, stages, alignment and arch. (The JIT also specializes
    runtime integers -- B = 1, multiples of 16 --; the first shape reaching a configuration stands
    for the others, in its aligned and its unaligned form.)"""
    launch = job_launch(job)
    pointers = tuple((k, v.dtype) for k, v in launch.args.items() if isinstance(v, torch.Tensor))
    return (launch.name, pointers, tuple(sorted(launch.constexprs.items())), launch.num_warps,
            launch.num_stages, job.aligned, job.arch)


def dedupe(jobs) -> list[Job]:
    seen, out = set(), []
    for job in jobs:
        key = _identity(job)
        if key not in seen:
            seen.add(key)
            out.append(job)
    return out


def all_jobs(archs=ARCHS) -> list[Job]:
    """Every distinct kernel configuration the dispatcher can launch: all dtypes, batch regimes (decode,
    general, the GEMM path's elementwise kernels), block classes of d and d_e (d != d_e included),
    batch-invariant mode, the real models' shapes; both feature variants aligned on every arch, the
    unaligned specialization of the plain variant on sm_90."""
    shapes = [(rows, 49152, d, de, inv) for rows in ALL_ROWS for d, de in ALL_DIMS for inv in (False, True)]
    shapes += [(rows, v, d, de, inv) for v, d, de, _tied in REAL_SHAPES.values() for rows in ALL_ROWS
               for inv in (False, True)]
    jobs = [Job(kernel, dtype, rows, vocab, d, de, inv, variant, aligned, arch)
            for dtype in DTYPES for rows, vocab, d, de, inv in shapes for kernel in KERNELS
            for variant, aligned in (("plain", True), ("full", True), ("plain", False)) for arch in archs
            if aligned or arch == 90]
    return dedupe(jobs)


def kind_jobs(archs=ARCHS) -> list[Job]:
    """A subset complete by kind, small enough for the test suite: every kernel in every block class
    (d / d_e in registers, chunked, mixed both ways), decode / larger batches / batch-invariant, each
    dtype, both feature variants and the unaligned specialization where they change the kernel most,
    sm_80 for the 16-bit chunked kernels (the real widths) -- each kind once, not every combination."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    picks = [  # (dtype, rows, d, d_e, batch_invariant, variant, aligned, archs)
        (bf16, 1, 64, 64, False, "plain", True, (90,)),        # registers, decode
        (bf16, 1, 64, 64, False, "full", True, (90,)),
        (bf16, 64, 96, 32, False, "plain", True, (90,)),       # registers, large batch, d != d_e
        (bf16, 1, 576, 576, False, "plain", True, (80, 90)),   # chunked, decode (real widths)
        (bf16, 1, 576, 576, False, "full", True, (80, 90)),
        (bf16, 1, 576, 576, False, "plain", False, (90,)),     # unaligned specialization
        (bf16, 17, 576, 576, False, "plain", True, (80, 90)),  # chunked, 17..63 rows (narrow widths)
        (bf16, 2, 96, 576, False, "plain", True, (90,)),       # mixed: d in registers, d_e chunked
        (bf16, 16, 576, 48, True, "full", True, (90,)),        # mixed the other way, batch-invariant
        (fp16, 1, 576, 576, False, "full", True, (90,)),
        (fp32, 1, 576, 576, False, "plain", True, (90,)),
        (fp32, 17, 96, 96, False, "full", True, (90,)),
    ]
    jobs = []
    for dtype, rows, d, de, inv, variant, aligned, arches in picks:
        for kernel in KERNELS:
            for arch in arches:
                if arch in archs:
                    jobs.append(Job(kernel, dtype, rows, 49152, d, de, inv, variant, aligned, arch))
    return dedupe(jobs)


def compile_all(jobs, workers=None) -> list[Report]:
    """Compile every job (in parallel); raises on the first failure."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("gircse_kernels.triton.aot needs TRITON_INTERPRET unset (the interpreter cannot compile)")
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [compile_job(job) for job in jobs]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(compile_job, jobs, chunksize=1))


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
def real_width(report) -> bool:
    """Both d and d_e walked in chunks: the configurations every d in REAL_WIDTHS gets."""
    return report.config.count("*") == 2


def real_width_spills(reports, aligned=True) -> list[Report]:
    """16-bit real-width kernels that spill (the goal: none, for the aligned tensors real models have)."""
    return [r for r in reports if r.dtype != "fp32" and real_width(r) and r.aligned == aligned and r.spill_bytes > 0]


def _spill_line(label, reports):
    spilling = [r.spill_bytes for r in reports if r.spill_bytes]
    return (f"- {label}: {len(reports)} kernels, {len(spilling)} spill"
            + (f" (at most {max(spilling)} B)" if spilling else ""))


def markdown(reports, title: str) -> str:
    import triton

    head = (f"# {title}\n\nGenerated by `python -m gircse_kernels.triton.aot{' --all' if 'all' in title else ''}` "
            f"with triton {triton.__version__} (no GPU: `triton.compile` for the target, then the bundled "
            "`ptxas -v`).\n\n"
            "Config: rows per program M, vocabulary tile V, d block D and d_e block DE (`*` = walked in "
            "64-wide chunks with the fp32 accumulator in a program-private L2 slice), warps w, pipeline stages "
            "s. Variant: `plain` = no bias / softcap / filter, untied; `full` = all of them, tied when d = d_e. "
            "Aligned: the JIT's `tt.divisibility=16` specialization of 16-byte-aligned pointers and "
            "multiple-of-16 integers; unaligned: none (odd offsets / widths). cp.async: pipelined global-load "
            "instructions in the PTX. barriers: `tl.debug_barrier` CTA barriers after read-modify-write passes.\n\n")
    half = [r for r in reports if r.dtype != "fp32"]
    summary = [
        f"- kernels compiled: {len(reports)} (sm_{', sm_'.join(str(a) for a in sorted({r.arch for r in reports}))}); "
        f"largest register count {max(r.registers for r in reports)}, largest shared memory "
        f"{max(r.shared_bytes for r in reports)} B",
        _spill_line(f"16-bit, real widths (d and d_e chunked: every d in {REAL_WIDTHS}), aligned",
                    [r for r in half if real_width(r) and r.aligned]),
        _spill_line("16-bit, real widths, unaligned specialization (no cp.async: scalar loads)",
                    [r for r in half if real_width(r) and not r.aligned]),
        _spill_line("16-bit, d or d_e <= 128 (registers or mixed), aligned", [r for r in half if not real_width(r)
                                                                              and r.aligned]),
        _spill_line("16-bit, d or d_e <= 128, unaligned", [r for r in half if not real_width(r) and not r.aligned]),
        _spill_line("fp32 (tf32x3 dots: each operand held as two tf32 halves)",
                    [r for r in reports if r.dtype == "fp32"]),
    ]
    summary += [
        "",
        "Spills explained: fp32 kernels run three-pass TF32 dots (fp32-accurate), which keep a high and a low "
        "TF32 half of both operands in registers; register-resident d / d_e tiles then exceed 255 registers. The "
        "worst (12-13 KB) are fp32 register kernels with d_e = 16, where ptxas keeps 32 registers and moves a "
        "dot-operand layout conversion to local memory. fp32 is the accuracy path (tests, fp32 training), not a "
        "bandwidth target. The unaligned 16-bit specializations load scalars without cp.async (extra address "
        "registers); real models' tensors are aligned. The other 16-bit spills are mixed widths (one of d, d_e "
        "<= 128 in registers, the other chunked), mostly the vocabulary-tile backward on sm_80.",
    ]
    rows = ["| kernel | dtype | config | variant | aligned | arch | regs | spill B | smem B | cp.async | barriers | "
            "first shape |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(reports, key=lambda r: (r.kernel, r.dtype, r.config, r.variant, not r.aligned, r.arch)):
        rows.append(f"| {r.kernel} | {r.dtype} | {r.config} | {r.variant} | {'yes' if r.aligned else 'no'} | "
                    f"sm_{r.arch} | {r.registers} | {r.spill_bytes} | {r.shared_bytes} | {r.cp_async} | "
                    f"{r.barriers} | {r.shape} |")
    return head + "\n".join(summary) + "\n\n" + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--all", action="store_true", help="every distinct kernel (slow) instead of one per kind")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiler processes (default: all cores)")
    parser.add_argument("--markdown", help="write the table to this markdown file")
    parser.add_argument("--json", help="write the reports (one object per compiled kernel) to this JSON file")
    parser.add_argument("--from-json", help="only render --markdown from reports a previous run wrote with --json")
    args = parser.parse_args(argv)
    if args.from_json:
        import json

        with open(args.from_json) as f:
            reports = [Report(**r) for r in json.load(f)]
        with open(args.markdown, "w") as f:
            f.write(markdown(reports, "Triton AOT table (--all)" if len(reports) > 200 else
                             "Triton AOT table (one configuration per kind)"))
        return 0
    jobs = (all_jobs if args.all else kind_jobs)(tuple(args.arch))
    start = time.time()
    reports = compile_all(jobs, args.jobs)
    print(f"{'kernel':<17} {'sm':>3} {'dtype':<5} {'variant':<6} {'al':<2} {'config':<34} {'regs':>4} {'spill':>6} "
          f"{'smem':>7} {'cp.a':>5} {'bar':>3}")
    for r in reports:
        print(f"{r.kernel:<17} {r.arch:>3} {r.dtype:<5} {r.variant:<6} {'y' if r.aligned else 'n':<2} {r.config:<34} "
              f"{r.registers:>4} {r.spill_bytes:>6} {r.shared_bytes:>7} {r.cp_async:>5} {r.barriers:>3}")
    print(f"compiled {len(reports)} kernels OK in {time.time() - start:.0f} s")
    if args.markdown:
        title = "Triton AOT table (--all)" if args.all else "Triton AOT table (one configuration per kind)"
        with open(args.markdown, "w") as f:
            f.write(markdown(reports, title))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

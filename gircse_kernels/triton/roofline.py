"""Roofline model of the Triton backend: bytes and FLOPs of every launched kernel, and the time they imply.

The model reads the launches the backend would make -- ``host.forward_launches`` /
``backward_launches`` on meta tensors, so the same ``OpConfig`` objects, grids and constexprs as a
real call -- and counts, per kernel, from what each program loads and stores (see the kernels'
docstrings):

* ``l2_bytes``: traffic between the SMs and L2 (every load and store the programs issue: W / E tiles
  re-read by other row blocks or by a second pass, hidden / dO chunks, fp32 read-modify-write slices);
* ``hbm_bytes``: what reaches HBM. Row blocks of one split run side by side (adjacent program ids),
  so a W / E tile is fetched from HBM once per call and served to the others from L2; a tile re-read
  by the same program (tied values, the dh pass) or an fp32 slice it keeps updating stays in L2 while
  the resident programs' working sets fit in ``L2_FRACTION`` of the cache, else it costs HBM traffic;
* ``flops``: tensor-core FLOPs as executed (row blocks padded to ``block_m``, feature chunks to their
  block), next to the useful 2 * B * V * (...) FLOPs.

Kernel time = max(HBM bytes / HBM bandwidth, L2 bytes / L2 bandwidth, FLOPs / MMA rate) + a launch
overhead. The ideal it is compared with: one pass over W and E (once in total when tied), reading the
small inputs and writing the outputs once, at the HBM bandwidth -- or, when compute bound, the useful
FLOPs at the peak rate ("GEMM-equivalents": 2 for the forward, 3 for the dh-only backward, 5 for the
full backward).

Assumptions, stated (no GPU has run these kernels): HBM bandwidth and the bf16 rate are assumed H200
figures (4.3 TB/s copy, 790 TFLOP/s GEMM, not measured by this project; H100: 90% of the 3.35 TB/s spec,
the same rate); the L2 bandwidth is *assumed* to be 2.5x HBM and the M = 16 MMA path (mma.sync, no
wgmma) to reach half the peak. ``python -m bench.gpu_check`` measures HBM and L2 bandwidth and the kernels on
the day a GPU is available; the model is to be recalibrated from that.

    python -m gircse_kernels.triton.roofline --markdown bench/results/gpu_roofline.md
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from .config import dtype_name


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    num_sms: int
    hbm_bytes_per_s: float
    l2_bytes_per_s: float
    l2_bytes: int
    flops_16bit: float     # dense bf16 / fp16 tensor-core rate (wgmma tiles)
    flops_fp32: float      # three-pass TF32 (fp32-accurate) rate
    small_mma_fraction: float = 0.5  # mma.sync with 16-row tiles, relative to the peak
    launch_overhead_s: float = 3e-6
    gemm_efficiency: float = 0.85    # cuBLAS: share of the peak rate and of the HBM bandwidth it reaches


H200 = Hardware("H200", 132, 4.3e12, 2.5 * 4.3e12, 60 << 20, 790e12, 790e12 / 2 / 3)
H100 = Hardware("H100 SXM", 132, 0.9 * 3.35e12, 2.5 * 0.9 * 3.35e12, 50 << 20, 790e12, 790e12 / 2 / 3)
HARDWARE = {"H200": H200, "H100": H100}
# Share of L2 the resident programs' re-read tiles and fp32 slices may use and still hit.
L2_FRACTION = 0.5
# Programs resident per SM assumed for L2 working sets (the kernels use 1-2; 2 is the pessimistic case).
RESIDENT_PER_SM = 2

# The shapes of the issue: real LM heads (V, d, d_e, tied).
MODELS = {
    "SmolLM2-135M": (49152, 576, 576, True),
    "Qwen2.5-0.5B": (151936, 896, 896, True),
    "Mistral-7B": (32000, 4096, 4096, False),
    "Qwen2-7B": (152064, 3584, 3584, False),
}
BATCHES = (1, 8, 32, 128, 512, 4096)
PASSES = ("forward", "dh-backward", "full-backward")


@dataclasses.dataclass
class KernelCost:
    name: str
    grid: tuple
    hbm_bytes: float
    l2_bytes: float
    flops: float
    seconds: float = 0.0
    bound: str = ""
    launches: int = 1


@dataclasses.dataclass
class Prediction:
    pass_name: str
    rows: int
    vocab: int
    d: int
    d_embed: int
    dtype: str
    tied: bool
    hardware: str
    kernels: list
    useful_flops: float
    ideal_bytes: float
    ideal_seconds: float

    @property
    def hbm_bytes(self) -> float:
        return sum(k.hbm_bytes for k in self.kernels)

    @property
    def l2_bytes(self) -> float:
        return sum(k.l2_bytes for k in self.kernels)

    @property
    def flops(self) -> float:
        return sum(k.flops for k in self.kernels)

    @property
    def seconds(self) -> float:
        return sum(k.seconds for k in self.kernels)

    @property
    def traffic_ratio(self) -> float:
        """HBM bytes moved / the one-pass ideal."""
        return self.hbm_bytes / self.ideal_bytes

    @property
    def time_ratio(self) -> float:
        return self.seconds / self.ideal_seconds


def _cdiv(a, b):
    return -(-a // b)


def _pad(n, block):
    return _cdiv(n, block) * block


def _size(t) -> int:
    return t.element_size()


def _fits_l2(hw: Hardware, programs: int, bytes_per_program: float) -> bool:
    return min(programs, RESIDENT_PER_SM * hw.num_sms) * bytes_per_program <= L2_FRACTION * hw.l2_bytes


def _mma_rate(hw: Hardware, dtype_size: int, block_m: int) -> float:
    peak = hw.flops_fp32 if dtype_size == 4 else hw.flops_16bit
    return peak * (hw.small_mma_fraction if block_m < 64 else 1.0)


def cost_launch(launch, hw: Hardware) -> KernelCost:
    """Bytes and FLOPs of one launch, from its grid, arguments and constexprs."""
    a, c = launch.args, launch.constexprs
    name = launch.name
    if name == "combine":
        rows, de, splits = a["B"], a["DE"], a["S"]
        n_de = launch.grid[1]
        reads = splits * rows * de * 4 + 3 * splits * rows * n_de * 4
        writes = rows * de * 4 + rows * 4
        return _finish(KernelCost(name, launch.grid, reads + writes, reads + writes, 0.0), hw, 0.0)
    if name == "sum_splits":
        splits, rows, n = a["S"], a["R"], a["N"]
        out = splits * rows * n * 4 + rows * n * _size(a["out_ptr"])
        return _finish(KernelCost(name, launch.grid, out, out, 0.0), hw, 0.0)

    s = _size(a["h_ptr"])
    rows, vocab, d, de = a["B"], a["V"], a["D"], a["DE"]
    m, bv = c["BLOCK_M"], c["BLOCK_V"]
    d_pad = c["BLOCK_D"] if c["SINGLE_D"] else _pad(d, c["BLOCK_D"])
    de_pad = c["BLOCK_DE"] if c["ACC_IN_REGS"] else _pad(de, c["BLOCK_DE"])
    reuse_w_as_e = c["TIED"] and c["SINGLE_D"]
    tied = c["TIED"]
    bias_bytes = vocab * s if c["HAS_BIAS"] else 0
    tiles = _cdiv(vocab, bv)
    w_bytes, e_bytes = vocab * d * s, vocab * de * s
    rate = _mma_rate(hw, s, m)

    if name in ("forward_partials", "backward_hidden"):
        row_blocks, splits = launch.grid
        programs = row_blocks * splits
        backward = name == "backward_hidden"
        l2 = row_blocks * (w_bytes + (0 if reuse_w_as_e else e_bytes) + bias_bytes)
        h_reads = (splits if c["SINGLE_D"] else tiles) * rows * d * s
        l2 += h_reads
        if backward:
            l2 += (splits if c["ACC_IN_REGS"] else tiles) * rows * de * s  # dO
            l2 += 0 if c["SINGLE_D"] else row_blocks * w_bytes  # W chunks again for dz W
        slice_width = d if backward else de
        in_slice = not (c["SINGLE_D"] if backward else c["ACC_IN_REGS"])
        partial_bytes = splits * rows * slice_width * 4
        rmw = 0.0
        if in_slice:  # program-private fp32 slice: (zero-fill +) read + write per tile, real rows only
            rmw = (tiles - splits) * rows * slice_width * 4 + tiles * rows * slice_width * 4
            rmw += partial_bytes if backward else 0  # the dh slice starts with a zero-fill
        l2 += rmw + (0 if in_slice else partial_bytes) + splits * rows * 8 * (not backward)
        # HBM: each W / E tile once per call (row blocks share it through L2); the tied value chunks and
        # the dh pass re-read a tile just read; the fp32 slices stay in L2 if the resident ones fit.
        # Per-program data that must survive in L2 until it is read again: the fp32 slice of its real
        # rows, and the tile's W rows when they are read a second time (tied values, the dz W pass).
        reread_w = (tied and not reuse_w_as_e) or (backward and not c["SINGLE_D"])
        working_set = (min(m, rows) * slice_width * 4 if in_slice else 0) + (bv * d * s if reread_w else 0)
        hbm = w_bytes + (0 if tied else e_bytes) + bias_bytes + rows * d * s + partial_bytes
        hbm += rows * de * s if backward else 0
        if not _fits_l2(hw, programs, working_set):
            hbm += (w_bytes if reread_w else 0) + rmw
        flops = row_blocks * tiles * 2 * m * bv * ((2 if backward else 1) * d_pad + de_pad)
        return _finish(KernelCost(name, launch.grid, hbm, l2, flops), hw, rate)

    if name == "backward_tiles":
        splits = launch.grid[0]
        row_blocks = _cdiv(rows, m)
        need_h, need_w, need_e, need_b = c["NEED_H"], c["NEED_W"], c["NEED_E"], c["NEED_B"]
        merge = c["MERGE"]
        out_w = _size(a["dw_ptr"]) if need_w else 0
        out_e = _size(a["de_ptr"]) if need_e else 0
        l2 = bias_bytes
        if c["SINGLE_D"]:
            l2 += w_bytes + tiles * rows * d * s
        else:
            l2 += row_blocks * w_bytes * (1 + need_h) + tiles * rows * d * s * (1 + need_w)
        if c["ACC_IN_REGS"]:
            l2 += (0 if reuse_w_as_e else e_bytes) + tiles * rows * de * s
        else:
            l2 += row_blocks * e_bytes + tiles * rows * de * s * (1 + need_e)
        rmw_dh = (splits * rows * d * 4 + 2 * tiles * rows * d * 4) if need_h else 0
        rmw_w = rmw_e = 0.0
        final_w = final_e = 0.0
        single_pass = row_blocks == 1  # chunked gradient rows written once, in the output dtype
        if need_w:
            if c["SINGLE_D"] or single_pass:
                final_w = vocab * d * out_w
            else:
                rmw_w = (2 * row_blocks - 1) * vocab * d * 4
                final_w = vocab * d * 4
        if need_e and not merge:
            if c["ACC_IN_REGS"] or single_pass:
                final_e = vocab * de * out_e
            else:
                rmw_e = (2 * row_blocks - 1) * vocab * de * 4
                final_e = vocab * de * 4
        db = vocab * _size(a["db_ptr"]) if need_b else 0
        l2 += rmw_dh + rmw_w + rmw_e + (0 if rmw_w else final_w) + (0 if rmw_e else final_e) + db
        # Re-read per row block: the tile's W / E rows (chunked), its fp32 dW / dE rows, the dh slice.
        multi = row_blocks > 1
        working_set = ((0 if c["SINGLE_D"] else bv * d * (s * (need_h or multi) + 4 * need_w * multi))
                       + (0 if c["ACC_IN_REGS"] else bv * de * (s + 4 * need_e) * multi) + (rows * d * 4 if need_h else 0))
        hbm = (w_bytes + (0 if tied else e_bytes) + bias_bytes + rows * (d + de) * s + final_w + final_e + db
               + (splits * rows * d * 4 if need_h else 0))
        if not _fits_l2(hw, splits, working_set):
            hbm += (rmw_dh + rmw_w + rmw_e) + (0 if c["SINGLE_D"] else (row_blocks - 1 + need_h) * w_bytes)
        flops = row_blocks * tiles * 2 * m * bv * (d_pad * (1 + need_h + need_w) + de_pad * (1 + need_e))
        return _finish(KernelCost(name, launch.grid, hbm, l2, flops), hw, rate)
    raise ValueError(f"no cost model for kernel {name}")


def _finish(cost: KernelCost, hw: Hardware, rate: float, efficiency: float = 1.0) -> KernelCost:
    times = {"HBM": cost.hbm_bytes / (hw.hbm_bytes_per_s * efficiency), "L2": cost.l2_bytes / hw.l2_bytes_per_s,
             "MMA": cost.flops / (rate * efficiency) if rate else 0.0}
    cost.bound = max(times, key=times.get)
    cost.seconds = times[cost.bound] + hw.launch_overhead_s * cost.launches
    return cost


def gemm_path_costs(cfg, pass_name: str, dtype_size: int, tied: bool, bias: bool, hw: Hardware) -> list[KernelCost]:
    """The vocabulary-chunked GEMM path (``gemm_path.gemm_forward`` / ``gemm_backward``), per step summed
    over the ``cfg.gemm_chunk``-row chunks: cuBLAS GEMMs at ``gemm_efficiency`` of the peak rate and HBM
    bandwidth, the Triton elementwise kernels, the torch axpy steps. A [rows, chunk] buffer written by
    one step and read by the next stays in L2 when it fits ``L2_FRACTION`` of it."""
    rows, vocab, d, de, s = cfg.rows, cfg.vocab, cfg.d, cfg.d_embed, dtype_size
    n = cfg.gemm_chunk_forward if pass_name == "forward" else cfg.gemm_chunk
    chunks = _cdiv(vocab, n)
    rate = hw.flops_fp32 if s == 4 else hw.flops_16bit
    w_bytes, e_bytes = vocab * d * s, vocab * de * s

    def buffer(nbytes_per_chunk):  # HBM bytes of a producer -> consumer handoff of a [rows, chunk] buffer
        return 0.0 if nbytes_per_chunk <= L2_FRACTION * hw.l2_bytes else 2.0 * nbytes_per_chunk * chunks

    def gemm(name, hbm, l2, flops):
        return _finish(KernelCost(name, (chunks,), hbm, l2, flops, launches=chunks), hw, rate, hw.gemm_efficiency)

    def pointwise(name, hbm, l2, launches=chunks):
        return _finish(KernelCost(name, (chunks,), hbm, l2, 0.0, launches=launches), hw, rate)

    z_bytes, p_bytes = rows * n * 4, rows * n * s
    # A chunk's W rows read again by a later GEMM of the same chunk (tied values, dz W_c) come from L2
    # when the chunk's W and E rows fit it.
    reread_w = 0.0 if n * (d + (0 if tied else de)) * s <= L2_FRACTION * hw.l2_bytes else w_bytes
    e_hbm = reread_w if tied else e_bytes
    out = []
    if pass_name == "forward":
        out.append(gemm("cublas z = h W_c^T", w_bytes + rows * d * s + buffer(z_bytes), w_bytes + chunks * (rows * d * s + z_bytes),
                        2.0 * rows * vocab * d))
        out.append(pointwise("chunk_softmax", buffer(p_bytes) + (bias and vocab * s), chunks * (3 * z_bytes + p_bytes)))
        acc = rows * de * 4
        out.append(gemm("cublas p E_c", e_hbm + buffer(p_bytes) / 2, e_bytes + chunks * (p_bytes + acc),
                        2.0 * rows * vocab * de))
        out.append(pointwise("acc * alpha + pE", chunks * 4 * acc, chunks * 4 * acc, launches=2 * chunks))
        return out
    full = pass_name == "full-backward"
    out.append(gemm("cublas z, dp", w_bytes + e_hbm + 2 * buffer(z_bytes) / 2,
                    w_bytes + e_bytes + chunks * (rows * (d + de) * s + 2 * z_bytes), 2.0 * rows * vocab * (d + de)))
    out[-1].launches = 2 * chunks
    out.append(pointwise("chunk_grad", buffer(2 * p_bytes), chunks * (2 * z_bytes + 2 * p_bytes)))
    dh_acc = rows * d * 4
    out.append(gemm("cublas dh += dz W_c", reread_w + buffer(p_bytes) / 2 + chunks * 3 * dh_acc,
                    w_bytes + chunks * (p_bytes + 3 * dh_acc), 2.0 * rows * vocab * d))
    if full:
        dw_out, de_out = vocab * d * s, (0 if tied else vocab * de * s)
        flops = 2.0 * rows * vocab * (d + de)
        out.append(gemm("cublas dW_c, dE_c", dw_out + de_out + buffer(2 * p_bytes) / 2,
                        dw_out + de_out + chunks * (2 * p_bytes + rows * (d + de) * s), flops))
        out[-1].launches = (1 if tied else 2) * chunks
        if tied:
            out.append(pointwise("cat [dz; p]", chunks * 4 * p_bytes, chunks * 4 * p_bytes))
    return out


def _cast_cost(numel: int, src: int, dst: int, hw: Hardware) -> KernelCost:
    nbytes = numel * (src + dst)
    return _finish(KernelCost("cast", (numel,), nbytes, nbytes, 0.0), hw, 0.0)


def predict(pass_name: str, rows: int, vocab: int, d: int, d_embed: int, dtype=torch.bfloat16, *, tied=False,
            bias=False, hardware: Hardware = H200, batch_invariant=False) -> Prediction:
    """Model one call: ``pass_name`` is "forward", "dh-backward" (LoRA: W and E frozen) or
    "full-backward" (dh, dW, dE and db when ``bias``)."""
    from . import host

    if pass_name not in PASSES:
        raise ValueError(f"pass_name must be one of {PASSES}, got {pass_name!r}")
    if tied and d != d_embed:
        raise ValueError(f"tied weights need d == d_embed, got {d} and {d_embed}")
    meta = dict(dtype=dtype, device="meta")
    hidden = torch.empty(rows, d, **meta)
    weight = torch.empty(vocab, d, **meta)
    embed = weight if tied else torch.empty(vocab, d_embed, **meta)
    b = torch.empty(vocab, **meta) if bias else None
    lse = torch.empty(rows, dtype=torch.float32, device="meta")
    kw = dict(temperature=1.0, softcap=None, tied=tied, batch_invariant=batch_invariant, upcast=False,
              sms=hardware.num_sms)
    s = torch.empty(0, dtype=dtype).element_size()
    cfg = host.config_for(hidden, weight, embed, batch_invariant=batch_invariant, sms=hardware.num_sms)
    full = pass_name == "full-backward"
    launches, extra = [], []
    if pass_name == "forward":
        out32 = torch.empty(rows, d_embed, dtype=torch.float32, device="meta")
        if cfg.kind != "gemm":
            launches = host.forward_launches(hidden, weight, embed, b, out32, lse, **kw)
        useful = 2 * rows * vocab * (d + d_embed)
        ideal_bytes = vocab * (d + (0 if tied else d_embed)) * s + (vocab * s if bias else 0) + rows * (d * s + d_embed * 4)
    else:
        grad_out = torch.empty(rows, d_embed, **meta)
        if cfg.kind != "gemm":
            launches, bufs = host.backward_launches(
                grad_out, hidden, weight, embed, b, lse, lse, need_hidden=True, need_weight=full, need_embed=full,
                need_bias=full and bias, merge_tied_grads=full and tied, grad_filter_eps=0.0, **kw)
            for key, numel in (("dw", vocab * d), ("de", vocab * d_embed)):
                if key in bufs and bufs[key].dtype != dtype:
                    extra.append(_cast_cost(numel, 4, s, hardware))
        useful = 2 * rows * vocab * (2 * d + d_embed) + (2 * rows * vocab * (d + d_embed) if full else 0)
        weights = vocab * (d + (0 if tied else d_embed)) * s
        ideal_bytes = weights * (2 if full else 1) + rows * (2 * d + d_embed) * s + (2 * vocab * s if full and bias else 0)
    if cfg.kind == "gemm":
        extra = gemm_path_costs(cfg, pass_name, s, tied, bias, hardware)
    kernels = [cost_launch(launch, hardware) for launch in launches] + extra
    rate = hardware.flops_fp32 if s == 4 else hardware.flops_16bit
    ideal_seconds = max(ideal_bytes / hardware.hbm_bytes_per_s, useful / rate)
    return Prediction(pass_name, rows, vocab, d, d_embed, dtype_name(dtype), tied, hardware.name, kernels, useful,
                      ideal_bytes, ideal_seconds)


# ----------------------------------------------------------------------------------------------
# The goals and the report
# ----------------------------------------------------------------------------------------------
TRAFFIC_GOAL = 1.15   # HBM bytes / one-pass ideal at B <= 128
LARGE_B_GOAL = 1.3    # modeled time / GEMM-equivalents at the peak rate, B = 4096


def goal(pred: Prediction) -> tuple[str, bool] | None:
    """(description, met) of the issue's goal that applies to this prediction, if any."""
    if pred.rows <= 128:
        return f"HBM traffic <= {TRAFFIC_GOAL}x one pass", pred.traffic_ratio <= TRAFFIC_GOAL
    if pred.rows >= 4096:
        return f"time <= {LARGE_B_GOAL}x GEMM-equivalents", pred.time_ratio <= LARGE_B_GOAL
    return None


def table(hardware: Hardware = H200, dtype=torch.bfloat16, models=MODELS, batches=BATCHES, passes=PASSES):
    return [predict(p, b, v, d, de, dtype, tied=tied, hardware=hardware)
            for name, (v, d, de, tied) in models.items() for b in batches for p in passes]


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def markdown(hardware_list=(H200, H100), dtype=torch.bfloat16) -> str:
    names = {v: k for k, v in MODELS.items()}
    lines = [
        "# Roofline model of the Triton kernels (no GPU measurement)",
        "",
        "Generated by `python -m gircse_kernels.triton.roofline --markdown bench/results/gpu_roofline.md` from the "
        "launches the backend makes for each call (`gircse_kernels/triton/roofline.py` reads the same `OpConfig`, "
        "grids and constexprs). **Nothing here was measured on a GPU**: it is what the kernels' loads, stores "
        "and MMAs imply under the stated machine model; `python -m bench.gpu_check` puts measured times next to it.",
        "",
    ]
    lines += ["## Summary", ""]
    for hw in hardware_list:
        preds = table(hw, dtype)
        for pass_name in PASSES:
            judged = [(p, goal(p)) for p in preds if p.pass_name == pass_name and goal(p) is not None]
            met = sum(1 for _p, g in judged if g[1])
            missed = ", ".join(f"{names[(p.vocab, p.d, p.d_embed, p.tied)]} B={p.rows} ({p.traffic_ratio if p.rows <= 128 else p.time_ratio:.2f})"
                               for p, g in judged if not g[1])
            lines.append(f"- {hw.name}, {pass_name}: goal met in {met} of {len(judged)} cells"
                         + (f"; missed: {missed}" if missed else ""))
    lines += [
        "",
        "Where the model says the goals are missed, and why (the design's known limits):",
        "",
        "- dh-only backward at the 7B widths (d = 3584, 4096): W is read twice, for the logits and again for "
        "dz W once the tile's logits are complete; keeping either the W tile or the [B, d] fp32 dh accumulator "
        "(229 KB at B = 16, d = 3584) on chip is beyond one SM here, so ~1.5x one pass. The full backward adds "
        "the same re-read (~1.25-1.4x).",
        "- Narrow tied models (SmolLM2, Qwen2.5-0.5B) at B = 32-128: the fused kernels pay flash-decoding partials "
        "(splits x B x d_e fp32, written and read) and tied value re-reads; the GEMM path's chunk of W "
        "(V/2 x d) exceeds L2 for Qwen2.5-0.5B, so its tied values and the dh GEMM re-read W from HBM.",
        "- B = 4096: the GEMM path's [B, chunk] fp32 logits are written and read once per chunk and its fp32 "
        "accumulator is rescaled per chunk; with d <= 896 those passes cost about as much as the GEMMs "
        "(1.5-2.1x), at the 7B widths the forward lands at 1.33x and the backward passes meet 1.3x.",
        "",
    ]
    for hw in hardware_list:
        lines += [
            f"## {hw.name} ({dtype_name(dtype)}): HBM {hw.hbm_bytes_per_s / 1e12:.2f} TB/s, L2 assumed "
            f"{hw.l2_bytes_per_s / 1e12:.1f} TB/s ({hw.l2_bytes >> 20} MiB), MMA {hw.flops_16bit / 1e12:.0f} TFLOP/s "
            f"({hw.small_mma_fraction:.0%} for 16-row tiles), {hw.launch_overhead_s * 1e6:.0f} us per launch",
            "",
            "ideal = one pass over W and E (once when tied) at HBM bandwidth, or the useful FLOPs at the peak "
            "rate when compute bound. traffic = modeled HBM bytes / ideal bytes. Goal: traffic <= 1.15 at "
            "B <= 128; time <= 1.3x the GEMM-equivalents at B = 4096.",
            "",
            "| model | B | pass | kernels (bound) | HBM | L2 | TFLOP exec | time | ideal | traffic | time/ideal | goal |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for pred in table(hw, dtype):
            g = goal(pred)
            kernels = ", ".join(f"{k.name}({k.bound})" for k in pred.kernels)
            lines.append(
                f"| {names[(pred.vocab, pred.d, pred.d_embed, pred.tied)]} | {pred.rows} | {pred.pass_name} | {kernels} | "
                f"{_fmt_bytes(pred.hbm_bytes)} | {_fmt_bytes(pred.l2_bytes)} | {pred.flops / 1e12:.3g} | "
                f"{pred.seconds * 1e3:.3f} ms | {pred.ideal_seconds * 1e3:.3f} ms | {pred.traffic_ratio:.2f} | "
                f"{pred.time_ratio:.2f} | {'' if g is None else ('met' if g[1] else 'MISSED') + ': ' + g[0]} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="write the table here (default: print it)")
    args = parser.parse_args(argv)
    text = markdown()
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

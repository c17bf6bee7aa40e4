"""The C++ backend on the CPU kinds this project meets, emulated on this CPU (``bench/cpu_kinds.py``).

One fresh interpreter per kind (the libraries read their instruction-set caps at start-up): ``native``
(this CPU as it is), ``avx512-no-bf16`` and ``avx2`` (what an AVX2-only CPU runs: upcast fp32 tiles,
the AVX2 streaming clone, torch's scalar bf16 matmul for the bf16 peers). Issue 13's goal for such a
CPU: a bf16 call within 1.3x of the same call in fp32, so the table's key column is ``bf16 / fp32``.
"""
from __future__ import annotations

import pytest
import torch

from bench.checks import REL_TOL
from bench.cpu_kinds import BF16_PEER_MAX_ROWS, KINDS, NEEDS, run_kind
from bench.harness import _cpuinfo

# Our op's error bound per dtype: the package's tolerance (bench/checks.py) plus the rounding of a
# bf16 result (2^-8 relative to its largest element); the reference is fp32 / fp64 (``truth``).
BOUND = {"bf16": REL_TOL[torch.bfloat16] + 2 ** -8, "fp32": REL_TOL[torch.float32]}


@pytest.fixture(scope="module")
def kinds_table(report):
    section = report.section(
        "cpu-kinds", "Op on other CPU kinds: the C++ backend's paths, emulated on this CPU",
        "Each kind runs in a fresh interpreter with the libraries' instruction-set caps set "
        "(`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`, `MKL_ENABLE_INSTRUCTIONS`, `GIRCSE_CPU_ISA`; see "
        "`bench/cpu_kinds.py`), so it runs the code that CPU kind runs, on this machine's cores and memory. "
        "`op` = the `cpu` backend; ms, best of the round-robin repetitions inside that process. "
        f"bf16 peers (torch's bf16 matmul, a scalar loop on AVX2) only at B <= {BF16_PEER_MAX_ROWS}. "
        "fwd+bwd: only `h` requires grad.")
    return section.table("grid", "CPU kinds (emulated)", [
        ("kind", "kind"), ("capability", "torch capability"), ("clone", "stream clone"), ("gemm", "bf16 tiles"),
        ("shape", "shape"), ("B", "B", "int"), ("pass", "pass"), ("path", "path"),
        ("op_bf16", "op bf16 ms", "ms"), ("op_fp32", "op fp32 ms", "ms"), ("bf16_vs_fp32", "bf16 / fp32", "ratio"),
        ("naive_fp32", "naive fp32 ms", "ms"), ("chunked_fp32", "chunked fp32 ms", "ms"),
        ("fp32_vs_peer", "op fp32 / best fp32 peer", "ratio"), ("bf16_peer", "best bf16 peer ms", "ms"),
        ("bf16_vs_peer", "op bf16 / best bf16 peer", "ratio")])


@pytest.mark.parametrize("kind", list(KINDS))
def test_bench_cpu_kind(kind, kinds_table, report, size, device):
    if device.type != "cpu":
        pytest.skip("CPU kinds: a CPU run")
    from bench.test_bench_op import backends
    if "cpu" not in backends(device):
        pytest.skip("the C++ extension is not built")
    flags = _cpuinfo()[1]
    missing = [f for f in NEEDS[kind] if f not in flags]
    if missing:
        pytest.skip(f"this CPU cannot emulate {kind}: it lacks {missing}")
    result = run_kind(kind, size)
    caps = result["capabilities"]
    for row in result["rows"]:
        where = f"{kind} {row['shape']} B={row['B']} {row['pass']}"
        for what, error in row["errors"].items():
            dtype = what.split()[0].removeprefix("op_")
            report.record_check("cpu-kinds", f"{where} {what}", error, BOUND[dtype])
        s = row["seconds"]
        plan = result["plans"][f"{row['shape']} bf16 B={row['B']}"]["fwd" if row["pass"] == "fwd" else "bwd"]
        fp32_peer = min(s["naive_fp32"], s["chunked_fp32"])
        bf16_peer = min((s[n] for n in ("naive_bf16", "chunked_bf16") if n in s), default=None)
        kinds_table.add(kind=kind, capability=caps["torch_capability"], clone=plan["isa"],
                        gemm=caps["gemm_for_bf16"], shape=row["shape"], B=row["B"], **{"pass": row["pass"]},
                        path=plan["path"], op_bf16=s["op_bf16"], op_fp32=s["op_fp32"],
                        bf16_vs_fp32=s["op_bf16"] / s["op_fp32"], naive_fp32=s["naive_fp32"],
                        chunked_fp32=s["chunked_fp32"], fp32_vs_peer=s["op_fp32"] / fp32_peer, bf16_peer=bf16_peer,
                        bf16_vs_peer=None if bf16_peer is None else s["op_bf16"] / bf16_peer,
                        extra={"errors": row["errors"], "plans": result["plans"], "seconds": s,
                               "torch_threads": result["torch_threads"]})
    failed = [c for c in report.checks if c.section == "cpu-kinds" and c.what.startswith(kind + " ") and not c.passed]
    assert not failed, "; ".join(f"{c.what}: {c.error:.2e} > {c.bound:.2e}" for c in failed)


"""``bench/cpu_kinds.py``: the emulation of other CPU kinds really switches the paths it claims to
(torch's capability, our streaming clone and bf16 tile engine), and the worker's JSON is complete.
Nothing here times anything (the figures are ``pytest bench/``'s)."""
from __future__ import annotations

import pytest

from bench.cpu_kinds import KINDS, NEEDS, grid, run_kind
from bench.harness import _cpuinfo


def test_kinds_and_grids_are_consistent():
    assert set(KINDS) == set(NEEDS) and KINDS["native"] == {}
    for size in ("quick", "default", "full"):
        assert grid(size) and all(rows >= 1 for _, rows in grid(size))


@pytest.mark.skipif(not {"avx2", "fma"} <= _cpuinfo()[1],
                    reason="needs an x86 CPU with AVX2 to emulate an AVX2-only one")
def test_avx2_emulation_switches_every_path():
    pytest.importorskip("gircse_kernels._C", reason="the C++ extension is not built")
    result = run_kind("avx2", "quick")
    caps = result["capabilities"]
    assert caps["torch_capability"] == "AVX2"
    assert caps["gemm_for_bf16"] == "fp32"  # oneDNN capped at AVX2: the bf16 brgemm probe fails, tiles upcast
    assert all(p["isa"] == "avx2" for plan in result["plans"].values() for p in plan.values())
    assert len(result["rows"]) == 2 * len(grid("quick"))
    for row in result["rows"]:
        assert {"op_bf16", "op_fp32", "naive_fp32", "chunked_fp32"} <= set(row["seconds"])
        assert max(row["errors"].values()) < 3e-2, row["errors"]

"""The benchmark harness: correctness checks that cannot be fooled by scale, report structure, README
generator, plot. (The benchmarks themselves run with ``pytest bench/``; nothing here times anything.)"""
from __future__ import annotations

import json

import pytest
import torch

from bench import checks, harness, plots, readme
from bench.report import SECTION_ORDER, Report, Table, find_table, load
from gircse_kernels import reference, soft_token_embedding

ENV = {"cpu_model": "AMD EPYC", "cpu_flags": ["avx2", "avx512f", "avx512_bf16"], "logical_cpus": 2,
       "torch_threads": 2, "cpu_capability": "AVX512", "gpu": None, "python": "3.11.7", "torch": "2.13.0",
       "triton": "3.9.0", "transformers": "5.24.0", "peft": "0.21.2", "date_utc": "2026-01-01 00:00:00",
       "git_commit": "0123456789abcdef", "git_dirty": False}


def _op_case(dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(4096, 64, generator=g) / 64 ** 0.25).to(dtype)
    h = (torch.randn(3, 64, generator=g) / 64 ** 0.25).to(dtype)
    truth = reference.soft_token_embedding(h.double(), w.double(), w.double())
    naive = torch.softmax(h @ w.T, -1) @ w
    return h, w, truth, naive


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_all_zeros_output_fails_in_every_dtype(dtype):
    """The op's outputs are small (|out| ~ 0.1 here); an absolute tolerance would accept zeros in bf16."""
    h, w, truth, naive = _op_case(dtype)
    assert truth.abs().max() < 0.5
    with pytest.raises(checks.CheckFailed, match="relative error 1.000e\\+00"):
        checks.check_close(None, "op", "zeros", torch.zeros_like(naive), truth, baseline=naive)
    out = soft_token_embedding(h, w, w, backend="torch")
    error = checks.check_close(None, "op", "torch backend", out, truth, baseline=naive)
    assert error <= checks.REL_TOL[dtype]


def test_checks_catch_what_they_must():
    truth = torch.tensor([1.0, -2.0, 4.0])
    with pytest.raises(checks.CheckFailed, match="degenerate reference"):
        checks.relative_error(truth, torch.zeros(3))
    with pytest.raises(checks.CheckFailed, match="shape"):
        checks.relative_error(truth[:2], truth)
    assert checks.relative_error(torch.tensor([1.0, float("nan"), 4.0]), truth) == float("inf")
    assert checks.relative_error(truth * 1.01, truth) == pytest.approx(0.01)
    # Scale-free: the same relative error at any magnitude.
    assert checks.relative_error(truth * 1e-6 * 1.01, truth * 1e-6) == pytest.approx(0.01)
    # The bound grows by the same-dtype baseline's own error, never more.
    with pytest.raises(checks.CheckFailed):
        checks.check_close(None, "x", "too far", truth * 1.05, truth, rel_tol=0.01, baseline=truth * 1.03)
    report = Report(ENV, "quick")
    checks.check_close(report, "op", "ok", truth * 1.03, truth, rel_tol=0.01, baseline=truth * 1.03)
    assert report.checks[0].passed and report.checks[0].bound == pytest.approx(0.04)


def test_report_structure_and_readme(tmp_path):
    report = Report(ENV, "quick", "pytest bench/ --bench-size quick")
    # Sections come out in SECTION_ORDER whatever order they were added in.
    model = report.section("model", "Model level", "text")
    table = model.table("encode", "Encode", [("n", "N", "int"), ("method", "method"), ("k", "K"),
                                              ("seconds", "s / batch", "s"), ("ratio", "ratio", "ratio")])
    for k, seconds in ((1, 1.0), (5, 1.2)):
        table.add(n=32, method="GIRCSE, KV cache", k=k, seconds=seconds, ratio=seconds)
    table.add(n=32, method="Causal-EOS", k=None, seconds=1.0, ratio=1.0)
    op = report.section("op", "Op").table("grid", "grid", [("B", "B", "int"), ("naive", "naive ms", "ms")])
    op.add(B=1, naive=0.0123)
    with pytest.raises(KeyError, match="no columns"):
        op.add(B=1, typo=3)
    with pytest.raises(KeyError, match="unknown report section"):
        report.section("speed", "?")
    report.record_check("op", "cpu out", 1e-3, 2e-2)
    plots.add_plots(report, str(tmp_path))
    json_path, md_path = report.write(str(tmp_path))
    text = open(md_path).read()
    assert text.index("## Op") < text.index("## Model level")
    assert "| 1 | 12.3 |" in text and "1 of 1 passed" in text and "encode_vs_k.png" in text
    assert (tmp_path / plots.ENCODE_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = load(str(tmp_path))
    assert data == json.loads(open(json_path).read())
    assert [s["id"] for s in data["sections"]] == [s for s in SECTION_ORDER if s in ("op", "model")]
    assert find_table(data, "model/encode")["rows"][1]["seconds"] == 1.2
    assert Table.from_dict(find_table(data, "model/encode"), columns=["k", "seconds"],
                           where=lambda r: r["k"] == 5).to_markdown().endswith("| 5 | 1.2 |")
    section = readme.readme_section(data, json_path)
    assert section.startswith("## Performance") and "AMD EPYC" in section and "| 1 | 12.3 |" in section
    assert "1 of 1 checks passed" in section and "encode_vs_k.png" in section


def test_machine_slug_names_the_machine():
    assert harness.machine_slug(ENV) == "cpu-amd-epyc-avx512bf16-2c"
    assert harness.machine_slug(dict(ENV, cpu_flags=["avx2"], cpu_capability="AVX2",
                                     cpu_model="Intel(R) Xeon(R) Platinum 8480+ @ 2.0GHz")) == \
        "cpu-intel-xeon-platinum-8480-avx2-2c"
    assert harness.machine_slug(dict(ENV, gpu="NVIDIA H200")) == "cuda-nvidia-h200"


def test_time_methods_reports_every_method():
    timed = harness.time_methods({"small": lambda: torch.ones(1024), "big": lambda: torch.ones(16, 2**20)}, reps=2)
    assert set(timed) == {"small", "big"} and all(m.seconds > 0 for m in timed.values())
    if harness.peak_memory_supported():
        assert timed["big"].peak_mib >= 60  # a 64 MiB buffer, page granularity

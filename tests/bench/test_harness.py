"""The benchmark harness: correctness checks that cannot be fooled by scale, report structure, the generator
of docs/performance.md's block, plot. (The benchmarks themselves run with ``pytest bench/``; nothing here times anything.)"""
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
    # A baseline error computed beforehand counts the same as the baseline tensor.
    checks.check_close(report, "op", "ok", truth * 1.03, truth, rel_tol=0.01,
                       baseline=checks.relative_error(truth * 1.03, truth))
    assert report.checks[1].bound == pytest.approx(0.04)


def test_relative_error_in_chunks_equals_the_whole_tensor_formula(monkeypatch):
    """relative_error walks the tensors in chunks (bounded fp64 copies); the figure, the non-finite result
    and the degenerate reference must not depend on where the chunks fall."""
    g = torch.Generator().manual_seed(3)
    reference = torch.randn(7, 5, generator=g)
    result = reference + 1e-3 * torch.randn(7, 5, generator=g)
    whole = ((result.double() - reference.double()).abs().max() / reference.double().abs().max()).item()
    for chunk in (1, 4, 35, 1 << 22):
        monkeypatch.setattr(checks, "_CHUNK", chunk)
        assert checks.relative_error(result, reference) == whole
        late_nan = result.clone()
        late_nan[6, 4] = float("nan")
        assert checks.relative_error(late_nan, reference) == float("inf")
        late_inf = reference.clone()
        late_inf[6, 4] = float("inf")
        with pytest.raises(checks.CheckFailed, match="degenerate reference"):
            checks.relative_error(result, late_inf)
        with pytest.raises(checks.CheckFailed, match="degenerate reference"):
            checks.relative_error(result, torch.zeros(7, 5))


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


def test_performance_page_block_is_rewritten_in_place(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text(f"# Performance\n\nintro\n\n{readme.BEGIN}\nold block\n{readme.END}\n\n## Reading\nkept\n")
    readme.write_page("## Performance of the default benchmark run\n\nnew block\n", str(page))
    assert page.read_text() == (f"# Performance\n\nintro\n\n{readme.BEGIN}\n## Performance of the default benchmark "
                                f"run\n\nnew block\n{readme.END}\n\n## Reading\nkept\n")
    page.write_text("# Performance\n\nno markers\n")
    with pytest.raises(ValueError, match="performance.md: expected the marker lines"):
        readme.write_page("new block\n", str(page))
    assert page.read_text() == "# Performance\n\nno markers\n"


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


def test_available_memory_and_the_op_cells_estimate():
    """The op grid skips a cell (saying so) when its estimated peak exceeds the available memory: the
    estimate must cover what the cell was measured to hold (Qwen2-7B bf16 B = 1: 9.1 GB RSS) and grow with
    the weights and with B."""
    import os

    from bench.test_bench_op import SHAPES, cell_peak_bytes

    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
        assert 0 < harness.available_bytes("cpu") <= total
    qwen = cell_peak_bytes(SHAPES["qwen2-7b"], torch.bfloat16, 1)
    assert qwen >= 9.1e9
    assert cell_peak_bytes(SHAPES["qwen2-7b"], torch.float32, 1) > qwen
    assert cell_peak_bytes(SHAPES["qwen2-7b"], torch.bfloat16, 512) > qwen
    assert cell_peak_bytes(SHAPES["mistral-7b"], torch.bfloat16, 1) < qwen


def test_an_op_cell_that_would_not_fit_is_skipped_with_a_note(monkeypatch):
    """The guard runs before any input is made: with (pretend) 1 MiB available, the cell is skipped and
    the table's note says which cell and why."""
    from bench import test_bench_op

    monkeypatch.setattr(test_bench_op, "available_bytes", lambda device: 1 << 20)
    table = Table("op/grid", "Op grid", [])
    with pytest.raises(pytest.skip.Exception, match="qwen2-7b bf16 B=1 not run"):
        test_bench_op.test_bench_op(("qwen2-7b", "bf16", 1), table, None, "full", torch.device("cpu"))
    assert "qwen2-7b bf16 B=1 not run: it needs about 11.2 GiB, 0.0 GiB were available" in table.note
    assert not table.rows

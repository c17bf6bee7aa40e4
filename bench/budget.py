"""The bench session's wall-clock budget (``--bench-budget``, default 600 s for the default size).

A new user types ``pytest bench/`` on whatever CPU they have; the default run must end in about ten
minutes there and say what it left out. So:

* tests run most important first (``PRIORITY``: the model-level cost against Causal-EOS, then the op,
  then the rest);
* each test has an estimate: the seconds it took in a reference run (``REFERENCE``: the default size,
  alone on the cores of ``REFERENCE_MACHINE``), scaled by the reference machine's fp32 GEMM rate over
  this machine's, measured once at the start (``harness.measure_machine``, ~1 s). A test with no
  reference time gets the median of the others. The scale is a rough one (a CPU without native bf16 is
  slower still on bf16 cells, a GPU faster than its GEMM rate suggests on small ones), which is why the
  progress line shows the real elapsed time after every test;
* a test whose estimate would take the session past the budget is skipped, with the reason, and named in
  the report's run line; the session goes on with the cheaper tests after it;
* after each test one line: elapsed seconds of the budget, this test's seconds, the estimate for the
  tests left.

A test that starts inside the budget runs to its end, so a session can pass the budget by at most one
test's error of estimate. Correctness checks are part of each test and are never skipped on their own:
a skipped test reports no figure at all.
"""
from __future__ import annotations

import statistics
import time

import pytest

# Run order, most important first: (file, test function) prefixes of node ids; the rest keep their order after.
PRIORITY = (
    "bench/test_bench_flops.py::test_table6",
    "bench/test_bench_model.py::test_bench_encode_documents",
    "bench/test_bench_training.py::test_bench_training_step",
    "bench/test_bench_op.py::test_bench_op",
    "bench/test_bench_op.py::test_bench_decode_step",
    "bench/test_bench_op.py::test_bench_cpu_small_batch",
    "bench/test_bench_model.py::test_bench_encode",
    "bench/test_bench_model.py::test_profile_decode_step",
    "bench/test_bench_training.py::test_bench_training",
    "bench/test_bench_serve.py",
    "bench/test_bench_corpus.py",
    "bench/test_bench_cpu_kinds.py",
    "bench/test_bench_regression.py",
    "bench/test_bench_flops.py",
)

# Seconds per test at the default size, alone on the reference machine's 2 cores (node id prefix: seconds;
# the longest matching prefix wins), from the progress lines of one `pytest bench/ --bench-budget 0` run
# (2026-12-07, 835 s in all; its fp32 GEMM rate from the same run's encode-cost section).
REFERENCE_MACHINE = "Intel Xeon (family 6 model 167, AMX + AVX512-BF16), 2 vCPUs, torch 2.13.0+cpu"
REFERENCE_FP32_GFLOPS = 337.0
REFERENCE: dict[str, float] = {
    "bench/test_bench_flops.py::test_table6": 0.0,
    "bench/test_bench_model.py::test_bench_encode_documents": 174.1,
    "bench/test_bench_training.py::test_bench_training_step": 73.6,
    "bench/test_bench_op.py::test_bench_op[smollm2-135m-bf16-1]": 12.2,
    "bench/test_bench_op.py::test_bench_op[smollm2-135m-bf16-64]": 14.6,
    "bench/test_bench_op.py::test_bench_op[smollm2-135m-fp32-1]": 11.1,
    "bench/test_bench_op.py::test_bench_op[smollm2-135m-fp32-64]": 17.1,
    "bench/test_bench_op.py::test_bench_op[qwen2.5-0.5b-bf16-1]": 31.2,
    "bench/test_bench_op.py::test_bench_op[qwen2.5-0.5b-bf16-64]": 47.6,
    "bench/test_bench_op.py::test_bench_op[qwen2.5-0.5b-fp32-1]": 32.7,
    "bench/test_bench_op.py::test_bench_decode_step": 37.0,
    "bench/test_bench_op.py::test_bench_cpu_small_batch[bf16]": 13.8,
    "bench/test_bench_op.py::test_bench_cpu_small_batch[fp32]": 14.9,
    "bench/test_bench_model.py::test_bench_encode": 78.1,
    "bench/test_bench_model.py::test_profile_decode_step": 12.7,
    "bench/test_bench_training.py::test_bench_training": 11.7,
    "bench/test_bench_serve.py::test_serve_load": 39.7,
    "bench/test_bench_corpus.py::test_bench_corpus_processes": 67.5,
    "bench/test_bench_cpu_kinds.py::test_bench_cpu_kind[native]": 11.1,
    "bench/test_bench_cpu_kinds.py::test_bench_cpu_kind[avx512-no-bf16]": 11.4,
    "bench/test_bench_cpu_kinds.py::test_bench_cpu_kind[avx2]": 13.5,
    "bench/test_bench_regression.py::test_headline[op-forward-smollm2-135m-bf16-1]": 0.2,
    "bench/test_bench_regression.py::test_headline[op-forward-smollm2-135m-fp32-64]": 0.5,
    "bench/test_bench_regression.py::test_headline[encode-gircse-k5-fp32-8]": 7.3,
    "bench/test_bench_flops.py::test_flop_counter_agreement": 3.6,
}


def _rank(nodeid: str) -> int:
    for i, prefix in enumerate(PRIORITY):
        if nodeid.startswith(prefix):
            return i
    return len(PRIORITY)


def _reference_seconds(nodeid: str) -> float | None:
    matches = [p for p in REFERENCE if nodeid.startswith(p)]
    return REFERENCE[max(matches, key=len)] if matches else None


class Budget:
    """The pytest plugin ``bench/conftest.py`` registers (see the module docstring)."""

    def __init__(self, report, budget_s: float, clock=time.monotonic):
        self.report, self.budget_s, self.clock = report, budget_s, clock
        self.start = clock()
        self.estimates: dict[str, float] = {}
        self.left: list[str] = []
        self.started: dict[str, float] = {}
        report.run.update(budget_s=budget_s or None, tests=[], skipped_for_budget=[])

    def elapsed(self) -> float:
        return self.clock() - self.start

    # -------------------------------------------------------------------------------------- collection
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session, config, items):
        items.sort(key=lambda item: _rank(item.nodeid))  # stable: a file's own order within a rank
        self.left = [item.nodeid for item in items]
        if self.budget_s and items:
            self._estimate([item.nodeid for item in items])

    def _estimate(self, nodeids: list[str]) -> None:
        import torch

        from bench.harness import measure_machine

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rate = measure_machine(torch.float32, device).gemm_flops / 1e9
        scale = REFERENCE_FP32_GFLOPS / rate
        known = {n: s for n in nodeids if (s := _reference_seconds(n)) is not None}
        fallback = statistics.median(known.values()) if known else 5.0
        self.estimates = {n: scale * known.get(n, fallback) for n in nodeids}
        self.report.run.update(fp32_gflops=round(rate, 1), estimate_scale=round(scale, 3))

    # -------------------------------------------------------------------------------------- each test
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        self.started[item.nodeid] = self.clock()
        estimate = self.estimates.get(item.nodeid)
        if not self.budget_s or estimate is None:
            return
        elapsed = self.elapsed()
        if elapsed + estimate > self.budget_s:
            self.report.run["skipped_for_budget"].append(dict(test=item.nodeid, estimate_s=round(estimate, 1)))
            pytest.skip(f"bench budget: ~{estimate:.0f} s estimated, {self.budget_s - elapsed:.0f} s of the "
                        f"{self.budget_s:.0f} s budget left (--bench-budget 0 runs everything)")

    def pytest_runtest_logreport(self, report):
        if report.when != "teardown" or report.nodeid not in self.started:
            return
        seconds = self.clock() - self.started.pop(report.nodeid)
        if report.nodeid in self.left:
            self.left.remove(report.nodeid)
        skipped = any(s["test"] == report.nodeid for s in self.report.run["skipped_for_budget"])
        if not skipped:
            self.report.run["tests"].append(dict(test=report.nodeid, seconds=round(seconds, 2)))
        remaining = sum(self.estimates.get(n, 0.0) for n in self.left)
        budget = f" of {self.budget_s:.0f} s" if self.budget_s else ""
        estimate = f"; ~{remaining:.0f} s estimated for the {len(self.left)} left" if self.estimates else \
            f"; {len(self.left)} left"
        line = (f"[bench {self.elapsed():6.0f} s{budget}] {report.nodeid}: "
                f"{'skipped for the budget' if skipped else f'{seconds:.1f} s'}{estimate}")
        reporter = getattr(self, "reporter", None)
        if reporter is not None:
            reporter.write_line(line)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session):
        self.reporter = session.config.pluginmanager.get_plugin("terminalreporter")

    def pytest_sessionfinish(self, session, exitstatus):
        self.report.run["wall_s"] = round(self.elapsed(), 1)

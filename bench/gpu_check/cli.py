"""The command: arguments, the sections in order, the exit code (see the package docstring)."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

from . import canaries as canary_variants
from .install import Install
from .oracle import check_case, correctness_cases, families_report, summarize_canaries
from .report import TRACEBACK_NAME, Recorder, error_text, finalize_killed, new_report, sticky_cuda_error
from .shapes import DEFAULT_BUDGET_S, END_BY, PASSES, PRECOMPILE_SHARE, SECTIONS, SMALL_BATCHES, BATCHES, model_shapes
from .watchdog import Clock, Watchdog

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROG = "python -m bench.gpu_check"
CPU_BUDGET_S = 3600.0  # the interpreter runs the whole check, canaries included, in 10-20 minutes on 2 cores


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description="One-shot GPU check of the Triton backend: correctness "
                                     "(with --canary, of broken variants too), CUDA graphs, timings vs the roofline.")
    parser.add_argument("--out", required=True, help="directory for gpu_check.json / .md (rewritten after every cell)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: the same logic under TRITON_INTERPRET=1 (implies --small)")
    parser.add_argument("--small", action="store_true", help="tiny shapes instead of the real LM heads")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget from process start; a watchdog kills the run at its end "
                             f"(default {DEFAULT_BUDGET_S:.0f} on CUDA, {CPU_BUDGET_S:.0f} under the interpreter)")
    parser.add_argument("--models", nargs="+", help="subset of the model shapes (default: all)")
    parser.add_argument("--batches", type=int, nargs="+",
                        help="batch sizes of every section (default: the timings' roofline batches, and for "
                             "correctness batches that reach every configuration family)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--canary", action=argparse.BooleanOptionalAction, default=False,
                        help="also run the correctness checks against broken variants of the kernels, each of "
                             "which must be caught (exit code 0 only if all are and the real op passes)")
    parser.add_argument("--pip-install", action=argparse.BooleanOptionalAction, default=False,
                        help="try `pip install --no-build-isolation --no-deps -e .` in the background and report it")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        args.small = True
    if args.budget_s is None:
        args.budget_s = DEFAULT_BUDGET_S if args.device == "cuda" else CPU_BUDGET_S
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    timing, correctness = model_shapes(args.small, correctness=False), model_shapes(args.small, correctness=True)
    unknown = sorted(set(args.models or ()) - set(correctness))
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {sorted(correctness)}")
    args.timing_shapes = {k: v for k, v in timing.items() if not args.models or k in args.models}
    args.correctness_shapes = {k: v for k, v in correctness.items() if not args.models or k in args.models}
    if args.batches is not None and any(b < 1 for b in args.batches):
        parser.error("--batches must be positive")
    args.batch_sizes = tuple(args.batches or (SMALL_BATCHES if args.small else BATCHES))
    args.correctness_batches = tuple(args.batches) if args.batches else None
    return args


def environment(device) -> dict:
    import torch

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = dict(python=platform.python_version(), torch=torch.__version__, triton=version("triton"),
               numpy=version("numpy"), transformers=version("transformers"), device=device,
               interpreter=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
               compilers={c: shutil.which(c) for c in ("cc", "gcc", "nvcc", "ptxas")}, cpus=os.cpu_count())
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        l2 = int(getattr(props, "L2_cache_size", 0))
        env.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                   l2_bytes=l2, l2_mib=round(l2 / 2**20, 1), capability=f"{props.major}.{props.minor}",
                   cuda=torch.version.cuda)
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            env["nvidia_smi"] = error_text(exc, 100)
    return env


def after_cuda_error(exc) -> str | None:
    """Whether ``exc`` left the CUDA context unusable (a synchronize fails, or the message names a sticky
    error): the reason, else None. Frees the cache after an out-of-memory error."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
    try:
        torch.cuda.synchronize()
    except Exception as probe:
        return error_text(probe, 300)
    return error_text(exc, 300) if sticky_cuda_error(exc) else None


def _free(device):
    if device == "cuda":
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def _precompile_calls(args, cases, sms):
    from .precompile import PlannedCall
    from .sweep import sweep_cells

    calls = []
    for case in cases:  # the correctness cases first: they matter most
        vocab, d, de, _ = args.correctness_shapes[case.model]
        for pass_name in ("forward", "full-backward"):
            calls.append(PlannedCall(pass_name, case.rows, vocab, d, d if case.tied else de, case.tied, case.dtype,
                                     case.bias or case.mask is not None, None, case.batch_invariant))
    for vocab, d, de, tied in args.timing_shapes.values():
        calls += [PlannedCall(p, b, vocab, d, d if tied else de, tied, "bfloat16", False)
                  for b in args.batch_sizes for p in PASSES]
    if args.timing_shapes and "graphs" in args.sections:
        vocab, d, de, tied = next(iter(args.timing_shapes.values()))
        calls.append(PlannedCall("forward", 4, vocab, d, d if tied else de, tied, "bfloat16", True))
        calls.append(PlannedCall("forward", 3, 49152, 64, 64, True, "bfloat16", False))
    if "sweep" in args.sections:  # then the sweep's tile alternatives (each JIT compile would eat the sweep's time)
        calls += [PlannedCall(c["pass_name"], c["rows"], *c["shape"], "bfloat16", False, (c["key"], choice))
                  for c in sweep_cells(args.timing_shapes, sms) if c["setting"] == "blocks" for choice in c["choices"][1:]]
    return list(dict.fromkeys(calls))


def _kind(rows, vocab, d, de, sms):
    import torch

    from gircse_kernels.triton.config import choose_config

    return choose_config(rows, vocab, d, de, torch.bfloat16, sms).kind


def run(args, *, clock=None, recorder=None) -> dict:
    """Run the requested sections within the budget, each cell written to ``args.out`` as it finishes;
    returns the report."""
    clock = clock or Clock(args.budget_s, start=time.monotonic())
    recorder = recorder or Recorder(args.out, new_report(_command(), args.budget_s, args.canary), clock,
                                    context_lost=after_cuda_error)
    device, report = args.device, recorder.report
    with recorder.section("environment"):  # (imports torch: seconds, inside the budget like everything)
        recorder.set("environment", environment(device))
    env = report.get("environment") or {}
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        report["errors"].append("no CUDA device (use --device cpu for the interpreter run)")
        recorder.finish(False)
        return report
    install = None
    if args.pip_install:
        install = Install(ROOT, args.out).start()
        recorder.progress("pip install started in the background")

    from .timing import device_hardware

    sms = 4 if args.small else env.get("sms", 132)
    cases = correctness_cases(args.correctness_shapes, sms, small=args.small, batches=args.correctness_batches)
    hardware_model, hardware_measured = device_hardware(env, None, small=args.small)

    def wanted(name) -> bool:
        if name not in args.sections:
            return False
        if recorder.cuda_lost and name != "precompile":
            recorder.skip_section(name, f"CUDA context lost earlier ({recorder.cuda_lost[:120]})")
            return False
        return True

    if wanted("precompile"):
        if device != "cuda":
            recorder.skip_section("precompile", "the interpreter compiles nothing")
        else:
            with recorder.section("precompile"):
                import triton

                from .precompile import precompile

                active = triton.runtime.driver.active.get_current_target()
                count, failures, seconds = precompile(_precompile_calls(args, cases, sms),
                                                      (active.backend, active.arch, active.warp_size), sms,
                                                      max(1.0, clock.until(PRECOMPILE_SHARE)))
                recorder.set("precompile", dict(kernels=count, failures=failures, seconds=seconds))

    if wanted("calibration"):
        with recorder.section("calibration"):
            from .timing import calibrate

            calib = calibrate(device, args.small, l2_bytes=hardware_model.l2_bytes)
            recorder.set("calibration", calib)
            hardware_model, hardware_measured = device_hardware(env, calib, small=args.small)
    recorder.set("hardware", {k: dataclasses.asdict(v) for k, v in
                              (("model", hardware_model), ("measured", hardware_measured)) if v is not None})

    if wanted("correctness"):
        with recorder.section("correctness") as info:
            recorder.set("families", families_report(args.correctness_shapes, cases, sms))
            variants = list(canary_variants.CANARIES.items()) if args.canary else []
            for case in cases:
                ident = dataclasses.asdict(case)
                if not recorder.room_for_cell("correctness", END_BY["correctness"]):
                    recorder.skip_cell("correctness", ident, label=case.label, reason="budget")
                    info["reason"] = "budget: some cases skipped"
                    continue

                def check(case=case):
                    try:
                        return check_case(case, args.correctness_shapes[case.model], device, variants)
                    finally:
                        _free(device)
                recorder.cell("correctness", ident, check, label=case.label)
            if args.canary:
                recorder.set("canaries", summarize_canaries(report["correctness"], canary_variants.descriptions()))

    if wanted("graphs"):
        with recorder.section("graphs") as info:
            from . import graphs

            checks = [("generation", lambda: graphs.generation_check(device, small=args.small))]
            if args.timing_shapes:
                first = next(iter(args.timing_shapes.values()))
                checks.insert(0, ("op K-step loop", lambda: graphs.op_loop_check(device, first)))
            for name, fn in checks:
                if recorder.room_for_cell("graphs", END_BY["graphs"]):
                    recorder.cell("graphs", dict(name=name), fn, label=name)
                else:
                    recorder.skip_cell("graphs", dict(name=name), label=name, reason="budget")
                    info["reason"] = "budget"

    if wanted("timings"):
        with recorder.section("timings") as info:
            from .timing import flusher, side_stream

            flush = flusher(device, hardware_model.l2_bytes)
            for name, (vocab, d, de, tied) in args.timing_shapes.items():
                for rows in args.batch_sizes:
                    for pass_name in PASSES:
                        ident, label = dict(model=name, rows=rows, pass_name=pass_name), f"{name} B={rows} {pass_name}"
                        if not recorder.room_for_cell("timings", END_BY["timings"]):
                            recorder.skip_cell("timings", ident, label=label, reason="budget")
                            info["reason"] = "budget: some cells skipped"
                            continue

                        def cell(shape=(vocab, d, de, tied), rows=rows, pass_name=pass_name):
                            try:
                                with side_stream(device):
                                    return timing_row(shape, rows, pass_name, device, sms, hardware_model,
                                                      hardware_measured or hardware_model, flush)
                            finally:
                                _free(device)
                        recorder.cell("timings", ident, cell, label=label)
            del flush

    if wanted("sweep"):
        with recorder.section("sweep"):
            from .sweep import sweep
            from .timing import flusher

            sweep(args.timing_shapes, device, recorder, hardware_model, end_by=END_BY["sweep"],
                  l2_bytes=hardware_model.l2_bytes, flush=flusher(device, hardware_model.l2_bytes))

    if install is not None:
        with recorder.section("install"):
            recorder.set("install", install.result(wait_s=clock.until(END_BY["install"])))
    recorder.finish(overall_ok(report))
    return report


def timing_row(shape, rows, pass_name, device, sms, hardware_model, hardware_measured, flush) -> dict:
    """One timing cell: the implementations side by side (``timing.time_cell``) and the roofline's
    prediction with the stated and the measured hardware."""
    from gircse_kernels.triton import roofline as rl

    from .timing import time_cell

    vocab, d, de, tied = shape
    de = d if tied else de
    row = dict(kind=_kind(rows, vocab, d, de, sms))
    row.update(time_cell(vocab, d, de, tied, rows, pass_name, device, l2_bytes=hardware_model.l2_bytes, flush=flush))
    pred = rl.predict(pass_name, rows, vocab, d, de, tied=tied, hardware=hardware_model)
    meas = rl.predict(pass_name, rows, vocab, d, de, tied=tied, hardware=hardware_measured)
    row.update(model_s=pred.seconds, model_measured_hw_s=meas.seconds, ideal_bytes=pred.ideal_bytes,
               useful_flops=pred.useful_flops, ideal_s=pred.ideal_seconds)
    if row.get("triton_s"):
        row["hbm_fraction"] = pred.ideal_bytes / row["triton_s"] / hardware_measured.hbm_bytes_per_s
        row["tflops"] = pred.useful_flops / row["triton_s"] / 1e12
    return row


def overall_ok(report) -> bool:
    """Every correctness case ran and passed, every graph check passed, no section failed, the CUDA context
    survived, and with --canary every canary was caught."""
    correctness, graph_checks = report.get("correctness") or [], report.get("graphs") or []
    ok = all(c.get("ok") is True for c in correctness + graph_checks) and not report.get("cuda_context_lost")
    ok = ok and not any(s.get("status") == "failed" for s in report["sections"].values())
    if report.get("canary"):
        found = report.get("canaries") or []
        ok = ok and bool(found) and all(c["caught"] for c in found)
    return bool(ok)


def _command(argv=None) -> str:
    return " ".join([PROG] + list(sys.argv[1:] if argv is None else argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    clock = Clock(args.budget_s)  # from process start: the imports count
    recorder = Recorder(args.out, new_report(_command(argv), args.budget_s, args.canary), clock,
                        context_lost=after_cuda_error)
    recorder.write()
    recorder.progress(f"gpu_check started: pid {os.getpid()}, budget {args.budget_s:.0f} s from process start")
    traceback_path = os.path.join(args.out, TRACEBACK_NAME)
    watchdog = Watchdog(clock, traceback_path,
                        on_kill=lambda elapsed: finalize_killed(args.out, elapsed, traceback_path)).start()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported
    try:
        report = run(args, clock=clock, recorder=recorder)
    except BaseException as exc:  # SIGTERM, Ctrl-C, a bug outside any section: the report says so
        recorder.report.update(status="terminated" if isinstance(exc, (SystemExit, KeyboardInterrupt)) else "crashed",
                               ok=False)
        recorder.report["errors"].append(f"run: {error_text(exc)}")
        recorder.write()
        raise
    finally:
        watchdog.stop()
    print(f"gpu_check {'PASSED' if report['ok'] else 'FAILED'} in {clock.elapsed():.0f} s: {recorder.md_path}",
          flush=True)
    return 0 if report["ok"] else 1

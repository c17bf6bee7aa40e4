"""The report of a gpu_check run: ``gpu_check.json`` and its rendering ``gpu_check.md``, rewritten after every cell.

Each rewrite goes to a temporary file renamed over the old one (``os.replace`` is atomic), so a run killed
at any moment -- SIGKILL included -- leaves the last complete report: every section and cell finished
until then, ``sections`` saying which ones finished, and ``current`` naming the cell that was running.
The JSON is strict (non-finite numbers are written as strings). Nothing here imports torch: the
watchdog child renders the report of a run it has killed.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import traceback

JSON_NAME, MD_NAME, TRACEBACK_NAME = "gpu_check.json", "gpu_check.md", "gpu_check_traceback.txt"
# Messages of errors that leave the CUDA context unusable: every later CUDA call fails the same way.
STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                      "misaligned address", "illegal instruction", "an illegal", "CUDA error: unknown error")


def _strict(obj):
    """``obj`` with NaN / inf floats written as strings (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename. No fsync: what must survive is a
    killed process, and the page cache outlives it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def sticky_cuda_error(exc: BaseException) -> bool:
    """Whether an exception's message names an error that leaves the CUDA context unusable. Code that
    catches exceptions to go on (a baseline, a canary, a sweep alternative) re-raises these, so that
    the cell's ``Recorder`` sees them and ends the CUDA sections."""
    return any(marker in str(exc) for marker in STICKY_CUDA_ERRORS)


def error_text(exc: BaseException, limit: int = 600) -> str:
    return f"{type(exc).__name__}: {exc}"[:limit]


def new_report(command: str, budget_s: float, canary: bool) -> dict:
    return dict(schema=2, command=command, status="running", ok=None, budget_s=budget_s, wall_s=0.0, canary=canary,
                current=None, sections={}, errors=[], cuda_context_lost=None)


class Recorder:
    """Holds the report, writes it after every change, prints one flushed progress line per event.

    ``context_lost(exc)`` says whether an exception left the CUDA context unusable (a sticky error):
    after one, every later cell is recorded as skipped, and the run ends its CUDA sections with the
    report still written."""

    def __init__(self, out_dir: str, report: dict, clock, *, context_lost=None):
        self.out_dir, self.report, self.clock = out_dir, report, clock
        self.context_lost = context_lost or (lambda exc: None)
        self.json_path = os.path.join(out_dir, JSON_NAME)
        self.md_path = os.path.join(out_dir, MD_NAME)
        self.longest_cell = {}  # section -> seconds of its longest cell so far
        os.makedirs(out_dir, exist_ok=True)

    # ---------------------------------------------------------------------------------------------
    def write(self) -> None:
        self.report["wall_s"] = round(self.clock.elapsed(), 2)
        write_atomic(self.json_path, json.dumps(_strict(self.report), indent=1, default=str, allow_nan=False))
        write_atomic(self.md_path, safe_markdown(self.report))

    def progress(self, text: str) -> None:
        print(f"[{self.clock.elapsed():7.1f} s] {text}", flush=True)

    def set(self, key: str, value) -> None:
        self.report[key] = value
        self.write()

    def error(self, where: str, exc: BaseException) -> None:
        self.report["errors"].append(f"{where}: {error_text(exc)}")
        lost = self.context_lost(exc)
        if lost and not self.report["cuda_context_lost"]:
            self.report["cuda_context_lost"] = f"{where}: {lost}"
            self.progress(f"CUDA context lost in {where}: {lost}; the CUDA sections end here")

    @property
    def cuda_lost(self) -> str | None:
        return self.report["cuda_context_lost"]

    # ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def section(self, name: str):
        """Run a section: its status goes running -> done (or failed, with the error) in the report."""
        info = self.report["sections"].setdefault(name, {})
        info.update(status="running", started_s=round(self.clock.elapsed(), 2))
        self.write()
        self.progress(f"{name}: started")
        try:
            yield info
        except Exception as exc:  # a section's own bug: recorded, and the run goes on with the next one
            info.update(status="failed", error=error_text(exc), traceback=traceback.format_exc(limit=8)[-3000:])
            self.error(name, exc)
        else:
            if info["status"] == "running":
                info["status"] = "done"
        finally:
            info["seconds"] = round(self.clock.elapsed() - info["started_s"], 2)
            self.report["current"] = None
            self.write()
            self.progress(f"{name}: {info['status']}" + (f" ({info['reason']})" if info.get("reason") else "")
                          + (f": {info['error']}" if info.get("error") else ""))

    def skip_section(self, name: str, reason: str) -> None:
        self.report["sections"][name] = dict(status="skipped", reason=reason)
        self.write()
        self.progress(f"{name}: skipped ({reason})")

    def room_for_cell(self, section: str, end_by: float) -> bool:
        """Whether a cell of ``section`` still fits before ``end_by`` of the budget (judged by the
        section's longest cell so far)."""
        return self.clock.until(end_by) > self.longest_cell.get(section, 0.0)

    def cell(self, section: str, ident: dict, fn, *, label: str) -> dict:
        """Run ``fn() -> dict`` as one cell of ``section``: its entry (``ident`` + the result, or the error)
        is appended to ``report[section]`` and written before the progress line is printed. Every cell
        runs CUDA work: after a lost CUDA context, the entry says so instead."""
        entries = self.report.setdefault(section, [])
        if self.cuda_lost:
            entry = dict(ident, skipped=f"CUDA context lost earlier ({self.cuda_lost[:120]})")
        else:
            self.report["current"] = dict(section=section, cell=label, since_s=round(self.clock.elapsed(), 2))
            self.write()
            start = self.clock.elapsed()
            try:
                entry = dict(ident, **fn())
            except Exception as exc:  # recorded; the run goes on with the next cell
                entry = dict(ident, ok=False, error=error_text(exc),
                             traceback=traceback.format_exc(limit=6)[-2000:])
                self.error(f"{section} {label}", exc)
            entry["cell_seconds"] = round(self.clock.elapsed() - start, 3)
            self.longest_cell[section] = max(self.longest_cell.get(section, 0.0), entry["cell_seconds"])
        entries.append(entry)
        self.report["current"] = None
        self.write()
        self.progress(f"{section} {label}: {summary(entry)}")
        return entry

    def skip_cell(self, section: str, ident: dict, *, label: str, reason: str) -> dict:
        entry = dict(ident, skipped=reason)
        self.report.setdefault(section, []).append(entry)
        self.write()
        self.progress(f"{section} {label}: skipped ({reason})")
        return entry

    def finish(self, ok: bool) -> None:
        self.report.update(status="complete", ok=ok, current=None)
        self.write()


def summary(entry: dict) -> str:
    """One progress word or phrase for a cell's entry."""
    if entry.get("skipped"):
        return f"skipped ({entry['skipped']})"
    if entry.get("error"):
        return f"ERROR {entry['error'][:200]}"
    if "checks" in entry:
        worst, ratio = worst_check(entry["checks"])
        text = ("ok" if entry["ok"] else "FAILED") + f" (worst: {worst} at {ratio:.2g} of its bound)"
        if entry.get("canaries"):
            caught = [n for n, c in entry["canaries"].items() if c["caught"]]
            text += f"; canaries caught: {', '.join(caught) or 'none'} of {len(entry['canaries'])}"
        return text
    if "ok" in entry:
        return "ok" if entry["ok"] else "FAILED"
    if isinstance(entry.get("seconds"), float):  # a sweep choice
        return f"{entry['seconds'] * 1e3:.3f} ms (roofline {entry.get('model_s', 0) * 1e3:.3f} ms)"
    seconds = [f"{k[:-2]} {v * 1e3:.3f} ms" for k, v in entry.items() if k.endswith("_s") and isinstance(v, float)
               and k not in ("model_s", "model_measured_hw_s", "ideal_s")]
    return ", ".join(seconds) or "done"


def worst_check(checks: dict) -> tuple[str, float]:
    """(name, error / bound) of the check closest to (or furthest past) its bound."""
    def ratio(c):
        return c["error"] / c["bound"] if c["bound"] > 0 else math.inf
    name = max(checks, key=lambda k: ratio(checks[k]) if math.isfinite(ratio(checks[k])) else math.inf)
    return name, ratio(checks[name])


def finalize_killed(out_dir: str, elapsed_s: float, traceback_path: str | None = None) -> None:
    """Mark the report of a run the watchdog killed (the child's last act): status, what was running, and
    the tail of the stack dump."""
    json_path = os.path.join(out_dir, JSON_NAME)
    try:
        with open(json_path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        report = new_report("(unknown: killed before its first report)", 0.0, False)
    if report.get("status") == "complete":  # killed after its last write: the report stands as it is
        return
    current = report.get("current") or {}
    where = f"{current.get('section')} {current.get('cell')}" if current else "between cells"
    report.update(status="killed", ok=False, wall_s=round(elapsed_s, 2),
                  killed=f"the watchdog killed the run after {elapsed_s:.1f} s (budget {report.get('budget_s')} s), "
                         f"during {where}")
    if traceback_path and os.path.exists(traceback_path):
        with open(traceback_path, encoding="utf-8", errors="replace") as f:
            report["killed_traceback"] = f.read()[-4000:]
    for name, info in report.get("sections", {}).items():
        if info.get("status") == "running":
            info["status"] = "killed"
    write_atomic(json_path, json.dumps(_strict(report), indent=1, default=str, allow_nan=False))
    write_atomic(os.path.join(out_dir, MD_NAME), safe_markdown(report))
    for name in os.listdir(out_dir):  # a rewrite the kill interrupted
        if name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out_dir, name))


# -------------------------------------------------------------------------------------------------
# Markdown
# -------------------------------------------------------------------------------------------------
def safe_markdown(report: dict) -> str:
    """``markdown(report)``, or a note saying the JSON holds the report: a rendering bug must not cost it."""
    try:
        return markdown(report)
    except Exception as exc:
        return (f"# One-shot GPU check of the Triton backend\n\nThe markdown could not be rendered "
                f"({error_text(exc)}); {JSON_NAME} holds the report.\n")


def _ms(seconds) -> str:
    return "" if not isinstance(seconds, (int, float)) else f"{seconds * 1e3:.3f}"


def _status_line(report) -> str:
    status = report.get("status")
    if status == "complete":
        return f"**{'PASSED' if report.get('ok') else 'FAILED'}**"
    if status == "killed":
        return f"**KILLED**: {report.get('killed', '')}"
    current = report.get("current")
    return ("**INCOMPLETE** (the run had not finished when this was written" +
            (f"; running: {current['section']} {current['cell']})" if current else ")"))


def markdown(report: dict) -> str:
    env = report.get("environment") or {}
    lines = ["# One-shot GPU check of the Triton backend", "",
             f"{_status_line(report)}. Command: `{report.get('command', '')}`; wall time "
             f"{report.get('wall_s', 0):.0f} s of a {report.get('budget_s', 0):.0f} s budget.", ""]
    if report.get("cuda_context_lost"):
        lines += [f"**CUDA context lost** ({report['cuda_context_lost']}): every CUDA cell after it is skipped.", ""]
    lines += ["| section | status | seconds | note |", "|---|---|---|---|"]
    for name, info in report.get("sections", {}).items():
        lines.append(f"| {name} | {info.get('status')} | {info.get('seconds', '')} | "
                     f"{info.get('reason', '') or info.get('error', '')[:120]} |")
    lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()]
    if report.get("install"):
        inst = report["install"]
        lines += ["", "## pip install", "", f"`{inst.get('command', '')}`: **{inst.get('result', '')}**"
                  + (f" in {inst['seconds']:.0f} s" if isinstance(inst.get("seconds"), (int, float)) else "")]
        if inst.get("import_check"):
            lines.append(f"; import from outside the tree: {inst['import_check']}")
    if report.get("precompile"):
        pre = report["precompile"]
        lines += ["", f"Precompiled {pre.get('kernels', '?')} kernels in parallel in {pre.get('seconds', 0):.0f} s"
                  + (f"; {len(pre['failures'])} left to the JIT: {pre['failures'][:3]}" if pre.get("failures") else "")]
    lines += _calibration_lines(report)
    lines += _correctness_lines(report)
    lines += _graph_lines(report)
    lines += _timing_lines(report)
    lines += _sweep_lines(report)
    if report.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in report["errors"]]
    if report.get("killed_traceback"):
        lines += ["", "## Where the run was when it was killed", "", "```", report["killed_traceback"], "```"]
    return "\n".join(lines) + "\n"


def _calibration_lines(report) -> list[str]:
    calib, hardware = report.get("calibration") or {}, report.get("hardware") or {}
    lines = []
    if calib.get("hbm_bytes_per_s"):
        lines += ["", "## Calibration (measured)", "",
                  f"- HBM copy bandwidth: {calib['hbm_bytes_per_s'] / 1e12:.3g} TB/s (bytes read + written)",
                  f"- L2 copy bandwidth: {calib['l2_bytes_per_s'] / 1e12:.3g} TB/s",
                  f"- 16-bit GEMM: {calib['gemm_flops'] / 1e12:.3g} TFLOP/s"]
    for key in ("model", "measured"):
        hw = hardware.get(key)
        if hw:
            lines.append(f"- roofline hardware ({key}): {hw['name']}, {hw['num_sms']} SMs, L2 {hw['l2_bytes'] / 2**20:.1f} MiB, "
                         f"HBM {hw['hbm_bytes_per_s'] / 1e12:.3g} TB/s, L2 {hw['l2_bytes_per_s'] / 1e12:.3g} TB/s, "
                         f"{hw['flops_16bit'] / 1e12:.0f} TFLOP/s")
    return lines


def _correctness_lines(report) -> list[str]:
    lines = ["", "## Correctness", "",
             "fp64 truth on the same rounded inputs; bound = the same-dtype PyTorch error + ATOL x max|truth| "
             "(lse: 4 x the fp32 PyTorch error + 4e-6 x max|lse|); every check must also fail an all-zero "
             "answer. Logit std = the std of h W^T over the vocabulary, averaged over rows.", ""]
    cases = report.get("correctness") or []
    if not cases:
        return lines + [f"{_section_note(report, 'correctness')}"]
    lines += ["| model | B | dtype | tied | mask | family | logit std | worst check | error / bound | ok |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        head = (f"| {c.get('model')} | {c.get('rows')} | {c.get('dtype')} | {c.get('tied')} | {c.get('mask')} | "
                f"{c.get('family', '')} | ")
        if c.get("skipped") or c.get("error"):
            lines.append(head + f"| {(c.get('skipped') or c.get('error'))[:100]} | | "
                         f"{'skipped' if c.get('skipped') else 'ERROR'} |")
            continue
        worst, ratio = worst_check(c["checks"]) if c.get("checks") else ("", math.nan)
        lines.append(head + f"{c.get('logit_std', math.nan):.2f} | {worst} | {ratio:.2g} | "
                     f"{'yes' if c.get('ok') else 'NO'} |")
    unreached = [f for f in report.get("families") or [] if not f.get("cases")]
    if report.get("families"):
        lines += ["", f"Configuration families: {len(report['families']) - len(unreached)} of "
                  f"{len(report['families'])} reached" + (f"; unreached: {unreached}" if unreached else "") + "."]
    if report.get("canaries"):
        lines += ["", "### Canaries (deliberately broken variants; each must be caught)", "",
                  "| canary | caught | cases caught | checks that caught it | what is broken |", "|---|---|---|---|---|"]
        for c in report["canaries"]:
            checks = ", ".join(f"{k} {v}" for k, v in sorted(c.get("checks", {}).items()))
            lines.append(f"| {c['name']} | {'yes' if c['caught'] else 'NO'} | {c.get('cases_caught')} of "
                         f"{c.get('cases')} | {checks} | {c.get('description', '')} |")
    return lines


def _graph_lines(report) -> list[str]:
    lines = ["", "## CUDA graphs", ""]
    for g in report.get("graphs") or []:
        if g.get("skipped") or g.get("error"):
            lines.append(f"- {g.get('name')}: {'skipped: ' + g['skipped'] if g.get('skipped') else 'ERROR: ' + g['error'][:300]}")
            continue
        replays = g.get("replays") or []
        diffs = ", ".join(f"{r['max_abs_diff']:.3g}" + ("" if r["input_changed_output"] else " (stale)") for r in replays)
        lines.append(f"- {g['name']}: **{'ok' if g['ok'] else 'FAILED'}**; capture: {g.get('capture')}; host syncs: "
                     f"{g.get('sync_check')}; replay vs eager on new inputs: max |diff| {diffs} (bit-equal: "
                     f"{', '.join('yes' if r['bit_equal'] else 'no' for r in replays)})")
    if not report.get("graphs"):
        lines.append(_section_note(report, "graphs"))
    return lines


def _timing_lines(report) -> list[str]:
    lines = ["", "## Timings (ms; bf16; side by side in one run)", "",
             "backward = the backward alone, from a saved forward. method: how the Triton cell was timed (graph "
             "replay of n calls, or one call per event pair after a GPU sleep and an L2 flush when its data fit "
             "twice in L2). hbm % = one pass over W and E / time / measured copy bandwidth; model = the roofline "
             "with the device's SMs and L2 and the stated bandwidths; model* = with the measured bandwidths and "
             "GEMM rate.", "",
             "| model | B | pass | path | triton | method | naive | chunked | sdpa | hbm % | TFLOP/s | model | model* | ideal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("timings") or []:
        head = f"| {r.get('model')} | {r.get('rows')} | {r.get('pass_name')} | {r.get('kind', '')} | "
        if r.get("skipped") or not r.get("triton_s"):
            note = r.get("skipped") or r.get("error") or (r.get("errors") or {}).get("triton", "")
            lines.append(head + f"{'skipped: ' if r.get('skipped') else ''}{str(note)[:80]} ||||||||||")
            continue
        sdpa = f"{_ms(r.get('sdpa_s'))} ({r['sdpa_backend']})" if r.get("sdpa_s") else ""
        lines.append(head + f"{_ms(r['triton_s'])} | {(r.get('methods') or {}).get('triton', '')} | "
                     f"{_ms(r.get('naive_s'))} | {_ms(r.get('chunked_s'))} | {sdpa} | "
                     f"{100 * r.get('hbm_fraction', 0):.0f} | {r.get('tflops', 0):.1f} | {_ms(r.get('model_s'))} | "
                     f"{_ms(r.get('model_measured_hw_s'))} | {_ms(r.get('ideal_s'))} |")
    if not report.get("timings"):
        lines.append(_section_note(report, "timings"))
    return lines


def _sweep_lines(report) -> list[str]:
    if not report.get("sweep"):
        return []
    lines = ["", "## Sweep of design choices (side by side; * = the choice in use)", "",
             "| model | B | pass | setting | choice | ms | roofline ms |", "|---|---|---|---|---|---|---|"]
    for s in report["sweep"]:
        setting = tuple(s["key"]) if s["setting"] == "blocks" else "gemm_chunk (vocabulary rows)"
        choice = tuple(s["choice"]) if s["setting"] == "blocks" else s["choice"]
        lines.append(f"| {s['model']} | {s['rows']} | {s['pass_name']} | {setting} | "
                     f"{choice}{' *' if s['current'] else ''} | "
                     f"{_ms(s.get('seconds')) or s.get('skipped', '') or s.get('error', '')[:60]} | "
                     f"{_ms(s.get('model_s'))} |")
    return lines


def _section_note(report, name) -> str:
    info = report.get("sections", {}).get(name)
    if not info:
        return "not run (not requested, or the run ended first)"
    return f"{info.get('status')}" + (f": {info['reason']}" if info.get("reason") else "")

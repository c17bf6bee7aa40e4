"""The budget of a gpu_check run, counted from process start (imports included), and the watchdog that holds it.

Two layers. ``Clock``: sections start no cell past their share of the budget (``shapes.END_BY``), so a run
normally ends with time left to write. ``Watchdog``: for a cell that never returns, a child process forked
before torch is imported SIGKILLs the run at the deadline and marks its report killed, naming the cell
that was running. A process rather than a thread, because a kernel that never finishes or a C call
that holds the GIL stops every thread of the run. Shortly before, ``faulthandler`` (a C thread that
needs no GIL) writes every thread's Python stack to ``gpu_check_traceback.txt``: where the run hung.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time

# The stacks are dumped this long before the kill; the kill itself leaves the report written (every
# cell is already on disk), so the watchdog only marks it.
DUMP_BEFORE_KILL_S = 3.0


def process_age_s() -> float:
    """Seconds since this process started, read from /proc (Linux); 0 elsewhere (counted from now)."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(after_name[19])  # field 22, starttime; the split starts at field 3
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Clock:
    """Seconds elapsed and left of ``budget_s``, from ``start`` on ``time.monotonic``'s clock (default:
    this process's start, so the imports count)."""

    def __init__(self, budget_s: float, start: float | None = None):
        self.budget_s = budget_s
        self.start = time.monotonic() - process_age_s() if start is None else start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def until(self, fraction: float) -> float:
        """Seconds left before ``fraction`` of the budget has passed."""
        return fraction * self.budget_s - self.elapsed()

    @property
    def deadline(self) -> float:
        return self.start + self.budget_s


class Watchdog:
    """Kills this process at ``clock.deadline`` unless ``stop`` is called first (see the module docstring).

    ``on_kill(elapsed_s)`` runs in the child after the kill (it marks the report); it must not need
    anything the child lacks: the child is a fork of this process taken before torch was imported."""

    def __init__(self, clock: Clock, traceback_path: str, on_kill):
        self.clock, self.traceback_path, self.on_kill = clock, traceback_path, on_kill
        self.pid = None
        self._traceback_file = None

    def start(self) -> "Watchdog":
        if hasattr(os, "fork"):
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: watch, and never return into the caller's code
                try:
                    self._watch(os.getppid())
                finally:
                    os._exit(0)
            self.pid = pid
        self._traceback_file = open(self.traceback_path, "w")
        faulthandler.dump_traceback_later(max(0.5, self.clock.deadline - DUMP_BEFORE_KILL_S - time.monotonic()),
                                          file=self._traceback_file)
        return self

    def stop(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        if self._traceback_file is not None:
            self._traceback_file.close()
            self._traceback_file = None
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = None

    def _watch(self, parent: int) -> None:
        while True:
            if os.getppid() != parent:  # the run ended without stopping us (we were re-parented)
                return
            left = self.clock.deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(0.2, left))
        try:
            os.kill(parent, signal.SIGKILL)
        except ProcessLookupError:
            return
        elapsed = self.clock.elapsed()
        print(f"gpu_check watchdog: the budget of {self.clock.budget_s:.0f} s ran out; killed the run after "
              f"{elapsed:.1f} s", flush=True)
        self.on_kill(elapsed)

"""``pip install --no-build-isolation --no-deps -e .`` against the machine's own (CUDA) torch, run alongside the
check, and whether the package then imports from outside the tree (with its C++ extension or without).

Started early in a background process (it compiles the C++ extension, a minute or two of one core) and
collected at the end; it dies with the run (``PR_SET_PDEATHSIG`` on Linux)."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

LOG_NAME = "pip_install.log"
# From a directory outside the tree, without PYTHONPATH: what the editable install resolves to.
IMPORT_CHECK = ("import json, gircse, gircse_kernels; from gircse_kernels import cpu; "
                "print(json.dumps(dict(gircse_kernels=gircse_kernels.__file__, extension=cpu.available())))")


def pip_command(root: str) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", root]


def _die_with_parent():  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Install:
    """One background install: ``start()``, then ``result(wait_s)`` once (killing it past ``wait_s``)."""

    def __init__(self, root: str, out_dir: str, command: list[str] | None = None):
        self.root, self.log_path = root, os.path.join(out_dir, LOG_NAME)
        self.command = command or pip_command(root)
        self.process, self.started_at = None, None

    def start(self) -> "Install":
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GIRCSE_NO_EXTENSION")}
        self._log = open(self.log_path, "w")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(self.command, cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        return self

    def result(self, wait_s: float) -> dict:
        out = dict(command=" ".join(self.command[2:] if self.command[:1] == [sys.executable] else self.command))
        try:
            returncode = self.process.wait(timeout=max(wait_s, 0.1))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            returncode = None
        finally:
            self._log.close()
        out["seconds"] = round(time.monotonic() - self.started_at, 1)
        with open(self.log_path, errors="replace") as f:
            out["log_tail"] = f.read()[-1500:]
        if returncode is None:
            out["result"] = f"did not finish in {out['seconds']:.0f} s (killed)"
            return out
        out["returncode"] = returncode
        out["result"] = "installed" if returncode == 0 else f"FAILED (exit {returncode})"
        if returncode == 0:
            out["import_check"] = self.import_check()
        return out

    def import_check(self) -> dict | str:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["GIRCSE_NO_JIT"] = "1"  # report the extension the install built, not one built now
        with tempfile.TemporaryDirectory() as elsewhere:
            try:
                done = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=elsewhere, env=env, capture_output=True,
                                      text=True, timeout=120)
            except subprocess.TimeoutExpired:
                return "timed out"
        if done.returncode != 0:
            return f"FAILED: {done.stderr.strip()[-300:]}"
        return json.loads(done.stdout.strip().splitlines()[-1])

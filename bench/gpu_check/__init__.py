"""One-shot GPU check of the Triton backend: correctness (and broken variants that must fail it), CUDA graphs,
timings next to the roofline model.

A GPU is lent once, for minutes, for one command: ``bench/gpu_run.sh`` (docs/gpu.md), which runs

    python -u -X faulthandler -m bench.gpu_check --out DIR --canary --pip-install

and writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``. Nothing of the run can be lost: the report is
rewritten atomically after every cell (``report``); a cell that raises is recorded and the run goes on; an
error that leaves the CUDA context unusable ends the CUDA sections and the report is still written; the
budget counts from process start, and a watchdog process kills a run that overstays it, after the
report already holds everything finished (``watchdog``). Sections, in order:

0. environment, and (``--pip-install``) ``pip install --no-build-isolation --no-deps -e .`` in the background
   against the machine's CUDA torch (``install``);
1. precompile: every Triton launch of the run compiled ahead, in parallel processes (``precompile``);
2. calibration: HBM and L2 copy bandwidth and the bf16 GEMM rate; with the device's SM count and L2 size,
   the roofline's hardware (``timing.device_hardware``);
3. correctness at the real LM heads and an uneven shape, in every configuration family, against an fp64
   truth (``oracle``); ``--canary`` runs the same checks on broken variants of the kernels (``canaries``);
4. CUDA graphs: the whole no-grad ``generate_soft_tokens(..., capturable=True)`` and the op's K-step loop,
   captured, replayed, compared with eager; an eager run with host syncs made errors (``graphs``);
5. timings of the Triton op, naive, chunked PyTorch and SDPA, the backward alone from a saved forward, from
   a cold L2 or graph-replayed where a call is short, next to the roofline (``timing``);
6. the sweep of design choices the roofline cannot settle (``sweep``).

``--device cpu --small`` runs the same logic on tiny shapes under the Triton interpreter (its timings mean
nothing). The package's modules import nothing heavy at module level: the watchdog starts before torch
is imported, and ``TRITON_INTERPRET`` must be set before the kernels are.
"""
from .cli import main, parse_args, run

__all__ = ["main", "parse_args", "run"]

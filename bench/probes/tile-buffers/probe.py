"""Is one build of the C++ extension faster or leaner than another on the bf16 tile path?

Side by side in one process: two builds of ``gircse_kernels._C``, time + peak extra memory, forward and
d_hidden-only backward (and every gradient at SmolLM2 B = 64). Used for the d_hidden-only backward change
and for `pieces.patch` (next to this file): result bench/results/cpu-amd-epyc-avx512bf16-2c/tile-buffers/.

    python bench/probes/tile-buffers/probe.py A_SO B_SO out.json [CELLS]
    (run from anywhere; A_SO, B_SO = the two builds' _C*.so files; CELLS e.g. "smollm2:16,smollm2:64")
"""
import argparse
import importlib.machinery
import importlib.util
import json
import os
import sys

import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 3))  # the repository
from bench.harness import _cpuinfo, time_methods
from gircse_kernels import cpu

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("a_so", help="build A's compiled extension (_C*.so)")
parser.add_argument("b_so", help="build B's compiled extension (_C*.so)")
parser.add_argument("out", help="JSON file for the rows")
parser.add_argument("cells", nargs="?", help='a subset of the cells, e.g. "smollm2:16,smollm2:64"')
args = parser.parse_args()


def load(path, name):  # the module's init function is PyInit__C whatever the module is called
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    loader.exec_module(module)
    return module


builds = {"a": load(args.a_so, "build_a._C"), "b": load(args.b_so, "build_b._C")}
tuning = cpu._tuning(0, 0, 0, None, None, None)
torch.manual_seed(0)
SHAPES = {"smollm2": (49152, 576, 576, True), "qwen2.5-0.5b": (151936, 896, 896, True),
          "mistral-7b": (32000, 4096, 4096, False)}
CELLS = [("smollm2", 16), ("smollm2", 64), ("smollm2", 512), ("qwen2.5-0.5b", 64), ("qwen2.5-0.5b", 512),
         ("mistral-7b", 64)]
if args.cells:
    CELLS = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",")]
dt = torch.bfloat16
rows_out = []
print(_cpuinfo()[0], torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), "threads", flush=True)
for name, B in CELLS:
    V, d, d_e, tied = SHAPES[name]
    W = (torch.randn(V, d) * 0.05).to(dt)
    E = W if tied else (torch.randn(V, d_e) * 0.05).to(dt)
    h, g = torch.randn(B, d).to(dt), torch.randn(B, d_e).to(dt)
    out, lse = builds["b"].forward(h, W, E, None, 1.0, None, tied, False, **tuning)
    delta = (g.float() * out.float()).sum(-1)
    passes = ["fwd", "dh"] + (["all"] if (name, B) == ("smollm2", 64) else [])
    for pas in passes:
        def make(ext, pas=pas):
            if pas == "fwd":
                return lambda: ext.forward(h, W, E, None, 1.0, None, tied, False, **tuning)[0]
            full = pas == "all"
            return lambda: ext.backward(g, h, W, E, None, lse, delta, 1.0, None, tied, True, full, full,
                                        False, full and tied, 0.0, False, **tuning)
        res = time_methods({k: make(ext) for k, ext in builds.items()}, reps=5)
        row = dict(shape=name, dtype="bfloat16", B=B, pas=pas,
                   **{f"ms_{k}": round(m.seconds * 1e3, 2) for k, m in res.items()},
                   **{f"mib_{k}": round(m.peak_mib, 2) for k, m in res.items()})
        row["time_b_over_a"] = round(row["ms_b"] / row["ms_a"], 3)
        rows_out.append(row)
        print(json.dumps(row), flush=True)
json.dump(rows_out, open(args.out, "w"), indent=1)

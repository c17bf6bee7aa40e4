"""Does the C++ tile path save memory at equal speed with row groups instead of vocabulary splits?

Side by side at B = 32 / 64 / 128: vocabulary splits (the automatic plan) vs row groups (a partial budget of
one split's partials forces S = 1, G = threads); time + peak extra memory, forward and d_hidden-only backward.
Result: bench/results/cpu-amd-epyc-avx512bf16-2c/row-groups/.

    python bench/probes/row-groups/probe.py out.json     (run from anywhere)
"""
import argparse
import json
import os
import sys

import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 3))  # the repository
from bench.harness import time_methods
from gircse_kernels import cpu

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("out", help="JSON file for the rows")
args = parser.parse_args()

torch.manual_seed(0)
SHAPES = {"smollm2": (49152, 576), "qwen2.5-0.5b": (151936, 896)}
rows = []
for name, (V, d) in SHAPES.items():
    for dt in (torch.bfloat16, torch.float32):
        W = (torch.randn(V, d) * 0.05).to(dt)
        for B in (32, 64, 128):
            h = torch.randn(B, d).to(dt)
            g = torch.randn(B, d).to(dt)
            out, lse = cpu.forward(h, W, W, None, temperature=1.0, softcap=None, tied=True)
            delta = (g.float() * out.float()).sum(-1)
            one_split = B * ((d + 15) // 16 * 16 + 2) * 4
            for pas in ("fwd", "dh"):
                def make(budget, pas=pas):
                    if pas == "fwd":
                        return lambda: cpu.forward(h, W, W, None, temperature=1.0, softcap=None, tied=True,
                                                   partial_budget=budget)[0]
                    return lambda: cpu.backward(g, h, W, W, None, lse, delta, temperature=1.0, softcap=None, tied=True,
                                                need_hidden=True, partial_budget=budget)
                cfgs = {"splits": 0, "groups": one_split}
                plans = {k: cpu.plan(B, V, d, d, dt, backward=pas != "fwd", partial_budget=v) for k, v in cfgs.items()}
                res = time_methods({k: make(v) for k, v in cfgs.items()}, reps=5)
                row = dict(shape=name, dtype=str(dt).split(".")[1], B=B, pas=pas,
                           **{f"plan_{k}": f"S{p['splits']}G{p['groups']}rb{p['row_block']}" for k, p in plans.items()},
                           **{f"ms_{k}": round(m.seconds * 1e3, 2) for k, m in res.items()},
                           **{f"mib_{k}": round(m.peak_mib, 2) for k, m in res.items()})
                rows.append(row)
                print(json.dumps(row), flush=True)
json.dump(rows, open(args.out, "w"), indent=1)

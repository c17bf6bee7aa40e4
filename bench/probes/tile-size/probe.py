"""Which vocabulary tile size should the C++ tile path use: the automatic tile_v vs 256 and 128 rows?

Side by side: time + peak extra memory, forward, d_hidden-only and full backward, tied weights.
(The automatic size was 2^20 elements when this ran; it is 2^18 = 256 rows since, so `auto` now
equals `256` at real widths.) Result: bench/results/cpu-amd-epyc-avx512bf16-2c/tile-size/.

    python bench/probes/tile-size/probe.py out.json     (run from anywhere)
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
        if name == "qwen2.5-0.5b" and dt == torch.float32:
            continue
        W = (torch.randn(V, d) * 0.05).to(dt)
        for B in (64, 512):
            h = torch.randn(B, d).to(dt)
            g = torch.randn(B, d).to(dt)
            out, lse = cpu.forward(h, W, W, None, temperature=1.0, softcap=None, tied=True)
            delta = (g.float() * out.float()).sum(-1)
            for pas in ("fwd", "dh", "all"):
                def make(tv, pas=pas):
                    if pas == "fwd":
                        return lambda: cpu.forward(h, W, W, None, temperature=1.0, softcap=None, tied=True, tile_v=tv)[0]
                    full = pas == "all"
                    return lambda: cpu.backward(g, h, W, W, None, lse, delta, temperature=1.0, softcap=None, tied=True,
                                                need_hidden=True, need_weight=full, need_embed=full,
                                                merge_tied_grads=full, tile_v=tv)
                if pas == "all" and (B == 512 or name != "smollm2"):
                    continue
                tvs = {"auto": 0, "256": 256, "128": 128}
                res = time_methods({k: make(v) for k, v in tvs.items()}, reps=5)
                auto_tv = cpu.plan(B, V, d, d, dt, backward=pas != "fwd")["tile_v"]
                row = dict(shape=name, dtype=str(dt).split(".")[1], B=B, pas=pas, auto_tile_v=auto_tv,
                           **{f"ms_{k}": round(m.seconds * 1e3, 2) for k, m in res.items()},
                           **{f"mib_{k}": round(m.peak_mib, 2) for k, m in res.items()})
                rows.append(row)
                print(json.dumps(row), flush=True)
json.dump(rows, open(args.out, "w"), indent=1)

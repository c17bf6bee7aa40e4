"""Does the C++ op's bf16 B = 1 forward speed follow the age of its inputs' memory (fresh vs settled pages)?

Times a Qwen2-7B-shaped forward over time after its inputs are allocated: the C++ op (`cpu.forward`),
naive PyTorch (materialized softmax) and `Wc.copy_(W)`, best of 3 (2 for naive) every 10 s, on the same
tensors in one process. Also logged: guest huge pages backing the process (AnonHugePages; PyTorch asks for
them with THP_MEM_ALLOC_ENABLE=1) and the CPU time the rest of the machine used during each sample.
Result: bench/results/cpu-amd-epyc-avx512bf16-2c/op-qwen2-7b/fresh-memory/.

    python bench/probes/fresh-memory/probe.py SECONDS out.jsonl [V d]
    (run from anywhere; V d default to Qwen2-7B's 152064 3584)
"""
import argparse
import json
import os
import sys
import time

import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 3))  # the repository
from gircse_kernels import cpu

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("seconds", type=float, help="how long to keep sampling after the allocation")
parser.add_argument("out", help="JSONL file, one line per sample")
parser.add_argument("shape", type=int, nargs="*", metavar="V d", help="vocabulary size and width (default 152064 3584)")
args = parser.parse_args()
if len(args.shape) not in (0, 2):
    parser.error(f"V d: expected two integers or none, got {args.shape}")
V, d = args.shape or (152064, 3584)
torch.manual_seed(0)
start = time.time()
W = (torch.randn(V, d) * 0.05).to(torch.bfloat16)
E = (torch.randn(V, d) * 0.05).to(torch.bfloat16)
h = torch.randn(1, d).to(torch.bfloat16)
Wc = torch.empty_like(W)
allocated = time.time()
HZ = os.sysconf("SC_CLK_TCK")


def machine_busy_s():
    fields = list(map(int, open("/proc/stat").readline().split()[1:]))
    return (sum(fields) - fields[3] - fields[4]) / HZ  # all but idle and iowait


def anon_huge_mib():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages"):
            return int(line.split()[1]) // 1024
    return 0


def best_ms(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(min(times) * 1e3, 1)


ours = lambda: cpu.forward(h, W, E, None, temperature=1.0, softcap=None)  # noqa: E731
naive = lambda: torch.softmax((h @ W.t()).float(), -1).to(torch.bfloat16) @ E  # noqa: E731
copy = lambda: Wc.copy_(W)  # noqa: E731
nbytes = W.numel() * 2
with open(args.out, "w") as out:
    while time.time() - allocated < args.seconds:
        busy0, own0 = machine_busy_s(), time.process_time()
        row = dict(s_after_alloc=round(time.time() - allocated), ours_ms=best_ms(ours, 3), naive_ms=best_ms(naive, 2),
                   copy_ms=best_ms(copy, 3), anon_huge_mib=anon_huge_mib(),
                   thp_mem_alloc_enable=os.environ.get("THP_MEM_ALLOC_ENABLE", ""))
        row["others_cpu_s"] = round(machine_busy_s() - busy0 - (time.process_time() - own0), 2)
        row["ours_read_gbs"] = round(2 * nbytes / 1e9 / (row["ours_ms"] / 1e3), 1)
        row["copy_rw_gbs"] = round(2 * nbytes / 1e9 / (row["copy_ms"] / 1e3), 1)
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(json.dumps(row), flush=True)
        time.sleep(10)

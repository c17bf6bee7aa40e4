"""Qwen2-7B-shaped bf16 B = 1 forward over time after its inputs are allocated: the C++ op (`cpu.forward`),
naive PyTorch (materialized softmax) and `Wc.copy_(W)`, best of 3 (2 for naive) every 10 s, on the same
tensors in one process. Also logged: guest huge pages backing the process (AnonHugePages; PyTorch asks for
them with THP_MEM_ALLOC_ENABLE=1) and the CPU time the rest of the machine used during each sample.

    python probe.py SECONDS out.jsonl [V d]     (run from anywhere; V d default to Qwen2-7B's 152064 3584)
"""
import json
import os
import sys
import time

import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 5))  # the repository
from gircse_kernels import cpu

V, d = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (152064, 3584)
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
with open(sys.argv[2], "w") as out:
    while time.time() - allocated < float(sys.argv[1]):
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

"""Issue 25: how much larger decode groups would buy `encode` at the model level, against their KV memory.

    python bench/probes/decode-group/probe.py [--reps 2] [--out results.json]

Encodes the first 128 Debian dev descriptions (as the `encode-cost` bench) with the shipped model in fp32,
max_length 128: Causal-EOS, and GIRCSE at K = 5 and 20 with the K decode steps run on groups of 32 (the
automatic group at this length under the old 256 MiB KV budget), 64 and 128 texts (the automatic group under
today's 1 GiB) (`decode_batch_size`, so the result does not depend on the budget). All calls are
timed round-robin in one process (best of `--reps`), so the ratios are side by side; peak memory is each
call's extra resident memory (bench.harness).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, os.pardir))

import gircse  # noqa: E402
from bench.harness import time_methods  # noqa: E402
from bench.test_bench_model import dev_documents  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the measurements as JSON here")
    args = parser.parse_args(argv)
    model = gircse.load_default(dtype="float32")
    docs = dev_documents(128)

    def encoding(method, k, group=None):
        def run():
            model.method = method
            return model.encode(docs, k=k, batch_size=32, decode_batch_size=group)
        return run

    runs = {("causal-eos", 1, None): encoding("causal-eos", 1)}
    for k in (5, 20):
        for group in (32, 64, 128):
            runs[("gircse", k, group)] = encoding("gircse", k, group)
    timed = time_methods(runs, reps=args.reps, warmup=False)
    eos = timed[("causal-eos", 1, None)].seconds
    rows = []
    print(f"CPU threads {torch.get_num_threads()}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
    print("| method | K | decode group | s | time / Causal-EOS | peak MiB |")
    print("|---|---|---|---|---|---|")
    for (method, k, group), m in timed.items():
        rows.append({"method": method, "k": k, "decode_group": group, "seconds": m.seconds,
                     "ratio": m.seconds / eos, "peak_mib": m.peak_mib, "cpu_busy": m.cpu_busy})
        peak = "-" if m.peak_mib is None else f"{m.peak_mib:.0f}"
        print(f"| {method} | {k if method == 'gircse' else '-'} | {group or '-'} | {m.seconds:.2f} | "
              f"{m.seconds / eos:.2f} | {peak} |", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                       "rows": rows}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

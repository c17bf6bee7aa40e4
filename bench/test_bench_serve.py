"""Load test of ``gircse serve``: dynamic batching against one request at a time, side by side.

``pytest bench/test_bench_serve.py -s`` (or ``pytest bench -k serve -s``) starts ``python -m gircse
serve`` twice on 127.0.0.1 -- ``--max-batch-size 1 --max-wait-ms 0`` (one text per model call)
and the dynamic batching defaults (``--max-batch-size 32 --max-wait-ms 5``) -- and drives each with
the same bounded load: C concurrent clients, each sending one request (T texts), waiting for the
answer, sending the next, for a fixed time after a short warm-up. It reports requests/s, texts/s,
p50/p99 latency, the mean batch size the server saw (its /metrics), and the speedup in texts/s.
The clients run in this process (asyncio + httpx), the server in its own, on the same machine.

Settings (environment):
  GIRCSE_BENCH_SERVE_MODEL    "tiny" (default: a random 2-layer d=32 Llama with SmolLM2's vocabulary,
                              k=4; the vocabulary op dominates) or any ``--model`` value, e.g.
                              "default" (SmolLM2-135M + the shipped adapter, K=5) or "smollm2-135m"
  GIRCSE_BENCH_SERVE_SECONDS  measured seconds per mode (default 10; 2 s of warm-up come first; with
                              SmolLM2 on CPU a request takes seconds, so give it 30 or more)
  GIRCSE_BENCH_SERVE_CLIENTS  concurrent clients (default 16)
  GIRCSE_BENCH_SERVE_TEXTS    texts per request (default 1)

Reported in the run's ``bench/results/<machine>/report.md`` (section "serve").
"""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from gircse.cli.demo import DEMO_DOCUMENTS, DEMO_QUERIES  # noqa: E402

MODES = {  # name -> server flags
    "one at a time": ["--max-batch-size", "1", "--max-wait-ms", "0"],
    "dynamic batching": ["--max-batch-size", "32", "--max-wait-ms", "5"],
}
WARMUP_SECONDS = 2.0
NAME = "bench"


def _setting(name: str, default: str) -> str:
    return os.environ.get(f"GIRCSE_BENCH_SERVE_{name}", default)


@pytest.fixture(scope="module")
def model_argument(tmp_path_factory) -> str:
    """The ``--model`` value: a saved tiny random model unless the environment names another."""
    chosen = _setting("MODEL", "tiny")
    if chosen != "tiny":
        return chosen
    from transformers import AutoTokenizer

    from gircse import GIRCSE
    from gircse.loading import resolve_model_source
    from tests.gircse.conftest import tiny_causal_lm

    path, gguf = resolve_model_source("smollm2-135m")
    directory = str(tmp_path_factory.mktemp("serve-bench") / "tiny")
    GIRCSE(tiny_causal_lm("llama"), AutoTokenizer.from_pretrained(path, gguf_file=gguf), k=4).save_pretrained(directory)
    return directory


class ServerProcess:
    """``python -m gircse serve`` on a free port; stderr is drained in a thread."""

    def __init__(self, model: str, flags: list[str]):
        env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "gircse", "serve", "--model", model, "--port", "0",
                                      "--served-model-name", NAME, "--log-level", "warning", *flags],
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + 300
        while True:
            match = re.search(r"listening on (http://[^ ]+) ", "".join(self.lines))
            if match:
                self.url = match.group(1)
                break
            self._check(deadline)
        while True:  # the socket is bound before the model loads
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            self._check(deadline)

    def _check(self, deadline: float) -> None:
        if self.proc.poll() is not None or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError("gircse serve did not start:\n" + "".join(self.lines)[-3000:])
        time.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return {name: float(value) for name, value in re.findall(r"^(gircse_[a-z_]+) ([0-9.e+-]+)$", text, re.M)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _drive(url: str, clients: int, texts_per_request: int, warmup: float, seconds: float) -> dict:
    """``clients`` closed-loop clients; the latencies of the requests that completed inside the
    measured window (after the warm-up)."""
    corpus = DEMO_DOCUMENTS + DEMO_QUERIES
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    latencies: list[float] = []
    errors: list[str] = []

    async def client(number: int, http) -> None:
        sent = 0
        while loop.time() < stop_at:
            first = (number * 7 + sent * texts_per_request) % len(corpus)
            texts = [corpus[(first + j) % len(corpus)] for j in range(texts_per_request)]
            began = loop.time()
            response = await http.post("/v1/embeddings", json={"model": NAME, "input": texts})
            ended = loop.time()
            sent += 1
            if response.status_code != 200 or len(response.json()["data"]) != texts_per_request:
                errors.append(f"{response.status_code}: {response.text[:200]}")
            elif measure_from <= ended <= stop_at:
                latencies.append(ended - began)

    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients)) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return {"latencies": latencies, "errors": errors}


def _run_mode(model: str, flags: list[str], clients: int, texts_per_request: int, seconds: float) -> dict:
    server = ServerProcess(model, flags)
    try:
        # Warm-up and measured window run in one client loop; server counters bracket the window.
        async def measured():
            task = asyncio.ensure_future(_drive(server.url, clients, texts_per_request, WARMUP_SECONDS, seconds))
            await asyncio.sleep(WARMUP_SECONDS)
            before = await asyncio.to_thread(server.metrics)
            await asyncio.sleep(seconds)
            after = await asyncio.to_thread(server.metrics)
            return await task, before, after

        load, before, after = asyncio.run(measured())
    finally:
        server.stop()
    latencies = np.array(load["latencies"])
    batches = after["gircse_batches_total"] - before["gircse_batches_total"]
    texts = after["gircse_texts_embedded_total"] - before["gircse_texts_embedded_total"]
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / seconds,
        "texts_per_s": len(latencies) * texts_per_request / seconds,
        "p50_ms": float(np.percentile(latencies, 50) * 1e3) if len(latencies) else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99) * 1e3) if len(latencies) else float("nan"),
        "mean_batch": texts / batches if batches else float("nan"),
        "errors": load["errors"],
    }


def test_serve_load(report, model_argument):
    seconds = float(_setting("SECONDS", "10"))
    clients = int(_setting("CLIENTS", "16"))
    texts_per_request = int(_setting("TEXTS", "1"))
    results = {name: _run_mode(model_argument, flags, clients, texts_per_request, seconds)
               for name, flags in MODES.items()}
    one, dynamic = results["one at a time"], results["dynamic batching"]
    speedup = dynamic["texts_per_s"] / one["texts_per_s"] if one["texts_per_s"] else float("nan")
    model_label = ("tiny random Llama (2 layers, d=32, V=49152, k=4)" if _setting("MODEL", "tiny") == "tiny"
                   else f"`--model {model_argument}`")
    section = report.section("serve", "`gircse serve` under load: dynamic batching vs one text per model call", (
        f"Model: {model_label}, the server's default dtype (fp32 on CPU, bf16 on CUDA). Load: {clients} "
        "closed-loop clients on 127.0.0.1 (asyncio + httpx, in the benchmark process, sharing the machine's "
        f"cores with the server), {texts_per_request} text(s) per request from "
        f"{len(DEMO_DOCUMENTS) + len(DEMO_QUERIES)} demo sentences; {WARMUP_SECONDS:g} s warm-up, then "
        f"{seconds:g} s measured per mode. Requests, req/s, texts/s and latency (sent -> response read) count "
        "the requests completed inside the measured window; mean batch = texts / model calls from the "
        f"server's /metrics over the same window. Dynamic batching speedup (texts/s, same run): {speedup:.2f}x."))
    table = section.table("load", "Server throughput and latency", [
        ("mode", "mode"), ("flags", "server flags"), ("requests", "requests", "int"),
        ("requests_per_s", "req/s", "rate"), ("texts_per_s", "texts/s", "rate"), ("p50", "p50 ms", "ms"),
        ("p99", "p99 ms", "ms"), ("mean_batch", "mean batch (texts)", "ratio"),
        ("speedup", "texts/s vs one at a time", "x")])
    for name, flags in MODES.items():
        r = results[name]
        table.add(mode=name, flags=" ".join(flags), requests=r["requests"], requests_per_s=r["requests_per_s"],
                  texts_per_s=r["texts_per_s"], p50=r["p50_ms"] / 1e3, p99=r["p99_ms"] / 1e3,
                  mean_batch=r["mean_batch"], speedup=r["texts_per_s"] / one["texts_per_s"] if one["texts_per_s"] else None)

    for name in MODES:
        assert not results[name]["errors"], (name, results[name]["errors"][:3])
        assert results[name]["requests"] > 0, name
    assert one["mean_batch"] == 1.0
    if clients > 1:
        assert dynamic["mean_batch"] > 1.0, "concurrent clients never shared a batch"

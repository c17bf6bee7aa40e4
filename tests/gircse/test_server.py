"""``gircse serve`` over loopback with a real HTTP client: round trips equal ``encode``, concurrent
requests share batches, every bad input gets an OpenAI-shaped 4xx, a full queue a 503, shutdown
finishes in-flight requests.

The server runs uvicorn in a thread (or ``python -m gircse serve`` in a subprocess) around the tiny
random Llama of conftest.py, fp32. Equality with ``encode`` is asserted at the model's own batch
invariance tolerance (atol 2e-5, rtol 1e-5, as in test_model_generation.py): a text embedded in a
batch with other requests' texts must match ``encode`` of that text alone.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

from gircse import GIRCSE  # noqa: E402
from gircse.prompts import token_ids  # noqa: E402
from gircse.serve.app import ServeConfig, create_app  # noqa: E402
from gircse.serve.protocol import Limits  # noqa: E402

from .conftest import tiny_causal_lm  # noqa: E402

NAME = "tiny"
TOL = dict(atol=2e-5, rtol=1e-5)
TEXTS = ["the cat sat on the mat", "rain", "stock prices fell sharply today after the announcement",
         "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3]  # the last one is truncated (max_length 32)
LIMITS = Limits(max_inputs_per_request=8, max_input_chars=200, max_body_bytes=4096)


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    """Tiny random Llama, k=3, max_length=32 (so truncation and the instruction limit are reachable)."""
    return GIRCSE(tiny_causal_lm("llama"), smollm2_tokenizer, k=3, max_length=32)


class InstrumentedModel:
    """A model whose ``encode`` records each batch and waits for ``gate``: tests hold the worker busy
    to fill the queue or to shut down mid-request. ``fail_on``: a text whose batch raises, standing in
    for a model failure (no client input can cause one: requests are validated first)."""

    def __init__(self, model, fail_on: str | None = None):
        self.wrapped, self.fail_on = model, fail_on
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.batches: list[list[str]] = []

    def __getattr__(self, name):
        return getattr(self.wrapped, name)

    def encode(self, texts, instruction=None, **kwargs):
        self.batches.append(list(texts))
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        if self.fail_on is not None and self.fail_on in texts:
            raise RuntimeError("model failure")
        return self.wrapped.encode(texts, instruction, **kwargs)


class Running:
    def __init__(self, app, server, thread, port):
        self.app, self.server, self.thread = app, server, thread
        self.url = f"http://127.0.0.1:{port}"
        self.batcher = app.state.batcher

    def post(self, payload=None, *, content=None, **kwargs):
        if content is None:
            content = json.dumps(payload)
        return httpx.post(self.url + "/v1/embeddings", content=content, timeout=60, **kwargs)


@contextlib.contextmanager
def serving(model, graceful_timeout=None, **config):
    """uvicorn in a thread on 127.0.0.1:<free port>; on exit the same graceful stop as SIGTERM."""
    config.setdefault("model_name", NAME)
    config.setdefault("limits", LIMITS)
    config.setdefault("query_instruction", "Retrieve it")
    config.setdefault("max_queue_texts", 64)
    app = create_app(model, ServeConfig(**config))
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=graceful_timeout))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield Running(app, server, thread, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def running(tiny):
    with serving(tiny) as srv:
        yield srv


def vectors_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == NAME
    assert [item["index"] for item in body["data"]] == list(range(len(body["data"])))
    assert all(item["object"] == "embedding" for item in body["data"])
    rows = [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") if isinstance(item["embedding"], str)
            else np.asarray(item["embedding"], dtype=np.float32) for item in body["data"]]
    return np.stack(rows)


def usage_of(model, texts, instruction=None) -> int:
    return sum(len(ids) for ids in token_ids(model.tokenizer, texts, instruction, model.max_length))


def renormalized(vectors, d):
    kept = vectors[:, :d]
    return kept / np.linalg.norm(kept, axis=1, keepdims=True)


# ---------------------------------------------------------------------- round trips
def test_round_trip_equals_encode(running, tiny):
    response = running.post({"model": NAME, "input": TEXTS})
    served = vectors_of(response)
    np.testing.assert_allclose(served, tiny.encode(TEXTS), **TOL)
    assert response.json()["usage"] == {"prompt_tokens": usage_of(tiny, TEXTS), "total_tokens": usage_of(tiny, TEXTS)}
    assert usage_of(tiny, TEXTS[3:]) == tiny.max_length  # the long text was truncated, and counted so

    as_base64 = vectors_of(running.post({"model": NAME, "input": TEXTS, "encoding_format": "base64"}))
    np.testing.assert_array_equal(as_base64, served)  # same texts, same batch: the same bits

    single = running.post({"model": NAME, "input": "rain", "encoding_format": "float"})
    np.testing.assert_allclose(vectors_of(single), tiny.encode(["rain"]), **TOL)
    assert len(single.json()["data"]) == 1

    queries = vectors_of(running.post({"model": NAME, "input": TEXTS[:3], "instruction": "Find it"}))
    np.testing.assert_allclose(queries, tiny.encode(TEXTS[:3], "Find it"), **TOL)
    default_query = running.post({"model": NAME, "input": TEXTS[:3], "input_type": "query", "user": "u1"})
    np.testing.assert_allclose(vectors_of(default_query), tiny.encode(TEXTS[:3], "Retrieve it"), **TOL)
    assert default_query.json()["usage"]["prompt_tokens"] == usage_of(tiny, TEXTS[:3], "Retrieve it")
    documents = vectors_of(running.post({"model": NAME, "input": TEXTS[:3], "input_type": "document"}))
    np.testing.assert_allclose(documents, tiny.encode(TEXTS[:3]), **TOL)


def test_dimensions_truncate_and_renormalize(running, tiny):
    full = tiny.encode(TEXTS)
    for d in (1, 8, 31, 32):
        served = vectors_of(running.post({"model": NAME, "input": TEXTS, "dimensions": d}))
        assert served.shape == (len(TEXTS), d)
        np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(served, renormalized(full, d), **TOL)


def test_openai_client(running, tiny):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    # The client asks for base64 by default and decodes it.
    result = client.embeddings.create(model=NAME, input=TEXTS)
    np.testing.assert_allclose(np.array([e.embedding for e in result.data]), tiny.encode(TEXTS), **TOL)
    assert result.usage.prompt_tokens == usage_of(tiny, TEXTS)
    result = client.embeddings.create(model=NAME, input="rain", dimensions=8, encoding_format="float",
                                      extra_body={"instruction": "Find it"})
    np.testing.assert_allclose(np.array(result.data[0].embedding), renormalized(tiny.encode(["rain"], "Find it"), 8)[0],
                               **TOL)
    assert [m.id for m in client.models.list().data] == [NAME]
    with pytest.raises(openai.NotFoundError, match="does not exist") as error:
        client.embeddings.create(model="text-embedding-3-small", input="rain")
    assert (error.value.code, error.value.param) == ("model_not_found", "model")  # the client read our error body
    with pytest.raises(openai.BadRequestError, match="empty array") as error:
        client.embeddings.create(model=NAME, input=[])
    assert error.value.type == "invalid_request_error"


def test_models_health_metrics(running):
    models = httpx.get(running.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    card = httpx.get(running.url + f"/v1/models/{NAME}").json()
    assert card["object"] == "model" and card["embedding_dim"] == 32 and card["k"] == 3 and card["method"] == "gircse"
    assert httpx.get(running.url + "/v1/models/other").status_code == 404
    health = httpx.get(running.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    running.post({"model": NAME, "input": ["x", "y"]})
    metrics = httpx.get(running.url + "/metrics").text
    assert "# TYPE gircse_batches_total counter" in metrics
    assert int(re.search(r"^gircse_texts_embedded_total (\d+)$", metrics, re.M).group(1)) >= 2
    assert re.search(r'^gircse_http_responses_total\{status="200"\} \d+$', metrics, re.M)


# ---------------------------------------------------------------------- batching
def test_concurrent_requests_share_one_batch_and_each_matches_encode_alone(tiny):
    """Six requests sent at once (mixed lengths, instructions, dimensions) fill exactly one batch of
    twelve texts; each text's vector equals ``encode`` of that text alone. Bad requests fired in
    between are answered 400 and never enter the batch."""
    requests = [
        {"input": ["rain", TEXTS[2]], "instruction": "Find it"},
        {"input": [TEXTS[0], "snow"]},
        {"input": [TEXTS[3], "wind"], "dimensions": 8},
        {"input": ["x y z", TEXTS[1]], "input_type": "query"},
        {"input": ["hello there", "general"], "encoding_format": "base64"},
        {"input": [TEXTS[2], "cold"], "input_type": "document"},
    ]
    bad = [b"{bad", json.dumps({"model": NAME, "input": ""}).encode(), json.dumps({"model": NAME, "input": [1]}).encode()]
    with serving(tiny, max_batch_size=12, max_wait_ms=30_000) as srv:  # the batch runs when full
        with concurrent.futures.ThreadPoolExecutor(len(requests) + len(bad)) as pool:
            good = [pool.submit(srv.post, dict(r, model=NAME)) for r in requests]
            rejected = [pool.submit(srv.post, content=b) for b in bad]
            responses = [f.result() for f in good]
            assert [f.result().status_code for f in rejected] == [400, 400, 400]
        stats = srv.batcher.stats
        assert (stats.batches, stats.multi_request_batches, stats.largest_batch, stats.texts) == (1, 1, 12, 12)
        metrics = httpx.get(srv.url + "/metrics").text
        assert re.search(r"^gircse_multi_request_batches_total 1$", metrics, re.M)
    for request, response in zip(requests, responses):
        instruction = request.get("instruction", "Retrieve it" if request.get("input_type") == "query" else None)
        alone = np.concatenate([tiny.encode([text], instruction) for text in request["input"]])
        if "dimensions" in request:
            alone = renormalized(alone, request["dimensions"])
        np.testing.assert_allclose(vectors_of(response), alone, **TOL)


def test_round_sorted_by_length_in_batches_of_max_size(tiny):
    """One round's texts run shortest first in batches of at most max_batch_size; answers keep the input order."""
    model = InstrumentedModel(tiny)
    texts = [TEXTS[2], "rain", TEXTS[3], TEXTS[0], "snow fell", "a much longer sentence about the weather today"]
    with serving(model, max_batch_size=2, max_wait_ms=0, warmup=False) as srv:
        served = vectors_of(srv.post({"model": NAME, "input": texts}))
    assert [len(b) for b in model.batches] == [2, 2, 2]
    lengths = [len(tiny.tokenizer(t)["input_ids"]) for batch in model.batches for t in batch]
    assert lengths == sorted(lengths) and sorted(sum(model.batches, [])) == sorted(texts)
    np.testing.assert_allclose(served, np.concatenate([tiny.encode([t]) for t in texts]), **TOL)


# ---------------------------------------------------------------------- errors
def _error(response, status: int, param, code) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert (error["param"], error["code"]) == (param, code), error
    assert error["message"]
    return error["message"]


def _body(**fields) -> str:
    return json.dumps({"model": NAME, "input": "ok", **fields})


BAD_REQUESTS = [  # (body, status, param, code, words in the message)
    ("{bad", 400, None, "invalid_json", "not valid JSON"),
    ("[1, 2]", 400, None, "invalid_json", "JSON object"),
    ('{"model": "tiny", "input": NaN}', 400, None, "invalid_json", "NaN"),
    ("[" * 2000 + "]" * 2000, 400, None, "invalid_json", "not valid JSON"),  # deeper than Python's recursion limit
    ("", 400, None, "invalid_json", "not valid JSON"),
    ('{"input": "ok"}', 400, "model", "missing_required_parameter", "model"),
    ('{"model": "tiny"}', 400, "input", "missing_required_parameter", "input"),
    (json.dumps({"model": 3, "input": "ok"}), 400, "model", "invalid_type", "model must be a string"),
    (json.dumps({"model": "text-embedding-3-small", "input": "ok"}), 404, "model", "model_not_found", "does not exist"),
    (_body(input=3), 400, "input", "invalid_type", "string or an array"),
    (_body(input=None), 400, "input", "invalid_type", "null"),
    (_body(input={"text": "ok"}), 400, "input", "invalid_type", "an object"),
    (_body(input=[]), 400, "input", "invalid_value", "empty array"),
    (_body(input=[1, 2, 3]), 400, "input", "invalid_type", "token ids"),
    (_body(input=[[1, 2], [3]]), 400, "input", "invalid_type", "token ids"),
    (_body(input=["ok", 3]), 400, "input", "invalid_type", "input[1] must be a string"),
    (_body(input=["ok", ["nested"]]), 400, "input", "invalid_type", "input[1]"),
    (_body(input=""), 400, "input", "invalid_value", "empty"),
    (_body(input=["ok", " \n\t"]), 400, "input", "invalid_value", "input[1] is empty"),
    (_body(input=["ok"] * 9), 400, "input", "too_many_inputs", "at most 8"),
    (_body(input=["ok", "x" * 201]), 400, "input", "input_too_long", "201 characters"),
    ('{"model": "tiny", "input": "ok \\ud800"}', 400, "input", "invalid_value", "lone surrogate"),
    (_body(encoding_format="int8"), 400, "encoding_format", "invalid_value", "float"),
    (_body(dimensions=0), 400, "dimensions", "invalid_value", "from 1 to 32"),
    (_body(dimensions=33), 400, "dimensions", "invalid_value", "from 1 to 32"),
    (_body(dimensions="8"), 400, "dimensions", "invalid_value", "integer"),
    (_body(dimensions=True), 400, "dimensions", "invalid_value", "integer"),
    (_body(dimensions=8.5), 400, "dimensions", "invalid_value", "integer"),
    (_body(foo=1), 400, "foo", "unknown_parameter", "Unrecognized request argument supplied: foo"),
    (_body(user=5), 400, "user", "invalid_type", "user must be a string"),
    (_body(instruction=5), 400, "instruction", "invalid_type", "instruction must be a string"),
    (_body(instruction=" "), 400, "instruction", "invalid_value", "instruction is empty"),
    (_body(instruction="x" * 201), 400, "instruction", "input_too_long", "instruction has 201"),
    (_body(instruction=" ".join(["word"] * 40)), 400, "instruction", "invalid_value", "instruction alone"),
    (_body(input_type="passage"), 400, "input_type", "invalid_value", "query"),
    (_body(input_type="document", instruction="Find it"), 400, "instruction", "invalid_value", "document"),
]


@pytest.mark.parametrize("body, status, param, code, words", BAD_REQUESTS,
                         ids=[f"{i}-{case[3]}" for i, case in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_openai_error(running, body, status, param, code, words):
    assert words in _error(running.post(content=body.encode("utf-8")), status, param, code)


def test_body_must_be_json_in_utf8_with_distinct_keys(running, tiny):
    """Decided (OpenAI's API takes JSON): a UTF-16 body, two "model" keys (json.loads kept the last) and a
    non-JSON Content-Type were accepted; now 400, 400 and 415. No Content-Type header reads the body as
    JSON, and a UTF-8 byte order mark is ignored (RFC 8259 allows it)."""
    body = json.dumps({"model": NAME, "input": "rain"})
    message = _error(running.post(content=body.encode("utf-16")), 400, None, "invalid_json")
    assert "not UTF-8" in message and "RFC 8259" in message
    _error(running.post(content=body.encode("utf-16-le")), 400, None, "invalid_json")
    twice = '{"model": "other", "input": "rain", "model": "%s"}' % NAME
    assert "the key 'model' twice" in _error(running.post(content=twice.encode()), 400, None, "invalid_json")
    nested = '{"model": "%s", "input": "rain", "user": "u", "instruction": "a", "instruction": "b"}' % NAME
    assert "the key 'instruction' twice" in _error(running.post(content=nested.encode()), 400, None, "invalid_json")
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/json; charset=utf-16"):
        refused = running.post(content=body.encode(), headers={"Content-Type": content_type})
        assert "application/json" in _error(refused, 415, None, "unsupported_media_type")
    expected = tiny.encode(["rain"])
    for content_type in ("application/json", "application/json; charset=UTF-8", "application/vnd.api+json"):
        accepted = running.post(content=body.encode(), headers={"Content-Type": content_type})
        np.testing.assert_allclose(vectors_of(accepted), expected, **TOL)
    np.testing.assert_allclose(vectors_of(running.post(content=b"\xef\xbb\xbf" + body.encode())), expected, **TOL)


def test_non_finite_embeddings_are_a_500_not_bare_nan(tiny):
    """A model giving NaN: encode raises, so the request gets an OpenAI-shaped 500 (it was a 200 with bare NaN,
    which is not JSON); and the response writer refuses non-finite vectors from any model."""
    import torch

    from gircse.serve.protocol import embeddings_response

    broken = GIRCSE(tiny_causal_lm("llama"), tiny.tokenizer, k=3, max_length=32)
    with torch.no_grad():
        broken.model.model.norm.weight[0] = float("nan")
    with serving(broken, warmup=False) as srv:
        message = _error(srv.post({"model": NAME, "input": ["rain", "snow"]}), 500, None, "internal_error")
        assert "non-finite (NaN or infinite) embedding" in message
    with pytest.raises(ValueError, match="1 embedding\\(s\\) are not finite"):
        embeddings_response(np.array([[0.0, 1.0], [np.nan, 0.0]]), model_name=NAME, prompt_tokens=2,
                            encoding_format="float")


def test_bad_bytes_size_and_routes(running, tiny):
    _error(running.post(content=b'{"model": "tiny", "input": "\xff\xfe"}'), 400, None, "invalid_json")
    big = _body(input="x" * 5000).encode()
    assert "4096 bytes" in _error(running.post(content=big), 413, None, "request_too_large")
    # No Content-Length (chunked): the limit holds while streaming.
    streamed = running.post(content=iter([big[:3000], big[3000:]]))
    assert streamed.request.headers.get("transfer-encoding") == "chunked"
    _error(streamed, 413, None, "request_too_large")
    _error(httpx.get(running.url + "/v1/nothing"), 404, None, "not_found")
    _error(httpx.put(running.url + "/v1/embeddings"), 405, None, "method_not_allowed")
    # Still serving, and correctly.
    np.testing.assert_allclose(vectors_of(running.post({"model": NAME, "input": "rain"})), tiny.encode(["rain"]), **TOL)


def test_full_queue_answers_503_with_retry_after(tiny):
    model = InstrumentedModel(tiny)
    limits = Limits(max_inputs_per_request=4, max_input_chars=200, max_body_bytes=4096)
    with serving(model, max_batch_size=4, max_wait_ms=0, max_queue_texts=4, limits=limits, warmup=False) as srv:
        model.gate.clear()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(srv.post, {"model": NAME, "input": ["a", "b"]})
            assert model.entered.wait(30)  # the worker holds "a", "b"
            second = pool.submit(srv.post, {"model": NAME, "input": ["c", "d"]})
            deadline = time.monotonic() + 30
            while srv.batcher.outstanding < 4:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = srv.post({"model": NAME, "input": "e"})
            message = _error(refused, 503, None, "queue_full")
            assert "busy" in message and int(refused.headers["Retry-After"]) >= 1
            assert httpx.get(srv.url + "/health").status_code == 200  # the event loop is not blocked
            model.gate.set()
            np.testing.assert_allclose(vectors_of(first.result()), tiny.encode(["a", "b"]), **TOL)
            np.testing.assert_allclose(vectors_of(second.result()), tiny.encode(["c", "d"]), **TOL)
        np.testing.assert_allclose(vectors_of(srv.post({"model": NAME, "input": "e"})), tiny.encode(["e"]), **TOL)
        assert srv.batcher.stats.rejected_queue_full == 1


def test_model_failure_fails_only_its_request(tiny):
    """A batch that raises is retried request by request: the innocent request gets its embedding,
    the one whose text fails alone gets a 500, and the server goes on."""
    model = InstrumentedModel(tiny, fail_on="poison")
    with serving(model, max_batch_size=8, max_wait_ms=30_000, warmup=False) as srv:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            ok = pool.submit(srv.post, {"model": NAME, "input": ["rain", "snow", "wind", "sun"]})
            failing = pool.submit(srv.post, {"model": NAME, "input": ["poison", "x", "y", "z"]})
            np.testing.assert_allclose(vectors_of(ok.result()), tiny.encode(["rain", "snow", "wind", "sun"]), **TOL)
            assert "model failure" in _error(failing.result(), 500, None, "internal_error")
        assert srv.batcher.stats.failed_batches == 1
        texts = [f"text {i}" for i in range(8)]  # a full batch: it runs without waiting
        np.testing.assert_allclose(vectors_of(srv.post({"model": NAME, "input": texts})), tiny.encode(texts), **TOL)


# ---------------------------------------------------------------------- shutdown
def _hold_two_requests(srv, model, pool):
    """Two requests in flight while the model is held: ["a", "b"] in the model, ["c"] queued behind it."""
    model.gate.clear()
    in_model = pool.submit(srv.post, {"model": NAME, "input": ["a", "b"]})
    assert model.entered.wait(30)
    queued = pool.submit(srv.post, {"model": NAME, "input": ["c"]})
    deadline = time.monotonic() + 30
    while srv.batcher.outstanding < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return in_model, queued


def test_graceful_shutdown_finishes_in_flight_requests(tiny):
    model = InstrumentedModel(tiny)
    with serving(model, max_batch_size=2, max_wait_ms=0, warmup=False) as srv:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running_now, queued = _hold_two_requests(srv, model, pool)
            srv.server.should_exit = True  # what uvicorn's SIGTERM / SIGINT handler does
            time.sleep(0.5)
            assert srv.thread.is_alive() and not running_now.done() and not queued.done()
            with pytest.raises(httpx.ConnectError):  # no new connections while draining
                httpx.get(srv.url + "/health", timeout=5)
            model.gate.set()
            np.testing.assert_allclose(vectors_of(running_now.result()), tiny.encode(["a", "b"]), **TOL)
            np.testing.assert_allclose(vectors_of(queued.result()), tiny.encode(["c"]), **TOL)
        srv.thread.join(60)
        assert not srv.thread.is_alive()
        assert srv.batcher.closing and srv.batcher.outstanding == 0


def test_requests_open_after_the_graceful_timeout_get_503_shutting_down(tiny):
    """uvicorn cancels the requests still open when the graceful timeout runs out; they got a plain-text 500
    and the log a traceback. Now: OpenAI's error shape, 503 shutting_down."""
    model = InstrumentedModel(tiny)
    with serving(model, graceful_timeout=1, max_batch_size=2, max_wait_ms=0, warmup=False) as srv:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            in_model, queued = _hold_two_requests(srv, model, pool)
            srv.server.should_exit = True
            for pending in (in_model, queued):  # answered after ~1 s, while the model is still held
                response = pending.result(timeout=30)
                assert response.headers["content-type"] == "application/json"
                assert "graceful timeout" in _error(response, 503, None, "shutting_down")
            model.gate.set()
        srv.thread.join(60)
        assert not srv.thread.is_alive()


def test_cli_serve_sigterm_finishes_in_flight_request(tmp_path, tiny):
    """``python -m gircse serve`` on port 0: ready line, a request in flight when SIGTERM arrives is
    answered in full, then the process exits."""
    saved = str(tmp_path / "tiny")
    tiny.save_pretrained(saved)
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "gircse", "serve", "--model", saved, "--port", "0",
                             "--served-model-name", NAME, "--max-batch-size", "1", "--max-wait-ms", "0"],
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # never let the pipe fill
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("listening on" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.05)
        url = re.search(r"listening on (http://127\.0\.0\.1:\d+)", "".join(lines)).group(1)
        while True:  # the model loads after the socket is bound
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        texts = [f"text number {i} about topic {i * 7 % 11}" for i in range(32)]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, url + "/v1/embeddings", json={"model": NAME, "input": texts}, timeout=120)
            while True:  # 32 batches of one text: wait until some ran and most are left
                metrics = httpx.get(url + "/metrics").text
                if int(re.search(r"^gircse_batches_total (\d+)$", metrics, re.M).group(1)) >= 1:
                    break
                assert not pending.done(), pending.result().text
                time.sleep(0.01)
            queued = int(re.search(r"^gircse_queued_texts (\d+)$", metrics, re.M).group(1))
            proc.send_signal(signal.SIGTERM)
            response = pending.result()
        assert queued > 0  # SIGTERM arrived mid-request
        np.testing.assert_allclose(vectors_of(response), tiny.encode(texts), **TOL)
        assert proc.wait(60) == 0  # a handled SIGTERM is a normal exit (uvicorn's re-raised signal is absorbed)
        reader.join(10)
        log = "".join(lines)
        assert "gircse serve: stopped" in log and "Traceback" not in log, log[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("argv, message", [
    (["--max-batch-size", "0"], "argument --max-batch-size: must be >= 1, got 0"),
    (["--port", "70000"], "argument --port: must be from 0 to 65535, got 70000"),
    (["--max-wait-ms", "-1"], "argument --max-wait-ms: must be from 0 to 60000, got -1.0"),
    (["--max-wait-ms", "nan"], "argument --max-wait-ms: must be from 0 to 60000, got nan"),
    (["--max-body-bytes", "0"], "argument --max-body-bytes: must be >= 1, got 0"),
    (["--max-input-chars", "-1"], "argument --max-input-chars: must be >= 1, got -1"),
    (["--graceful-timeout", "-5"], "argument --graceful-timeout: must be >= 0, got -5"),
    (["--max-queue-texts", "10"], "max_queue_texts (10) must be >= max_inputs_per_request (256)"),
    (["--max-queue-texts", "4", "--max-inputs-per-request", "8"], "max_queue_texts (4) must be >= max_inputs"),
    (["--query-instruction", " "], "query_instruction must be a non-empty str or None, got ' '"),
])
def test_cli_rejects_bad_settings_in_one_line_exit_2(argv, message, capsys, no_model_loading):
    """They exited 1 (SystemExit with a message); the CLI contract is one line, status 2, before loading."""
    from gircse import cli

    try:
        status = cli.main(["serve", "--model", "unused", *argv])
    except SystemExit as exit_info:  # errors of the parser itself
        status = exit_info.code
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("gircse serve: ") and message in err and err.count("\n") == 1, err
    args = cli.build_parser().parse_args(["serve", "--model", "m", "--port", "0"])
    assert args.func.__name__ == "run_serve" and args.max_batch_size == 32 and args.max_wait_ms == 5.0


def test_batcher_drops_texts_of_cancelled_requests():
    """A request whose client went away (its future cancelled) costs no model time."""
    from gircse.serve.batcher import DynamicBatcher

    calls = []

    def embed(texts, instructions):
        calls.append(list(texts))
        return np.ones((len(texts), 2), dtype=np.float32)

    async def scenario():
        batcher = DynamicBatcher(embed, max_batch_size=8, max_wait_s=0.2)
        await batcher.start()
        gone = batcher.submit(["a"], [None], [1])
        kept = batcher.submit(["b", "c"], [None, "Find"], [1, 2])
        gone.cancel()
        vectors = await kept
        assert await batcher.close() == 0
        return batcher, vectors

    batcher, vectors = asyncio.run(scenario())
    assert calls == [["b", "c"]] and vectors.shape == (2, 2)
    assert batcher.outstanding == 0 and batcher.stats.requests == 1

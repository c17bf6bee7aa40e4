"""The FastAPI application: ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

Threads: the event loop only moves bytes and futures. A *codec* thread parses and validates request
bodies, counts tokens (with its own copy of the tokenizer, so it never shares one with the model)
and serializes responses; the batcher's *model* thread runs ``GIRCSE.encode``. Each text is
embedded by ``encode`` in a batch with other requests' texts. Left padding with real-token position
ids makes that equal to encoding it alone up to accumulated float rounding in fp32 (the model's batch
invariance, tests/gircse/test_model_generation.py: the tiny test models stay within 2e-5). In bf16 the batch's shape changes results at bf16 precision.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .batcher import DynamicBatcher, QueueFull, ShuttingDown
from .protocol import (APIError, Limits, check_content_type, check_positive_int, embeddings_response,
                       parse_embedding_request, truncate_dimensions)

logger = logging.getLogger("gircse.serve")

__all__ = ["ServeConfig", "create_app"]


@dataclass(frozen=True)
class ServeConfig:
    """Everything about the server but the model. ``model_name`` is the id clients send as ``model``."""

    model_name: str = "gircse"
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue_texts: int = 1024
    limits: Limits = field(default_factory=Limits)
    query_instruction: str | None = None  # for input_type "query" without an instruction
    warmup: bool = True

    def __post_init__(self):
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"model_name must be a non-empty str, got {self.model_name!r}")
        check_positive_int("max_batch_size", self.max_batch_size)
        check_positive_int("max_queue_texts", self.max_queue_texts)
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) \
                or not 0 <= self.max_wait_ms <= 60_000:
            raise ValueError(f"max_wait_ms must be a number from 0 to 60000, got {self.max_wait_ms!r}")
        if self.max_queue_texts < self.limits.max_inputs_per_request:
            raise ValueError(f"max_queue_texts ({self.max_queue_texts}) must be >= max_inputs_per_request "
                             f"({self.limits.max_inputs_per_request}), or a full-size request could never run")
        if self.query_instruction is not None and (not isinstance(self.query_instruction, str)
                                                   or not self.query_instruction.strip()):
            raise ValueError(f"query_instruction must be a non-empty str or None, got {self.query_instruction!r}")


class _Embedder:
    """The model side: token counts (codec thread) and ``encode`` (model thread)."""

    def __init__(self, model):
        self.model = model
        self.tokenizer = copy.deepcopy(model.tokenizer)  # the codec thread's own: tokenizers are not shareable

    def token_counts(self, texts: list[str], instruction: str | None) -> list[int]:
        """Tokens per text as the model reads it (``GIRCSE.count_tokens``: prompt format, special
        tokens, EOS, truncation to ``max_length``): the ``usage`` numbers."""
        try:
            return self.model.count_tokens(texts, instruction, tokenizer=self.tokenizer)
        except ValueError as error:  # e.g. the instruction alone fills max_length
            raise APIError(400, str(error), param="instruction" if instruction else "input",
                           code="invalid_value") from None

    def encode(self, texts: list[str], instructions: list) -> np.ndarray:
        return self.model.encode(texts, instructions, batch_size=len(texts), normalize_embeddings=True,
                                 show_progress_bar=False)


async def _read_body(request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it exceeds ``limit`` bytes (declared or streamed)."""
    too_large = APIError(413, f"the request body exceeds this server's limit of {limit} bytes", param=None,
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def create_app(model, config: ServeConfig | None = None):
    """A FastAPI app serving ``model`` (a :class:`gircse.GIRCSE`, used through ``encode``,
    ``count_tokens``, ``tokenizer``, ``max_length``, ``method``, ``k`` and ``embedding_dim`` only)."""
    config = config or ServeConfig()
    embedder = _Embedder(model)
    batcher = DynamicBatcher(embedder.encode, max_batch_size=config.max_batch_size,
                             max_wait_s=config.max_wait_ms / 1000.0, max_queue_texts=config.max_queue_texts)
    codec = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gircse-codec")
    responses: dict[int, int] = {}  # HTTP status -> count
    created = int(time.time())
    dim = model.embedding_dim

    def answer_error(error: APIError) -> JSONResponse:
        responses[error.status] = responses.get(error.status, 0) + 1
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        if config.warmup:  # first-call costs (allocations, kernel selection) before the first client
            await batcher.run_in_worker(embedder.encode, ["warm-up"], [None])
        logger.info("gircse serve: model %r ready (method=%s, k=%s, d=%d, max_length=%d, max batch %d, "
                    "max wait %.1f ms)", config.model_name, model.method, model.k, dim, model.max_length,
                    config.max_batch_size, config.max_wait_ms)
        try:
            yield
        finally:
            # uvicorn has already waited for open connections (in-flight requests); anything still
            # queued here (e.g. after its graceful timeout) is finished before the worker stops.
            unanswered = await batcher.close()
            codec.shutdown(wait=True)
            logger.info("gircse serve: stopped; %d requests served in %d batches%s", batcher.stats.requests,
                        batcher.stats.batches, f" ({unanswered} finished during shutdown)" if unanswered else "")

    app = FastAPI(title="gircse serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def on_api_error(request, error: APIError):
        return answer_error(error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, error: StarletteHTTPException):  # unknown route, wrong method
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = f"{request.method} {request.url.path}: {error.detail}"
        return answer_error(APIError(error.status_code, message, code=code, headers=dict(error.headers or {})))

    def prepare(body: bytes):
        request = parse_embedding_request(body, model_name=config.model_name, embedding_dim=dim,
                                          limits=config.limits, query_instruction=config.query_instruction)
        return request, embedder.token_counts(request.texts, request.instruction)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        loop = asyncio.get_running_loop()
        try:
            check_content_type(request.headers.get("content-type"))
            batcher.check_capacity()  # a cheap refusal before reading anything when already full
            body = await _read_body(request, config.limits.max_body_bytes)
            parsed, lengths = await loop.run_in_executor(codec, prepare, body)
            future = batcher.submit(parsed.texts, [parsed.instruction] * len(parsed.texts), lengths)
            vectors = truncate_dimensions(await future, parsed.dimensions)
            content = await loop.run_in_executor(codec, lambda: embeddings_response(
                vectors, model_name=config.model_name, prompt_tokens=sum(lengths),
                encoding_format=parsed.encoding_format))
        except APIError as error:
            return answer_error(error)
        except QueueFull as error:
            return answer_error(APIError(503, str(error), code="queue_full",
                                         headers={"Retry-After": str(error.retry_after)}))
        except ShuttingDown as error:
            return answer_error(APIError(503, str(error), code="shutting_down"))
        except ClientDisconnect:
            return answer_error(APIError(400, "the client disconnected before sending the whole body"))
        except asyncio.CancelledError:
            # uvicorn cancels the requests still open when --graceful-timeout runs out; answered here, the
            # client gets an OpenAI-shaped 503 instead of a plain-text 500 (and the log a traceback).
            return answer_error(APIError(503, "the server is shutting down and its graceful timeout ran out "
                                              "before this request was embedded; retry on another server",
                                         code="shutting_down"))
        except Exception as error:  # a bug or a model failure: this request fails, the server stays up
            logger.exception("request failed")
            return answer_error(APIError(500, f"the server failed to embed this request: "
                                              f"{type(error).__name__}: {error}", code="internal_error"))
        responses[200] = responses.get(200, 0) + 1
        return Response(content=content, media_type="application/json")

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "gircse",
                "embedding_dim": dim, "method": model.method, "k": model.k, "max_length": model.max_length}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != config.model_name:
            raise APIError(404, f"The model '{model_id:.200}' does not exist; this server serves "
                                f"'{config.model_name}'", param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        if batcher.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "model": config.model_name, "queued_texts": batcher.outstanding}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus_text(batcher, responses))

    return app


def _prometheus_text(batcher: DynamicBatcher, responses: dict[int, int]) -> str:
    """Prometheus text exposition of the batcher's counters and the responses by status."""
    s = batcher.stats
    rows = [
        ("gircse_requests_embedded_total", "counter", "requests answered with embeddings", s.requests),
        ("gircse_texts_embedded_total", "counter", "texts embedded", s.texts),
        ("gircse_batches_total", "counter", "model calls (batches)", s.batches),
        ("gircse_multi_request_batches_total", "counter", "batches holding texts of more than one request",
         s.multi_request_batches),
        ("gircse_batch_size_max", "gauge", "largest batch so far (texts)", s.largest_batch),
        ("gircse_failed_batches_total", "counter", "batches that raised (their requests were retried alone)",
         s.failed_batches),
        ("gircse_rejected_queue_full_total", "counter", "requests refused with 503 because the queue was full",
         s.rejected_queue_full),
        ("gircse_model_seconds_total", "counter", "seconds the model thread spent in encode", round(s.model_seconds, 6)),
        ("gircse_queued_texts", "gauge", "texts accepted and not yet embedded", batcher.outstanding),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ["# HELP gircse_batches_by_size_total batches by number of texts",
              "# TYPE gircse_batches_by_size_total counter"]
    lines += [f'gircse_batches_by_size_total{{size="{n}"}} {count}' for n, count in sorted(s.batch_sizes.items())]
    lines += ["# HELP gircse_http_responses_total /v1/embeddings and error responses by status",
              "# TYPE gircse_http_responses_total counter"]
    lines += [f'gircse_http_responses_total{{status="{code}"}} {count}' for code, count in sorted(responses.items())]
    return "\n".join(lines) + "\n"

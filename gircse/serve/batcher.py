"""Dynamic batching: the texts of concurrent requests share model calls, on one worker thread.

The event loop only queues work and wakes waiters; the model runs on a dedicated thread, so the
loop keeps answering (health checks, 503s, other requests' parsing) while a batch computes.

A *round* starts when the first waiting text is ``max_wait_s`` old or ``max_batch_size`` texts wait
(a busy worker therefore starts the next round at once with everything that arrived meanwhile).
The round takes every waiting text, sorts them by token count (shortest first: short requests
finish early, and texts of similar length share a batch, so little padding) and runs them in
batches of at most ``max_batch_size``. A request is answered as soon as its last text is done.
Texts that arrive during a round wait for the next one, so no request waits more than a round.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .protocol import check_positive_int

logger = logging.getLogger("gircse.serve")

__all__ = ["BatcherStats", "DynamicBatcher", "QueueFull", "ShuttingDown"]

# (texts, per-text instructions) -> [n, d] float32, called on the worker thread only.
EmbedFn = Callable[[list[str], list], np.ndarray]


class QueueFull(Exception):
    """The bounded queue cannot take the request; ``retry_after`` (s) estimates when it could."""

    def __init__(self, queued: int, limit: int, retry_after: int):
        super().__init__(f"the server is busy: {queued} texts are queued (limit {limit}); retry in "
                         f"{retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is draining: in-flight requests finish, new ones are refused."""


@dataclass
class BatcherStats:
    """Counters since start. ``multi_request_batches`` counts model calls that served texts of more
    than one request: the direct evidence that dynamic batching happened."""

    requests: int = 0
    texts: int = 0
    batches: int = 0
    multi_request_batches: int = 0
    largest_batch: int = 0
    failed_batches: int = 0
    rejected_queue_full: int = 0
    model_seconds: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)


@dataclass(eq=False)
class _Job:
    """One request: its texts, per-text instructions and token counts; filled in batch by batch."""

    texts: list[str]
    instructions: list
    lengths: list[int]
    future: asyncio.Future
    arrival: float
    vectors: np.ndarray | None = None
    remaining: int = 0


class DynamicBatcher:
    """Gathers texts from concurrent requests into batches for one model worker thread.

    ``embed(texts, instructions)`` runs on the worker thread and returns ``[n, d]`` float32.
    ``max_queue_texts`` bounds the texts accepted and not yet embedded (queued or in the running
    round); :meth:`submit` raises :class:`QueueFull` beyond it.
    """

    def __init__(self, embed: EmbedFn, *, max_batch_size: int = 32, max_wait_s: float = 0.005,
                 max_queue_texts: int = 1024):
        check_positive_int("max_batch_size", max_batch_size)
        check_positive_int("max_queue_texts", max_queue_texts)
        if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, (int, float)) or not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be a number >= 0, got {max_wait_s!r}")
        self.embed = embed
        self.max_batch_size, self.max_wait_s, self.max_queue_texts = max_batch_size, float(max_wait_s), max_queue_texts
        self.stats = BatcherStats()
        self.outstanding = 0  # texts accepted and not yet embedded (or dropped)
        self.closing = False
        self._pending: deque[_Job] = deque()
        self._pending_texts = 0
        self._unanswered: set[_Job] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._arrived: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._texts_per_second: float | None = None  # moving average, for Retry-After

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gircse-model")
        self._arrived, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gircse-batcher")

    async def run_in_worker(self, fn, *args):
        """Run ``fn(*args)`` on the model thread (e.g. a warm-up call), after any batch in progress."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self) -> int:
        """Refuse new work, finish every accepted text, stop the worker. Returns the number of
        requests that were still in flight when closing began."""
        self.closing = True
        in_flight = len(self._unanswered)
        if self._task is not None and not self._task.done():  # (a dead loop would never become idle)
            idle = asyncio.ensure_future(self._idle.wait())
            await asyncio.wait([idle, self._task], return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        return in_flight

    # ------------------------------------------------------------------ submitting
    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: queued texts / recent throughput, 1..60."""
        if not self._texts_per_second:
            return 1
        return int(min(60, max(1, math.ceil(self.outstanding / self._texts_per_second))))

    def check_capacity(self, n_texts: int = 1) -> None:
        """Raise :class:`ShuttingDown` or :class:`QueueFull` if ``n_texts`` more cannot be accepted."""
        if self.closing:
            raise ShuttingDown("the server is shutting down")
        if self.outstanding + n_texts > self.max_queue_texts:
            self.stats.rejected_queue_full += 1
            raise QueueFull(self.outstanding, self.max_queue_texts, self.retry_after())

    def submit(self, texts: list[str], instructions: list, lengths: list[int]) -> asyncio.Future:
        """Queue one request's texts; the future resolves to its ``[n, d]`` vectors in input order.
        Cancelling the future drops the texts not yet embedded."""
        if not len(texts) == len(instructions) == len(lengths) or not texts:
            raise ValueError("texts, instructions and lengths must be non-empty and of equal length")
        self.check_capacity(len(texts))
        loop = asyncio.get_running_loop()
        job = _Job(list(texts), list(instructions), list(lengths), loop.create_future(), loop.time(),
                   remaining=len(texts))
        self._pending.append(job)
        self._unanswered.add(job)
        job.future.add_done_callback(lambda _: self._unanswered.discard(job))
        self._pending_texts += len(texts)
        self.outstanding += len(texts)
        self._idle.clear()
        self._arrived.set()
        return job.future

    # ------------------------------------------------------------------ the batching loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            # Wait for company: until the batch is full or the oldest text has waited max_wait_s.
            while self._pending_texts < self.max_batch_size:
                remaining = self._pending[0].arrival + self.max_wait_s - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            jobs = list(self._pending)
            self._pending.clear()
            self._pending_texts = 0
            items = sorted(((job, i) for job in jobs for i in range(len(job.texts))),
                           key=lambda item: item[0].lengths[item[1]])
            for start in range(0, len(items), self.max_batch_size):
                await self._run_batch(items[start:start + self.max_batch_size])

    async def _run_batch(self, items: list[tuple[_Job, int]]) -> None:
        live = [(job, i) for job, i in items if not job.future.done()]  # cancelled or failed: skip
        self._release(len(items) - len(live))
        if not live:
            return
        loop = asyncio.get_running_loop()
        texts = [job.texts[i] for job, i in live]
        instructions = [job.instructions[i] for job, i in live]
        start = time.perf_counter()
        try:
            vectors = await loop.run_in_executor(self._executor, self.embed, texts, instructions)
            self._record(live, time.perf_counter() - start)
            self._deliver(live, vectors)
        except Exception:
            # Never let one request's failure answer for another: retry each request's texts alone.
            self.stats.failed_batches += 1
            logger.exception("batch of %d texts failed; retrying each request alone", len(live))
            for job in dict.fromkeys(job for job, _ in live):
                own = [(j, i) for j, i in live if j is job]
                try:
                    vectors = await loop.run_in_executor(self._executor, self.embed, [job.texts[i] for _, i in own],
                                                         [job.instructions[i] for _, i in own])
                    self._deliver(own, vectors)
                except Exception as error:
                    logger.exception("request with %d texts failed alone", len(job.texts))
                    if not job.future.done():
                        job.future.set_exception(error)
        finally:
            self._release(len(live))

    def _release(self, n_texts: int) -> None:
        self.outstanding -= n_texts
        if self.outstanding == 0:
            self._idle.set()

    def _deliver(self, items: list[tuple[_Job, int]], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape[0] != len(items):
            raise RuntimeError(f"embed returned {vectors.shape[0]} vectors for {len(items)} texts")
        for (job, i), vector in zip(items, vectors):
            if job.future.done():
                continue
            if job.vectors is None:
                job.vectors = np.empty((len(job.texts), vectors.shape[1]), dtype=np.float32)
            job.vectors[i] = vector
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.vectors)
                self.stats.requests += 1

    def _record(self, items: list[tuple[_Job, int]], seconds: float) -> None:
        stats, n = self.stats, len(items)
        n_requests = len({id(job) for job, _ in items})
        stats.batches += 1
        stats.texts += n
        stats.model_seconds += seconds
        stats.largest_batch = max(stats.largest_batch, n)
        stats.multi_request_batches += n_requests > 1
        stats.batch_sizes[n] = stats.batch_sizes.get(n, 0) + 1
        rate = n / max(seconds, 1e-6)
        self._texts_per_second = rate if self._texts_per_second is None else 0.8 * self._texts_per_second + 0.2 * rate
        logger.debug("batch %d: %d texts from %d requests in %.1f ms (%d texts outstanding)", stats.batches, n,
                     n_requests, seconds * 1e3, self.outstanding - n)

"""Dynamic batching: coalesce concurrent queries into padded forward passes in one thread.

Request handlers ``await submit(...)`` (or ``submit_labels``); a dedicated worker thread takes
up to ``max_batch_size`` queued queries (waiting at most ``max_wait_ms`` after the oldest
arrived), groups them by length so that padding stays small, runs the forward pass (torch
releases the GIL, so the event loop keeps answering) and resolves the handlers' futures.

A request's queries may land in different forward passes; each request has one future, resolved
when its last query is scored, and each forward pass wakes the event loop once, not per query.

When a handler is cancelled (its client went away: ``Guard`` watches the connection), its
queries that no forward pass has started are dropped at once, so a killed client's queued work
is never computed; those already inside a running pass finish (torch cannot be interrupted) and
their results are discarded.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .engine import Encoded, Engine, ItemOutput

logger = logging.getLogger("dect_maas_server")

#: Test-only: while the file named here exists, every forward pass waits before it starts (its
#: rows already taken from the queue), and ``<file>.held`` is created, so that a test can build
#: a queue behind a pass deterministically. Read by the CLI; never set it in production.
TEST_HOLD_ENV = "DECT_MAAS_SERVER_TEST_HOLD"


def wait_while_held(hold_file: str | None) -> None:
    """In the model thread, before a forward pass: wait while the test hold file exists."""
    if not hold_file or not os.path.exists(hold_file):
        return
    with open(hold_file + ".held", "w"):
        pass
    while os.path.exists(hold_file):
        time.sleep(0.005)


@dataclass
class DroppedRows:
    """How many of one HTTP request's queued rows were dropped because its client went away."""

    rows: int = 0


#: Set by ``Guard`` around each request, so the batchers, which drop rows in the cancelled
#: handler's own context, can tell the one log line per abandoned request how many there were.
dropped_rows: ContextVar[DroppedRows | None] = ContextVar("dect_maas_dropped_rows", default=None)


class QueueFull(Exception):
    """More queued queries than ``max_queue``; the client should retry after ``retry_after`` s."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class LabelResult:
    """A ``submit_labels`` request's results, one row per input (float32)."""

    logits: npt.NDArray[np.float32]  # [N, L] raw logits of the label ids
    logprobs: npt.NDArray[np.float32]  # [N, L] log-softmax over the vocabulary of the same ids
    hidden: npt.NDArray[np.float32]  # [N, H] last-layer hidden state at the scoring position


class _Request:
    """One ``submit`` call: its queries' results are gathered here until the last one lands."""

    __slots__ = ("all_positions", "future", "labels", "left", "loop", "outputs", "pooled", "result")

    def __init__(
        self,
        n: int,
        loop: asyncio.AbstractEventLoop,
        *,
        labels: tuple[int, ...] | None,
        hidden_size: int,
        pooled: bool,
        all_positions: bool,
    ) -> None:
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self.left = n
        self.labels = labels
        self.pooled = pooled
        self.all_positions = all_positions
        self.outputs: list[ItemOutput | None] = []
        self.result: LabelResult | None = None
        if labels is None:
            self.outputs = [None] * n
        else:
            self.result = LabelResult(
                np.empty((n, len(labels)), dtype=np.float32),
                np.empty((n, len(labels)), dtype=np.float32),
                np.empty((n, hidden_size), dtype=np.float32),
            )

    def value(self) -> Any:
        return self.result if self.labels is not None else self.outputs


@dataclass(slots=True)
class _Job:
    encoded: Encoded
    request: _Request
    slot: int  # index of this query in its request
    enqueued: float = field(default_factory=time.monotonic)


def split_by_length(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group indices (sorted by length) so each group pads little and stays under a token cap.

    A new group starts when the next input is more than 1.5x (+8 tokens) longer than the
    shortest in the group, or when the padded group would exceed ``max_tokens``.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            g = groups[-1]
            shortest = lengths[g[0]]
            if lengths[i] <= shortest * 1.5 + 8 and (len(g) + 1) * lengths[i] <= max_tokens:
                g.append(i)
                continue
        groups.append([i])
    return groups


class Metrics:
    """Counters read by ``GET /metrics``; written by the worker and the handlers."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.requests = 0
        self.queries = 0
        self.rejected = 0
        self.batches = 0
        self.batch_hist: collections.Counter[int] = collections.Counter()
        self.forward_seconds = 0.0
        self.forward_cpu_seconds = 0.0  # CPU time of the worker thread inside the forward pass
        self.tokenize_cpu_seconds = 0.0  # CPU time of the tokenizer threads
        self.recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)
        # Connections, written by the event loop (protocol.py), never by the worker.
        self.connections_open = 0
        self.connections_shed = 0  # closed to make room while waiting for a request head
        self.header_timeouts = 0
        self.body_timeouts = 0
        self.headers_too_large = 0
        # Clients that went away before their answer, and the queued rows not computed for them.
        self.requests_abandoned = 0
        self.rows_dropped = 0
        self.lock = threading.Lock()

    def record_batch(self, size: int, seconds: float, cpu_seconds: float = 0.0) -> None:
        with self.lock:
            self.batches += 1
            self.queries += size
            self.batch_hist[size] += 1
            self.forward_seconds += seconds
            self.forward_cpu_seconds += cpu_seconds
            self.recent.append((time.monotonic(), size))

    def record_tokenize(self, cpu_seconds: float) -> None:
        with self.lock:
            self.tokenize_cpu_seconds += cpu_seconds

    def record_dropped(self, rows: int) -> None:
        """Rows of a cancelled handler taken off a queue; call it in the handler's context."""
        with self.lock:
            self.rows_dropped += rows
        record = dropped_rows.get()
        if record is not None:
            record.rows += rows

    def snapshot(self, queue_depth: int) -> dict[str, Any]:
        with self.lock:
            now = time.monotonic()
            window = [(t, n) for t, n in self.recent if now - t <= 60.0]
            span = min(60.0, now - self.started)
            recent_q = sum(n for _, n in window)
            hist = {str(k): v for k, v in sorted(self.batch_hist.items())}
            return {
                "uptime_s": round(now - self.started, 3),
                "queue_depth": queue_depth,
                "requests_total": self.requests,
                "queries_total": self.queries,
                "rejected_total": self.rejected,
                "batches_total": self.batches,
                "batch_size_mean": (self.queries / self.batches) if self.batches else 0.0,
                "batch_size_histogram": hist,
                "forward_seconds_total": round(self.forward_seconds, 6),
                # The server's own CPU time, the part spent in forward passes and the part
                # tokenizing (in a thread pool, mostly without the GIL): what is left per query
                # is the serial request path (HTTP, JSON, batching), the bound on a GPU.
                "process_cpu_seconds_total": round(time.process_time(), 6),
                "forward_cpu_seconds_total": round(self.forward_cpu_seconds, 6),
                "tokenize_cpu_seconds_total": round(self.tokenize_cpu_seconds, 6),
                "connections_open": self.connections_open,
                "connections_shed_total": self.connections_shed,
                "header_timeouts_total": self.header_timeouts,
                "body_timeouts_total": self.body_timeouts,
                "headers_too_large_total": self.headers_too_large,
                "requests_abandoned_total": self.requests_abandoned,
                "rows_dropped_total": self.rows_dropped,
                "throughput_qps_60s": (recent_q / span) if span > 0 else 0.0,
                "forward_qps": (self.queries / self.forward_seconds)
                if self.forward_seconds
                else 0.0,
            }


class Batcher:
    """Owns the worker thread; one per server."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        max_batch_tokens: int,
        metrics: Metrics,
        test_hold_file: str | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.metrics = metrics
        self.test_hold_file = test_hold_file
        self._pending: collections.deque[_Job] = collections.deque()
        # Groups taken from ``_pending`` by the worker whose forward pass has not started yet.
        self._taken: collections.deque[list[_Job]] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dect-maas-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    @property
    def depth(self) -> int:
        return len(self._pending)

    async def submit(
        self,
        items: list[Encoded],
        *,
        pooled: bool = False,
        all_positions: bool = False,
    ) -> list[ItemOutput]:
        """Queue ``items`` for full-vocabulary outputs; all or none are accepted (``QueueFull``)."""
        req = _Request(
            len(items),
            asyncio.get_running_loop(),
            labels=None,
            hidden_size=self.engine.hidden_size,
            pooled=pooled,
            all_positions=all_positions,
        )
        return list(await self._enqueue(req, items))

    async def submit_labels(self, items: list[Encoded], label_ids: Sequence[int]) -> LabelResult:
        """Queue ``items`` for ``label_ids``' scores and the hidden state (``/v1/features``)."""
        req = _Request(
            len(items),
            asyncio.get_running_loop(),
            labels=tuple(label_ids),
            hidden_size=self.engine.hidden_size,
            pooled=False,
            all_positions=False,
        )
        result: LabelResult = await self._enqueue(req, items)
        return result

    async def _enqueue(self, req: _Request, items: list[Encoded]) -> Any:
        if not items:
            return req.value()
        now = time.monotonic()
        jobs = [_Job(it, req, slot, now) for slot, it in enumerate(items)]
        with self._cond:
            if self._stopping:
                raise QueueFull(retry_after=5)
            if len(self._pending) + len(jobs) > self.max_queue:
                with self.metrics.lock:
                    self.metrics.rejected += 1
                raise QueueFull(retry_after=self._retry_after(len(jobs)))
            self._pending.extend(jobs)
            self._cond.notify()
        try:
            return await req.future
        except asyncio.CancelledError:
            self._drop(req)
            raise

    def _drop(self, req: _Request) -> None:
        """The handler of ``req`` was cancelled: take its rows that no pass has started off the
        queue (and off the groups the worker has taken but not started), so they are never
        computed; a pass already running finishes and ``_resolve`` skips the cancelled future."""
        with self._cond:
            before = len(self._pending) + sum(len(g) for g in self._taken)
            self._pending = collections.deque(j for j in self._pending if j.request is not req)
            groups = [[j for j in g if j.request is not req] for g in self._taken]
            self._taken = collections.deque(g for g in groups if g)
            dropped = before - len(self._pending) - sum(len(g) for g in self._taken)
        if dropped:
            self.metrics.record_dropped(dropped)

    def _retry_after(self, extra: int) -> int:
        snap = self.metrics.snapshot(len(self._pending))
        rate = snap["forward_qps"] or 1.0
        return max(1, math.ceil((len(self._pending) + extra - self.max_queue) / rate))

    # -- worker thread ------------------------------------------------------------------

    def _take(self) -> bool:
        """Move the next batch from ``_pending`` to ``_taken``, split into groups of similar
        length, under one hold of the lock, so that ``_drop`` always finds a row not started;
        False when stopping."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending:
                return False
            deadline = self._pending[0].enqueued + self.max_wait
            while len(self._pending) < self.max_batch_size and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if len(self._pending) <= self.max_batch_size:
                batch = list(self._pending)
                self._pending.clear()
                self._split(batch)
                return True
            # More than a batch waiting: the oldest job plus those closest to it in length.
            pending = list(self._pending)
            order = sorted(range(len(pending)), key=lambda i: len(pending[i].encoded.ids))
            pos = order.index(0)
            best_lo, best_span = 0, math.inf
            for lo in range(
                max(0, pos - self.max_batch_size + 1),
                min(pos, len(order) - self.max_batch_size) + 1,
            ):
                hi = lo + self.max_batch_size - 1
                span = len(pending[order[hi]].encoded.ids) - len(pending[order[lo]].encoded.ids)
                if span < best_span:
                    best_lo, best_span = lo, span
            chosen = set(order[best_lo : best_lo + self.max_batch_size])
            batch = [pending[i] for i in sorted(chosen)]
            self._pending = collections.deque(p for i, p in enumerate(pending) if i not in chosen)
            self._split(batch)
            return True

    def _split(self, batch: list[_Job]) -> None:
        """Queue ``batch``'s forward passes: groups that pad little and fit the token cap."""
        lengths = [len(j.encoded.ids) for j in batch]
        for group in split_by_length(lengths, self.max_batch_tokens):
            self._taken.append([batch[i] for i in group])

    def _next_group(self) -> list[_Job] | None:
        """The jobs of the next forward pass (a group of the last batch taken, or of a new one);
        None when stopping."""
        while True:
            with self._cond:
                if self._taken:
                    return self._taken.popleft()
            if not self._take():
                return None

    def _run(self) -> None:
        while True:
            jobs = self._next_group()
            if jobs is None:
                return
            self._forward(jobs)

    def _forward(self, jobs: list[_Job]) -> None:
        """One forward pass; scatter its rows into the requests; wake each event loop once."""
        by_request: dict[_Request, tuple[list[int], list[int]]] = {}
        for row, j in enumerate(jobs):
            entry = by_request.get(j.request)
            if entry is None:
                entry = by_request[j.request] = ([], [])
            entry[0].append(row)
            entry[1].append(j.slot)
        union: dict[int, int] = {}  # label id -> column, over the group's label requests
        for req in by_request:
            for t in req.labels or ():
                union.setdefault(t, len(union))
        wait_while_held(self.test_hold_file)
        started, cpu = time.monotonic(), time.thread_time()
        try:
            scores = self.engine.score(
                [j.encoded for j in jobs],
                label_ids=list(union),
                full=[j.request.labels is None for j in jobs],
                want_pooled=[j.request.pooled for j in jobs],
                want_all=[j.request.all_positions for j in jobs],
            )
        except Exception as exc:  # the handlers turn this into a 500
            logger.exception("forward pass failed for a batch of %d", len(jobs))
            failed: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Any]]] = {}
            for req in by_request:
                req.left = -1  # never resolved with a result now
                failed.setdefault(req.loop, []).append((req, exc))
            for loop, reqs in failed.items():
                loop.call_soon_threadsafe(_resolve, reqs)
            return
        self.metrics.record_batch(len(jobs), time.monotonic() - started, time.thread_time() - cpu)
        done: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Any]]] = {}
        for req, (rows, slots) in by_request.items():
            if req.left < 0:
                continue
            if req.result is not None:
                assert req.labels is not None
                r = np.asarray(rows)
                s = np.asarray(slots)
                cols = np.fromiter((union[t] for t in req.labels), dtype=np.int64)
                req.result.logits[s] = scores.label_logits[r[:, None], cols]
                req.result.logprobs[s] = scores.label_logprobs[r[:, None], cols]
                req.result.hidden[s] = scores.hidden[r]
            else:
                for row, slot in zip(rows, slots, strict=True):
                    req.outputs[slot] = scores.full[row]
            req.left -= len(rows)
            if req.left == 0:
                done.setdefault(req.loop, []).append((req, None))
        for loop, reqs in done.items():
            loop.call_soon_threadsafe(_resolve, reqs)


def _resolve(requests: list[tuple[_Request, BaseException | None]]) -> None:
    """In the event loop: finish the futures of completed (or failed) requests."""
    for req, exc in requests:
        if req.future.done():  # the handler was cancelled (client went away)
            continue
        if exc is not None:
            req.future.set_exception(exc)
        else:
            req.future.set_result(req.value())

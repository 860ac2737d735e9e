"""The client: the only place in dect-maas that touches the network.

One request, top to bottom (``Client._send_all`` and ``Client._call``): the cache was looked up for
every example first (hits are counted, never billed) -> the request's worst case was reserved in
the ledger (``BudgetExceeded`` before anything leaves) -> acquire the rate limiter -> record it
as sent in the ledger (write ahead: after a crash it counts at its worst case, never as zero) ->
send, retrying per ``RetryPolicy`` -> parse -> write the cache -> settle the ledger to the actual
usage (refund it if it failed before leaving or was answered with an error; settle it at its
worst case as ``unknown`` if it left and its outcome is unknown).

A stop request (``request_stop``, from the CLI's SIGINT/SIGTERM handler) ends sending: nothing
new leaves, requests in flight get ``STOP_GRACE_S`` to finish and are settled, then
``Interrupted`` is raised.

Requests go out through ``max_concurrency`` workers. Each worker holds reservations for its next
``AHEAD`` requests and hands every answer to the client's bookkeeping thread
(``_bookkeeper.Bookkeeper``), which writes it to the cache and settles it in a ledger transaction
that also reserves one more request. So the next request leaves at once, a slow disk does not
hold up the network, and answers that queue up are written together; the budget still sees
every request's worst case before it leaves.

Units. A *query* is one example's forward pass on one endpoint (the paper's unit, what providers
bill); a *request* is one HTTP call carrying one or more queries. When scores and vectors come from
two endpoints, an example costs two queries. A *hit* is an example answered from the cache.

The core is async (``afeatures``); ``features`` is a plain synchronous call that runs it on a loop
the client owns. Blocking cache and ledger calls run in a thread: the bookkeeping thread for
everything a request writes, ``asyncio.to_thread`` for reads and for the few writes made before
any request leaves (the discovery answer, label-word ids, the count of cache hits).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import tempfile
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from random import Random
from types import TracebackType
from typing import Any, TypeVar

import httpx
import numpy as np

from dect_maas._exceptions import (
    BudgetExceeded,
    CacheError,
    CensoredScoreWarning,
    ConfigError,
    Interrupted,
    LedgerError,
    MalformedResponse,
    MultiTokenLabelWarning,
    ProviderStatusError,
    TransportError,
    UnsupportedCapability,
    warn,
)
from dect_maas._features import FeatureMeta, Features
from dect_maas._task import Task
from dect_maas.adapters._base import Adapter, Label, Prompt, RequestSpec, Role, price_for

from .batch_check import MIN_COSINE, PROBES, agreement, probe_key, verdict_key
from .bookkeeper import Bookkeeper
from .budget import BudgetLimits, Usage
from .cache import CacheConfig, ResponseCache, cache_key
from .ledger import Ledger, LedgerRecord, Reservation, Settlement
from .ratelimit import RateLimiter
from .retry import Attempts, Retrier, TruncatedResponse, error_for_status, map_httpx_error
from .settings import Credentials, RateLimit, RetryPolicy

__all__ = ["Client", "Estimate"]

logger = logging.getLogger("dect_maas")
T = TypeVar("T")
Record = dict[str, Any]
Progress = bool | Callable[[int, int], None]

KEY_SCHEMA = "dect-maas/example/1"
_CONTENT_FREE = -1
_HTTPX_ERRORS = (httpx.HTTPError, httpx.InvalidURL, httpx.CookieConflict, httpx.StreamError)


@dataclass(frozen=True)
class Estimate:
    """What ``features`` would send for these texts now, given what is already cached.

    ``queries``/``requests`` are exact. ``input_tokens`` and ``cost_usd`` are the worst case the
    budget would reserve (a byte count bounds the token count); the provider's own count, settled
    after each request, is at most this. ``assumptions`` lists what could not be known without
    sending (e.g. label token ids never resolved yet: then nothing is counted as cached for scores).
    """

    queries: int
    requests: int
    input_tokens: int
    cost_usd: float
    cached_queries: int
    total_queries: int
    assumptions: tuple[str, ...] = ()
    by_role: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    # per role: tokens scaled from the provider's counts in cached answers, or the byte bound
    tokens_basis: tuple[str, ...] = ()
    # provider tokens over the byte bound in cached answers of these prompts (the first role's
    # with any; margin not included), None where none is cached: a caller estimating prompts
    # of the same kind that were never answered (ICL's) can scale its bound by it
    token_ratio: float | None = None


@dataclass
class _Plan:
    """One role's work: the key of every prompt, what the cache holds, what must be sent."""

    role: Role
    prompts: list[Prompt]
    keys: list[str]
    found: dict[str, Record]
    misses: list[Prompt]  # one per distinct key, first occurrence
    specs: list[RequestSpec]


@dataclass(frozen=True)
class _Answer:
    """A request's parsed answer, paid for, until it is stored and settled."""

    spec: RequestSpec
    keys: list[str]
    records: list[Record]
    reservation: Reservation
    attempts: int
    latency_s: float


Outcome = Reservation | BudgetExceeded | None  # a commit's or a reservation's

# Reservations a worker holds beyond its request in flight. Two keep a worker from waiting on
# a bookkeeping thread that is one answer behind (starved of the GIL while the event loop runs
# httpx); more would only hold more of a tight budget for requests not yet sent.
AHEAD = 2


@dataclass(frozen=True)
class _Commit:
    """An answer for the bookkeeping thread, with the next request's usage to reserve."""

    adapter: Adapter
    answer: _Answer
    then: Usage | None


STOP_GRACE_S = 10.0
"""After a stop is requested, how long requests in flight may take to finish before they are
cancelled (then recorded ``unknown``: counted at their worst case)."""


class _StopFlag:
    """A process-wide request to stop sending (set by the CLI's SIGINT/SIGTERM handler).

    Plain attributes, so a signal handler may set them at any moment; the send loop polls them.
    """

    signum: int | None = None
    sending = 0  # _send_all calls running: while 0 there is nothing in flight to wait for


def request_stop(signum: int) -> bool:
    """Ask every client of this process to stop sending; requests in flight finish (up to
    ``STOP_GRACE_S``), are stored and settled, then ``Interrupted`` is raised. Returns whether
    requests are being sent (if not, the caller may stop at once)."""
    _StopFlag.signum = signum
    return _StopFlag.sending > 0


def clear_stop() -> None:
    _StopFlag.signum = None


def _interrupted(signum: int) -> Interrupted:
    name = {2: "SIGINT", 15: "SIGTERM"}.get(signum, f"signal {signum}")
    return Interrupted(
        signum,
        f"stopped by {name}: nothing new was sent, requests in flight were stored and settled; "
        "re-run to resume (cached answers are not paid again)",
    )


# A queue of max_concurrency full requests on a CPU model server can take minutes to drain, and a
# read timeout re-sends (and, on a paid API, may re-pay) work the server is still doing: wait as
# long as the OpenAI SDK does for an answer, but not for a connection.
CONNECT_TIMEOUT_S = 10.0
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=CONNECT_TIMEOUT_S)


class Client:
    """Turns a Task and texts into Features through one adapter, paying for each query once.

    >>> client = Client(LocalAdapter(url), cache=CacheConfig("~/.cache/dm"))  # doctest: +SKIP
    >>> feats = client.features(task, ["A fine film.", "Dull."])  # doctest: +SKIP

    ``ledger``: a Ledger, a folder for one, or None (a temporary ledger that enforces ``budget``
    for this client only and is deleted on close). ``api_key_env`` names the environment variable
    holding the key (sent as ``Authorization: Bearer``; never stored, logged or cached).
    ``clock``, ``sleep`` and ``rng`` are for tests.
    """

    def __init__(
        self,
        adapter: Adapter,
        *,
        cache: CacheConfig | ResponseCache | None,
        ledger: Ledger | str | Path | None = None,
        budget: BudgetLimits = BudgetLimits(),  # noqa: B008 - frozen
        rate_limit: RateLimit = RateLimit(),  # noqa: B008 - frozen
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen
        max_concurrency: int = 8,
        run_id: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        api_key_env: str | Mapping[str, str | None] | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: Random | None = None,
    ) -> None:
        if not isinstance(adapter, Adapter):
            raise ConfigError(f"adapter must be a dect-maas adapter, got {type(adapter).__name__}")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
            raise ConfigError("max_concurrency must be an int")
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.adapter = adapter
        self._owns_cache = isinstance(cache, CacheConfig)
        self._cache = ResponseCache(cache) if isinstance(cache, CacheConfig) else cache
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if isinstance(ledger, Ledger):
            if budget != BudgetLimits():
                raise ConfigError("give the budget to the Ledger you pass, not to the Client")
            self._ledger, self._owns_ledger = ledger, False
        else:
            if ledger is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="dect-maas-ledger-")
                ledger = self._tmp.name
            self._ledger, self._owns_ledger = Ledger(ledger, budget, run_id=run_id), True
        self._credentials = role_credentials(adapter, api_key_env)
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._transport = transport
        self._max_concurrency = max_concurrency
        self._clock = clock
        self._retrier = Retrier(retry, sleep=sleep, clock=clock, rng=rng)
        self._limiter = RateLimiter(rate_limit, clock=clock, sleep=sleep)
        self._http: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
        self._bookkeeper: Bookkeeper[_Commit, Outcome] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._labels: dict[str, tuple[int, ...]] = {}
        self._verdicts: dict[str, Any] = {}  # batching checks, by endpoint (see _batch_check)

    # -- public API -------------------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    def features(
        self,
        task: Task,
        texts: Sequence[str],
        texts_b: Sequence[str] | None = None,
        progress: Progress = False,
    ) -> Features:
        """Features for ``texts`` in order, with the content-free scores for calibration."""
        return self._run(self.afeatures(task, texts, texts_b, progress))

    async def afeatures(
        self,
        task: Task,
        texts: Sequence[str],
        texts_b: Sequence[str] | None = None,
        progress: Progress = False,
    ) -> Features:
        _pairs(task, texts, texts_b)  # bad input refused before the server is asked anything
        return await self.afeatures_as(await self._discover(), task, texts, texts_b, progress)

    # Request variants (BBT's soft prompts): an adapter the caller derived from ``discover()``,
    # sent through this client's cache, budget, ledger, retries and credentials.

    def discover(self) -> Adapter:
        """This client's adapter completed by what the provider says it serves (nothing billed).

        On dect-maas-server that is ``GET /v1/models`` (model, revision, soft-prompt input); where
        the provider has nothing to ask, the adapter as given. Derive request variants from it
        (``dataclasses.replace(adapter, prompt_embeds=...)``) and send them with ``features_as``.
        """
        return self._run(self._discover())

    def features_as(
        self,
        adapter: Adapter,
        task: Task,
        texts: Sequence[str],
        texts_b: Sequence[str] | None = None,
        progress: Progress = False,
    ) -> Features:
        """``features`` sent as ``adapter``, a variant of this client's own (same class, same URLs).

        Cached, reserved, counted and retried exactly as ``features``; the variant's request
        body is part of every cache key, so two variants never share an answer.
        """
        return self._run(self.afeatures_as(adapter, task, texts, texts_b, progress))

    def features_each(
        self,
        adapters: Sequence[Adapter],
        task: Task,
        texts: Sequence[str],
        texts_b: Sequence[str] | None = None,
    ) -> list[Features]:
        """``features_as`` for several variants at once, their requests in flight together.

        A provider that batches concurrent requests (dect-maas-server batches soft prompts)
        answers them in one pass; each request is still reserved, counted and cached as if sent
        alone, at most ``max_concurrency`` at a time. The first failure is raised once every
        variant has settled, so nothing is left reserved.
        """

        async def each() -> list[Features]:
            out: list[Features | None] = [None] * len(adapters)

            async def one(i: int, adapter: Adapter) -> None:
                out[i] = await self.afeatures_as(adapter, task, texts, texts_b)

            await _run_all([one(i, a) for i, a in enumerate(adapters)])
            return [f for f in out if f is not None]

        return self._run(each())

    async def afeatures_as(
        self,
        adapter: Adapter,
        task: Task,
        texts: Sequence[str],
        texts_b: Sequence[str] | None = None,
        progress: Progress = False,
    ) -> Features:
        _check_variant(self.adapter, adapter)
        pairs = _pairs(task, texts, texts_b)
        roles = adapter.roles(task)  # UnsupportedCapability before any query
        labels = await self._resolve_labels(adapter, task, roles)
        plans = [self._plan(adapter, role, task, pairs, labels) for role in roles]
        for plan in plans:
            plan.found = await self._lookup(plan.keys)
            self._split(adapter, plan, labels)
        for plan in plans:
            if plan.role == "vectors" and any(len(s.indices) > 1 for s in plan.specs):
                await self._check_batching(adapter)
        report = _progress(progress, sum(len(p.prompts) for p in plans))
        report(sum(sum(1 for k in p.keys if k in p.found) for p in plans))  # true hits
        for plan in plans:
            await self._record_hits(adapter, plan)
            await self._send_all(adapter, plan, report)
        return self._assemble(adapter, task, roles, plans, labels, len(pairs))

    def estimate(
        self,
        task: Task,
        texts: Sequence[str],
        texts_b: Sequence[str] | None = None,
        *,
        variant: Callable[[Adapter], Adapter] | None = None,
    ) -> Estimate:
        """What ``features`` would cost now; sends nothing.

        Server metadata and label token ids come from what earlier runs stored in the cache; where
        they are unknown, the estimate says so in ``assumptions`` and counts nothing as cached
        for that role. ``variant``: estimate ``features_as(variant(adapter), ...)`` instead (its
        soft-prompt rows, billed per input, are counted as they are, never scaled).
        """
        pairs = _pairs(task, texts, texts_b)
        adapter, assumptions = self._discovered_offline()
        if variant is not None:
            adapter = variant(adapter)
        _check_variant(self.adapter, adapter)
        roles = adapter.roles(task)
        labels, missing = self._labels_offline(adapter, task, roles)
        if missing:
            assumptions.append(
                f"label token ids of {', '.join(repr(w) for w in missing)} not resolved yet "
                "(first run asks the server's tokenizer): nothing counted as cached for scores"
            )
        out = dict(queries=0, requests=0, input_tokens=0, cached=0, total=0)
        basis: list[str] = []  # how each role's tokens were counted
        cost = 0.0
        by_role: dict[str, dict[str, int]] = {}
        ratio: float | None = None
        unknown_server = bool(assumptions)
        for role in roles:
            plan = self._plan(adapter, role, task, pairs, labels)
            known = not unknown_server and (role == "vectors" or not missing)
            plan.found = self._cache_get_many(plan.keys) if known else {}
            self._split(adapter, plan, labels)
            factor = token_factor(adapter, plan, labels)
            soft = int(getattr(adapter, "soft_rows", 0))  # per input, never scaled
            if factor is not None and ratio is None:
                ratio = factor[0]
            if factor is not None and plan.specs:
                basis.append(
                    f"{role}: input tokens scaled from {factor[1]} cached answer(s) of the "
                    f"provider (x{factor[0]:.3f} of the byte bound, +{SCALE_MARGIN:.0%} margin)"
                )
            elif plan.specs:
                basis.append(
                    f"{role}: input tokens are the byte bound (no cached answer to scale from); "
                    "the provider will count fewer, often 3-4x fewer"
                )
            scale = factor[0] * (1 + SCALE_MARGIN) if factor is not None else 1.0
            sizes = [
                min(s.input_tokens, n + math.ceil((s.input_tokens - n) * scale))
                for s in plan.specs
                for n in [soft * len(s.indices)]
            ]
            tokens = sum(sizes)
            row = {
                "queries": len(plan.misses),
                "requests": len(plan.specs),
                "input_tokens": tokens,
                "cached_queries": len(plan.prompts) - len(plan.misses),
            }
            by_role[role] = row
            out["queries"] += row["queries"]
            out["requests"] += row["requests"]
            out["input_tokens"] += tokens
            out["cached"] += row["cached_queries"]
            out["total"] += len(plan.prompts)
            price = price_for(adapter, role)
            cost += sum(price.cost(requests=1, input_tokens=n) for n in sizes)
        return Estimate(
            queries=out["queries"],
            requests=out["requests"],
            input_tokens=out["input_tokens"],
            cost_usd=cost,
            cached_queries=out["cached"],
            total_queries=out["total"],
            assumptions=tuple(assumptions),
            by_role=by_role,
            tokens_basis=tuple(basis),
            token_ratio=ratio,
        )

    # -- planning (no I/O) ------------------------------------------------------------------------

    def _plan(
        self,
        adapter: Adapter,
        role: Role,
        task: Task,
        pairs: list[tuple[str, str | None]],
        labels: Sequence[Label],
    ) -> _Plan:
        prompts = [Prompt(i, adapter.prompt(role, task, a, b)) for i, (a, b) in enumerate(pairs)]
        if role != "vectors":  # scores need the content-free prompt, once per task
            empty_b = "" if task.is_pair else None
            prompts.append(Prompt(_CONTENT_FREE, adapter.prompt(role, task, "", empty_b)))
        base, path = adapter.endpoint(role)
        fixed = {
            "schema": KEY_SCHEMA,
            "adapter": f"{adapter.name}/{adapter.version}",
            "role": role,
            "url": base.rstrip("/") + path,
            "revision": getattr(adapter, "revision", None),
            "label_token_ids": [list(lab.ids) for lab in labels] if role != "vectors" else [],
        }
        keys = _example_keys(
            cache_key(fixed),
            lambda text: adapter.example_body(role, text, labels),
            [p.text for p in prompts],
        )
        return _Plan(role, prompts, keys, {}, [], [])

    def _split(self, adapter: Adapter, plan: _Plan, labels: Sequence[Label]) -> None:
        seen: set[str] = set()
        misses = []
        for p, k in zip(plan.prompts, plan.keys, strict=True):
            if k not in plan.found and k not in seen:
                seen.add(k)
                misses.append(p)
        plan.misses = misses
        plan.specs = adapter.build_requests(plan.role, misses, labels) if misses else []

    # -- the chain for one request ---------------------------------------------------------------

    async def _send_all(self, adapter: Adapter, plan: _Plan, report: Callable[[int], None]) -> None:
        """Send a plan's requests through ``max_concurrency`` workers, one request each at a time.

        Bookkeeping stays off each worker's path. A worker holds reservations for its next
        ``AHEAD`` requests; each answer goes to the bookkeeping thread, whose transaction that
        settles it also reserves one more request, and the worker sends its next request at
        once. So every request's worst case is reserved before it leaves, and a worker holds at
        most ``AHEAD + 1`` reservations.

        A reservation refused beside this worker's requests in flight is asked again once they
        are settled: only then is the refusal the caller's ``BudgetExceeded``.
        """
        if not plan.specs:
            return
        key_of = {p.index: k for p, k in zip(plan.prompts, plan.keys, strict=True)}
        uses = Counter(plan.keys)
        queue = deque(plan.specs)
        failed: list[Exception] = []

        def take() -> RequestSpec | None:
            # another request of this call failed, or a stop was requested: send nothing more
            return queue.popleft() if queue and not failed and _StopFlag.signum is None else None

        async def worker() -> None:
            spec = take()
            if spec is None:
                return
            ready: Reservation | None = await self._reserve(adapter, spec)  # spec's, until sent
            window: deque[tuple[RequestSpec, Future[Outcome]]] = deque()  # reservations coming
            for _ in range(AHEAD):
                if (s := take()) is not None:
                    window.append((s, self._try_reserve(adapter, s)))
            tail: list[Future[Outcome]] = []  # commits that reserve nothing
            refused: deque[RequestSpec] = deque()
            try:
                while spec is not None and ready is not None and not failed:
                    keys = [key_of[i] for i in spec.indices]
                    sent, ready = ready, None
                    answer = await self._call(adapter, spec, keys, sent)  # refunded if it fails
                    plan.found.update(zip(keys, answer.records, strict=True))
                    report(sum(uses[k] for k in keys))  # a text given twice is answered twice
                    nxt = take()
                    stored = self._commit(adapter, answer, nxt)
                    if nxt is not None:
                        window.append((nxt, stored))
                    else:
                        tail.append(stored)
                    spec = None
                    while window and ready is None:
                        spec, coming = window.popleft()
                        got, cancelled = await _outlast(coming)
                        if isinstance(got, Reservation):
                            ready = got
                        elif isinstance(got, BudgetExceeded):
                            refused.append(spec)
                        if cancelled:
                            raise asyncio.CancelledError()
                    if ready is None and refused:
                        # refused beside this worker's requests in flight: settle them, ask again
                        for stored in tail:
                            await _outlast(stored)
                        tail.clear()
                        spec = refused.popleft()
                        ready = await self._reserve(adapter, spec)  # raises BudgetExceeded
            except Exception as exc:
                failed.append(exc)
            finally:
                # answers still being stored, reservations never sent
                for coming in [f for _, f in window] + tail:
                    try:
                        got, _ = await _outlast(coming)
                    except Exception as exc:
                        failed.append(exc)
                    else:
                        if isinstance(got, Reservation):
                            self._ledger.release(got)
                if ready is not None:
                    self._ledger.release(ready)

        workers = [worker() for _ in range(min(self._max_concurrency, len(plan.specs)))]
        _StopFlag.sending += 1
        try:
            await _run_all(workers)
        finally:
            _StopFlag.sending -= 1
        if failed:
            # Raised only once the requests already in flight have finished: the provider does
            # their work (and bills it) anyway, so their answers are stored and settled, and a
            # re-run pays only for what was never sent.
            raise failed[0]
        if _StopFlag.signum is not None:
            raise _interrupted(_StopFlag.signum)

    async def _call(
        self, adapter: Adapter, spec: RequestSpec, keys: list[str], reservation: Reservation
    ) -> _Answer:
        """(reserved already) -> rate limit + send with retries -> parse. On failure the
        reservation is refunded (the failure recorded) before the error propagates; an answer
        is the caller's to store and settle (``_commit``)."""
        model = adapter.model_for(spec.role)
        attempts = Attempts()
        started = self._clock()
        sent: list[bool] = []  # write ahead: marked in the ledger before the first byte leaves
        try:
            records = await self._retrier.call(
                lambda: self._attempt(adapter, spec, reservation, sent), attempts
            )
        except BaseException as exc:
            failure = LedgerRecord(
                provider=adapter.provider,
                model=model,
                endpoint=spec.url,
                queries=len(spec.indices),
                attempts=attempts.count,
                status=_failure_status(exc, bool(sent)),
                latency_s=max(0.0, self._clock() - started),
                error=f"{type(exc).__name__}: {exc}"[:500],
            )
            if isinstance(exc, LedgerError):
                # the ledger cannot be written: a sent request's reservation stays (settled at
                # its worst case when the ledger is next opened); one never sent is given back
                if not sent:
                    with contextlib.suppress(LedgerError):
                        self._ledger.release(reservation)
                raise
            if failure.status == "unknown":  # it left and may have been answered: worst case
                self._ledger.settle(reservation, reservation.usage, failure)
            else:
                self._ledger.refund(reservation, failure)  # not in a thread: runs if cancelled
            logger.info(
                "%s %s failed after %d attempt(s)",
                adapter.provider,
                spec.describe(),
                attempts.count,
            )
            raise
        latency = max(0.0, self._clock() - started)
        return _Answer(spec, keys, records, reservation, attempts.count, latency)

    def _try_reserve(self, adapter: Adapter, spec: RequestSpec) -> Future[Outcome]:
        """Reserve ``spec`` on the bookkeeping thread, refused or not, without waiting."""
        reserve = partial(
            self._ledger.try_reserve,
            _worst(adapter, spec),
            provider=adapter.provider,
            model=adapter.model_for(spec.role),
            endpoint=spec.url,
        )
        return self._keeper().submit(reserve)  # in order with the commits; await with _outlast

    def _commit(
        self, adapter: Adapter, answer: _Answer, then: RequestSpec | None
    ) -> Future[Outcome]:
        """Store and settle ``answer`` on the bookkeeping thread, reserving ``then`` in the
        same ledger transaction; the answer was paid for, so callers outlast this future."""
        usage = _worst(adapter, then) if then is not None else None
        return self._keeper().commit(_Commit(adapter, answer, usage))

    def _write(self, commits: list[_Commit]) -> list[Outcome]:
        """On the bookkeeping thread, for answers queued together: one cache write, then one
        ledger transaction (an answer is stored before it is accounted as paid, so a crash in
        between never loses a paid answer)."""
        try:
            if self._cache is not None:
                records: dict[str, Record] = {}
                for c in commits:
                    records.update(zip(c.answer.keys, c.answer.records, strict=True))
                self._cache.set_many(records)
        except BaseException as exc:
            # paid for but not stored: spent all the same, and never recorded as ok
            error = _cache_error(self._cache, exc)
            self._ledger.settle_many(
                [self._settlement(c, reserve=False, lost=str(error)) for c in commits]
            )
            if error is exc:
                raise
            raise error from exc
        settlements = [self._settlement(c) for c in commits]
        outcomes = self._ledger.settle_many(settlements)
        for c, settled in zip(commits, settlements, strict=True):
            logger.info(
                "%s %s: %d quer%s, %d tokens, %d attempt(s), %.3fs",
                c.adapter.provider,
                c.answer.spec.describe(),
                settled.actual.queries,
                "y" if settled.actual.queries == 1 else "ies",
                settled.actual.input_tokens,
                c.answer.attempts,
                c.answer.latency_s,
            )
        return outcomes

    def _settlement(self, c: _Commit, *, reserve: bool = True, lost: str = "") -> Settlement:
        spec, records = c.answer.spec, c.answer.records
        tokens = [t for r in records if isinstance(t := r.get("t"), int)]
        n_tokens = sum(tokens) if len(tokens) == len(records) else spec.input_tokens
        actual = Usage(
            queries=len(spec.indices),
            requests=1,
            input_tokens=n_tokens,
            cost_usd=price_for(c.adapter, spec.role).cost(requests=1, input_tokens=n_tokens),
        )
        done = LedgerRecord(
            provider=c.adapter.provider,
            model=c.adapter.model_for(spec.role),
            endpoint=spec.url,
            queries=actual.queries,
            input_tokens=actual.input_tokens,
            cost_usd=actual.cost_usd,
            attempts=c.answer.attempts,
            status="lost" if lost else "ok",
            latency_s=c.answer.latency_s,
            error=lost or None,
        )
        return Settlement(c.answer.reservation, actual, done, c.then if reserve else None)

    async def _reserve(self, adapter: Adapter, spec: RequestSpec) -> Reservation:
        """Reserve and wait; a refusal is raised. If cancelled meanwhile, wait for the
        reservation and give it back."""
        outcome, cancelled = await _outlast(self._try_reserve(adapter, spec))
        if cancelled:
            if isinstance(outcome, Reservation):
                self._ledger.release(outcome)  # never sent
            raise asyncio.CancelledError()
        if isinstance(outcome, BudgetExceeded):
            raise outcome
        if outcome is None:  # try_reserve reserves or refuses
            raise RuntimeError("the ledger neither reserved nor refused")
        return outcome

    async def _paid(self, adapter: Adapter, spec: RequestSpec, keys: list[str]) -> list[Record]:
        """One request through the whole paid path (reserve, send, store, settle), alone."""
        reservation = await self._reserve(adapter, spec)
        answer = await self._call(adapter, spec, keys, reservation)
        await _outlast(self._commit(adapter, answer, None))
        return answer.records

    async def _check_batching(self, adapter: Adapter) -> None:
        """Refuse a vectors endpoint whose batched answers differ from single ones (checked once
        per endpoint, model and pooling; the verdict is cached). See ``_batch_check``."""
        base, path = adapter.endpoint("vectors")
        key = verdict_key(base + path, adapter.model_for("vectors"), adapter.hidden_kind("vectors"))
        verdict = self._verdicts.get(key)
        if verdict is None and self._cache is not None:
            verdict = await asyncio.to_thread(self._cache.get, key)
        if verdict is None:
            prompts = [Prompt(i, text) for i, text in enumerate(PROBES)]
            specs = adapter.build_requests("vectors", prompts, ())
            if len(specs) != 1:
                return  # the endpoint takes one input per request: nothing to check
            alone = [adapter.build_requests("vectors", [p], ())[0] for p in prompts]
            got = []
            for spec in [specs[0], *alone]:
                keys = [probe_key(spec.to_json(), i) for i in range(len(spec.indices))]
                got.append([r["h"] for r in await self._paid(adapter, spec, keys)])
            cosine = agreement(got[0], [got[1][0], got[2][0]])
            verdict = {"ok": cosine >= MIN_COSINE, "cosine": cosine}
            if self._cache is not None:
                await asyncio.to_thread(self._cache.set, key, verdict)
        self._verdicts[key] = verdict  # also without a cache: checked once per client
        if not verdict["ok"]:
            raise UnsupportedCapability(
                f"the embeddings endpoint {base}{path} answers a batch of texts differently "
                f"from the same texts sent alone (cosine {float(verdict['cosine']):.2f}): it "
                "mis-batches, as llama-cpp-python does. Send one text per request: "
                "embeddings_batch_size = 1 in the config (max_embedding_inputs=1 in Python)"
            )

    async def _attempt(
        self, adapter: Adapter, spec: RequestSpec, reservation: Reservation, sent: list[bool]
    ) -> list[Record]:
        """One try: rate limit, record as sent (first try), HTTP, status and body checks,
        parse. Raises our errors only."""
        status, headers, body = await self._http_json(
            adapter, spec, paced=True, before_send=None if sent else (reservation, sent)
        )
        return adapter.parse_response(spec, status, headers, body)

    async def _http_json(
        self,
        adapter: Adapter,
        spec: RequestSpec,
        *,
        paced: bool = False,
        before_send: tuple[Reservation, list[bool]] | None = None,
    ) -> tuple[int, Mapping[str, str], Any]:
        """Send ``spec``; (status, headers, JSON body). The one boundary where httpx errors are
        mapped to ours. ``paced``: billed requests go through the rate limiter.
        ``before_send``: the reservation to mark sent in the ledger once the rate limiter lets
        the request go and before it leaves (the flag list gets one item when marked)."""
        rate_key = (adapter.provider, adapter.model_for(spec.role))
        if paced:
            await self._limiter.acquire(rate_key, spec.input_tokens)
        if before_send is not None:
            reservation, flag = before_send
            self._ledger.mark_sent(reservation)  # not in a thread: it must not be cancelled
            flag.append(True)
        headers = {"Content-Type": "application/json", **spec.headers}
        credentials = self._credentials.get(_key_role(spec.role))
        if credentials is not None:
            headers.update(credentials.headers())
        content = None if spec.body is None else json.dumps(spec.body, separators=(",", ":"))
        http = self._http_client()
        try:
            response = await http.request(spec.method, spec.url, content=content, headers=headers)
        except _HTTPX_ERRORS as exc:
            raise map_httpx_error(exc, spec.describe()) from exc
        self._limiter.observe(rate_key, response.status_code, response.headers)
        if not 200 <= response.status_code < 300:
            scrub = credentials.scrub if credentials else (lambda s: s)
            raise error_for_status(
                response.status_code,
                response.headers,
                response.text,
                provider=adapter.provider,
                request=spec.describe(),
                scrub=scrub,
            )
        try:
            return response.status_code, response.headers, json.loads(response.content)
        except ValueError:
            raise TruncatedResponse(
                f"{adapter.provider} answered HTTP {response.status_code} with a body that is not "
                f"complete JSON ({len(response.content)} bytes)",
                request=spec.describe(),
            ) from None

    # -- cache, ledger and label words ------------------------------------------------------------

    def _cache_get_many(self, keys: Sequence[str]) -> dict[str, Record]:
        return self._cache.get_many(list(dict.fromkeys(keys))) if self._cache is not None else {}

    async def _lookup(self, keys: Sequence[str]) -> dict[str, Record]:
        if self._cache is None:
            return {}
        return await asyncio.to_thread(self._cache_get_many, keys)

    async def _record_hits(self, adapter: Adapter, plan: _Plan) -> None:
        hits = len(plan.prompts) - len(plan.misses)
        if hits:
            base, path = adapter.endpoint(plan.role)
            await asyncio.to_thread(
                self._ledger.record_hits,
                hits,
                provider=adapter.provider,
                model=adapter.model_for(plan.role),
                endpoint=base.rstrip("/") + path,
            )

    def _meta_key(self, spec: RequestSpec) -> str:
        return cache_key({"schema": "dect-maas/meta/1", "request": json.loads(spec.to_json())})

    async def _discover(self) -> Adapter:
        """Ask the server what it serves (free, unbilled), once per call; remember the answer."""
        spec = self.adapter.info_request()
        if spec is None:
            return self.adapter
        _, _, body = await self._retrier.call(
            lambda: self._http_json(self.adapter, spec), Attempts()
        )
        adapter = self.adapter.with_info(body)
        logger.info("%s %s: model %s, free", adapter.provider, spec.path, adapter.model)
        if self._cache is not None:
            await asyncio.to_thread(self._cache.set, self._meta_key(spec), {"body": body})
        return adapter

    def _discovered_offline(self) -> tuple[Adapter, list[str]]:
        spec = self.adapter.info_request()
        if spec is None:
            return self.adapter, []
        stored = self._cache.get(self._meta_key(spec)) if self._cache is not None else None
        if stored is None:
            return self.adapter, [
                "the server was never asked what model it serves: nothing counted as cached, "
                "and the adapter's settings (model kind, batch size) taken as they are"
            ]
        return self.adapter.with_info(stored["body"]), []

    def _label_key(self, spec: RequestSpec, adapter: Adapter) -> str:
        parts = json.loads(spec.to_json())
        return cache_key(
            {
                "schema": "dect-maas/tokenize/1",
                "request": parts,
                "revision": getattr(adapter, "revision", None),
            }
        )

    async def _resolve_labels(
        self, adapter: Adapter, task: Task, roles: Sequence[Role]
    ) -> tuple[Label, ...]:
        words = [w for ws in task.label_strings() for w in ws]
        if not any(r != "vectors" for r in roles):
            return ()
        need = any(adapter.needs_label_ids(r) for r in roles if r != "vectors")
        resolved: list[Label] = []
        for word in words:
            ids = adapter.known_label_ids(word)
            spec = adapter.tokenize_request(word) if ids is None and need else None
            if spec is not None:
                key = self._label_key(spec, adapter)
                stored = None
                if self._cache is not None:
                    stored = await asyncio.to_thread(self._cache.get, key)
                if stored is not None:
                    ids = list(stored["ids"])
                else:
                    ids = await self._tokenize(adapter, spec)
                    if self._cache is not None:
                        await asyncio.to_thread(self._cache.set, key, {"ids": ids})
            resolved.append(Label(word, tuple(ids or ())))
        multi = [lab for lab in resolved if lab.multi_token]
        if multi:
            warn(
                MultiTokenLabelWarning,
                "label word(s) "
                + ", ".join(f"{lab.text!r} ({len(lab.ids)} tokens)" for lab in multi)
                + " span several tokens: only the first token of each is scored (DecT §2.2); "
                "pick single-token words to avoid this",
            )
        return tuple(resolved)

    async def _tokenize(self, adapter: Adapter, spec: RequestSpec) -> list[int]:
        async def once() -> list[int]:
            _, _, body = await self._http_json(adapter, spec)
            return adapter.parse_tokenize(spec, body)

        try:
            ids = await self._retrier.call(once, Attempts())
        except ProviderStatusError as exc:
            if not getattr(adapter, "tokenize_optional", False) or exc.status not in (404, 405):
                raise
            logger.info("%s has no tokenize route: label words matched by string", spec.url)
            return []
        logger.info("%s %s: label word -> %d token(s), free", adapter.provider, spec.path, len(ids))
        return ids

    def _labels_offline(
        self, adapter: Adapter, task: Task, roles: Sequence[Role]
    ) -> tuple[tuple[Label, ...], list[str]]:
        if not any(r != "vectors" for r in roles):
            return (), []
        need = any(adapter.needs_label_ids(r) for r in roles if r != "vectors")
        out, missing = [], []
        for word in (w for ws in task.label_strings() for w in ws):
            ids = adapter.known_label_ids(word)
            spec = adapter.tokenize_request(word) if ids is None and need else None
            if spec is not None:
                stored = (
                    self._cache.get(self._label_key(spec, adapter))
                    if self._cache is not None
                    else None
                )
                if stored is None:
                    missing.append(word)
                else:
                    ids = list(stored["ids"])
            out.append(Label(word, tuple(ids or ())))
        return tuple(out), missing

    # -- assembling Features ----------------------------------------------------------------------

    def _assemble(
        self,
        adapter: Adapter,
        task: Task,
        roles: Sequence[Role],
        plans: Sequence[_Plan],
        labels: Sequence[Label],
        n: int,
    ) -> Features:
        scores = censored = hidden = content_free = content_free_hidden = None
        fingerprint: str | None = None
        score_kind = "none"
        hidden_kind = ""
        sizes = [len(ws) for _, ws in task.label_words]
        for plan in plans:
            records = [plan.found[k] for k in plan.keys]
            if plan.role != "vectors":
                flat = np.asarray([r["s"] for r in records], dtype=np.float64)  # (N+1, L)
                cen = np.asarray(
                    [r["c"] if r.get("c") is not None else [False] * len(labels) for r in records],
                    dtype=bool,
                )  # (N+1, L)
                per_class, cen_class = _per_class(flat, cen, sizes)  # (N+1, C) each
                scores, censored = per_class[:n], cen_class[:n]
                content_free = per_class[n]
                score_kind = adapter.capabilities(plan.role).score_kind
                fingerprint = fingerprint or next((r["fp"] for r in records if r.get("fp")), None)
            if plan.role != "scores":
                vectors = [np.asarray(r["h"], dtype=np.float32) for r in records[:n]]
                if len({v.shape for v in vectors}) > 1:
                    raise MalformedResponse(
                        f"{adapter.provider} returned vectors of different sizes "
                        f"{sorted({v.shape[0] for v in vectors})}"
                    )
                hidden = np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)  # (N, D)
                hidden_kind = adapter.hidden_kind(plan.role)
                if len(records) > n:  # the content-free prompt's vector: a reference point
                    content_free_hidden = np.asarray(records[n]["h"], dtype=np.float32)  # (D,)
        if censored is not None and censored.any():
            share = float(censored.mean())
            warn(
                CensoredScoreWarning,
                f"{share:.1%} of label-word scores fell outside the provider's top-k and are "
                "upper bounds (marked in Features.censored); exact token logprobs avoid this",
            )
        extra = {
            **adapter.extra_meta(),
            "roles": list(roles),
            "label_words": [lab.text for lab in labels],
            "label_token_rule": "first",
            "multi_token_labels": {lab.text: list(lab.ids) for lab in labels if lab.multi_token},
        }
        ids: list[tuple[int, ...]] = []
        it = iter(labels)
        for size in sizes:
            ids.append(
                tuple(lab.first for lab in (next(it) for _ in range(size)) if lab.first is not None)
                if labels
                else ()
            )
        meta = FeatureMeta(
            provider=adapter.provider,
            model=adapter.model,
            revision=fingerprint or getattr(adapter, "revision", None),
            template=task.template,
            classes=task.classes,
            label_token_ids=tuple(ids),
            score_kind=score_kind,  # type: ignore[arg-type]
            hidden_kind=hidden_kind,
            extra=extra,
        )
        return Features(
            scores,
            hidden,
            censored if censored is not None and censored.any() else None,
            content_free,
            meta,
            content_free_hidden,
        )

    # -- loops, HTTP clients, closing -------------------------------------------------------------

    def _http_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        http = self._http.get(loop)
        if http is None:
            limits = httpx.Limits(
                max_connections=self._max_concurrency,
                max_keepalive_connections=self._max_concurrency,
            )
            http = httpx.AsyncClient(
                transport=self._transport, timeout=self._timeout, limits=limits
            )
            self._http[loop] = http
        return http

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise ConfigError(
                "Client.features was called inside a running event loop: use "
                "`await client.afeatures(...)` there"
            )
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        task = self._loop.create_task(coro)
        try:
            return self._loop.run_until_complete(task)
        except BaseException:
            # interrupted from outside (a signal): let the task settle what it holds first
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    self._loop.run_until_complete(task)
            raise

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        http = self._http.pop(loop, None)
        if http is not None:
            await http.aclose()
        self._close_stores()

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            http = self._http.pop(self._loop, None)
            if http is not None:
                self._loop.run_until_complete(http.aclose())
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()
        self._http.clear()
        self._close_stores()

    def _keeper(self) -> Bookkeeper[_Commit, Outcome]:
        if self._bookkeeper is None:  # first use, or used again after close()
            self._bookkeeper = Bookkeeper(self._write, self._orphan)
        return self._bookkeeper

    def _orphan(self, outcome: Outcome) -> None:
        if isinstance(outcome, Reservation):  # reserved for a caller that is gone
            self._ledger.release(outcome)

    def _close_stores(self) -> None:
        if self._bookkeeper is not None:
            self._bookkeeper.close()
            self._bookkeeper = None
        if self._owns_cache and self._cache is not None:
            self._cache.close()
        if self._owns_ledger:
            self._ledger.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"Client(adapter={type(self.adapter).__name__}(model={self.adapter.model!r}), "
            f"credentials={_show(self._credentials)}, ledger={str(self._ledger.directory)!r})"
        )


# -- helpers --------------------------------------------------------------------------------------


def _pairs(
    task: Task, texts: Sequence[str], texts_b: Sequence[str] | None
) -> list[tuple[str, str | None]]:
    if isinstance(texts, str):
        raise ConfigError("texts must be a sequence of strings, not one string")
    a = list(texts)
    if not a:
        raise ConfigError("texts is empty: give at least one text to query")
    if texts_b is None:
        if task.is_pair:
            raise ConfigError("the template has a {text_b} slot: give texts_b as well")
        b: list[str | None] = [None] * len(a)
    else:
        b = list(texts_b)
        if len(b) != len(a):
            raise ConfigError(f"texts has {len(a)} items but texts_b has {len(b)}")
    for i, t in enumerate(a):
        if not isinstance(t, str):
            raise ConfigError(f"texts[{i}] is a {type(t).__name__}, not a string")
    return list(zip(a, b, strict=True))


def _example_keys(
    prefix: str, body_of: Callable[[str], Mapping[str, Any]], texts: Sequence[str]
) -> list[str]:
    """``cache_key({"body": body_of(text), "prefix": prefix})`` for each text, computed fast.

    Every example's body differs only by its prompt, so the canonical JSON of a body with a
    sentinel prompt is split around it once and each key is one string join and one sha256. A few
    examples (first, middle, last) are checked against ``cache_key`` itself, which also validates
    the parts and refuses credential-like names; on any difference every key takes the slow path.
    The cache-hit path is bound by this (10,000 examples: ~0.05 s instead of ~1.5 s).
    """
    if not texts:
        return []

    def slow(text: str) -> str:
        return cache_key({"body": body_of(text), "prefix": prefix})

    sentinel = "\x00dect-maas-prompt\x00"
    template = json.dumps(
        body_of(sentinel), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    marker = json.dumps(sentinel)
    if template.count(marker) != 1:
        return [slow(t) for t in texts]
    head, tail = template.split(marker)
    suffix = f'{tail},"prefix":"{prefix}"}}'
    head = '{"body":' + head
    sha256 = hashlib.sha256

    def fast(text: str) -> str:
        return sha256((head + json.dumps(text) + suffix).encode("ascii")).hexdigest()

    checks = {0, len(texts) // 2, len(texts) - 1}
    if any(fast(texts[i]) != slow(texts[i]) for i in checks):
        return [slow(t) for t in texts]
    return [fast(t) for t in texts]


def _failure_status(exc: BaseException, sent: bool) -> str:
    """A failed request's ledger outcome. ``unknown`` (counted at its worst case) when it left
    and the provider may have done the work: cancelled or timed out waiting, or the connection
    broke after sending. Never sent, or answered with an error status or a body we reject: the
    provider did not bill an answer, so the request is refunded."""
    if not sent:
        return "cancelled" if isinstance(exc, asyncio.CancelledError) else "error"
    if isinstance(exc, asyncio.CancelledError):
        return "unknown"
    if isinstance(exc, TransportError) and not isinstance(exc, ProviderStatusError):
        cause = exc.__cause__
        if isinstance(cause, (httpx.ConnectError, httpx.ConnectTimeout)):
            return "error"  # the connection was never made: nothing left
        return "unknown"
    return "error"


def _cache_error(cache: ResponseCache | None, exc: BaseException) -> BaseException:
    """A cache write failure as a ``CacheError`` naming the cache's folder."""
    if isinstance(exc, CacheError) or not isinstance(exc, Exception) or cache is None:
        return exc
    where = cache.config.path
    text = str(exc)
    full = "full" in text or getattr(exc, "errno", None) == 28
    what = "disk full" if full else f"{type(exc).__name__}"
    return CacheError(
        f"cannot write the response cache at {where}: {what} ({text}); the answer was paid for "
        "and recorded as lost in the ledger; sending stopped"
    )


#: Added to a token count scaled from cached answers, so that an estimate errs high.
SCALE_MARGIN = 0.05


def token_factor(
    adapter: Adapter, plan: _Plan, labels: Sequence[Label], sample: int = 200
) -> tuple[float, int] | None:
    """(provider tokens / byte bound, answers used) over up to ``sample`` cached answers of this
    plan that carry the provider's token count, or None when none does."""
    seen = [
        (p, r["t"])
        for p, k in zip(plan.prompts, plan.keys, strict=True)
        if (r := plan.found.get(k)) is not None and isinstance(r.get("t"), int)
    ][:sample]
    if not seen:
        return None
    bound = sum(adapter.build_requests(plan.role, [p], labels)[0].input_tokens for p, _ in seen)
    return (sum(t for _, t in seen) / bound if bound else 1.0), len(seen)


def role_credentials(
    adapter: Adapter, api_key_env: str | Mapping[str, str | None] | None
) -> dict[str, Credentials]:
    """Which key goes to which endpoint role (``"scores"``, ``"vectors"``).

    A mapping names a variable per role (``None``: no key). One name is sent to the scores
    endpoint, and to the vectors endpoint only when that is on the same host: scores at vendor A
    and vectors at vendor B must never send A's key to B.
    """
    if api_key_env is None:
        return {}
    if isinstance(api_key_env, str):
        out = {"scores": Credentials(api_key_env)}
        base, _ = adapter.endpoint("scores") if _serves_scores(adapter) else ("", "")
        vbase, _ = adapter.endpoint("vectors")
        if not base or _origin(vbase) == _origin(base):
            out["vectors"] = out["scores"]
        return out
    unknown = sorted(set(api_key_env) - {"scores", "vectors"})
    if unknown:
        raise ConfigError(f"api_key_env has unknown role(s) {unknown}; use 'scores' and 'vectors'")
    return {role: Credentials(env) for role, env in api_key_env.items() if env is not None}


def _check_variant(own: Adapter, variant: Adapter) -> None:
    """A variant may change what is asked, never where it goes: the credentials are the
    client's, resolved for its own adapter's URLs."""
    if type(variant) is not type(own):
        raise ConfigError(
            f"features_as needs a variant of this client's {type(own).__name__}, "
            f"got {type(variant).__name__}: derive it from client.discover()"
        )
    for name in ("base_url", "embeddings_base_url"):
        if getattr(variant, name, None) != getattr(own, name, None):
            raise ConfigError(
                f"features_as: the variant's {name} differs from the client's; a variant may "
                "change the request, not where it is sent"
            )


def _serves_scores(adapter: Adapter) -> bool:
    return adapter.capabilities("scores").scores != "none"


def _origin(url: str) -> tuple[str, str]:
    parts = httpx.URL(url)
    return parts.scheme, parts.netloc.decode("ascii")


def _key_role(role: Role) -> str:
    return "vectors" if role == "vectors" else "scores"


def _show(credentials: Mapping[str, Credentials]) -> str:
    if not credentials:
        return "None"
    if len({id(c) for c in credentials.values()}) == 1 and len(credentials) == 2:
        return repr(next(iter(credentials.values())))
    return "{" + ", ".join(f"{r!r}: {c!r}" for r, c in credentials.items()) + "}"


def _worst(adapter: Adapter, spec: RequestSpec) -> Usage:
    """What a request may cost at most: the budget reserves this before it leaves."""
    return Usage(
        queries=len(spec.indices),
        requests=1,
        input_tokens=spec.input_tokens,
        cost_usd=price_for(adapter, spec.role).cost(requests=1, input_tokens=spec.input_tokens),
    )


def _per_class(
    flat: np.ndarray[Any, Any], cen: np.ndarray[Any, Any], sizes: Sequence[int]
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Max over each class's label words (DecT §2.2); censored if the max is an upper bound."""
    out_s, out_c = [], []
    start = 0
    for size in sizes:
        block = flat[:, start : start + size]  # (N, W)
        best = block.argmax(axis=1)  # (N,)
        rows = np.arange(flat.shape[0])
        out_s.append(block[rows, best])
        out_c.append(cen[:, start : start + size][rows, best])
        start += size
    return np.stack(out_s, axis=1), np.stack(out_c, axis=1)


def _progress(progress: Progress, total: int) -> Callable[[int], None]:
    done = 0
    if progress is False:
        return lambda k: None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="ex", desc="dect-maas")

        def tick(k: int) -> None:
            bar.update(k)
            if bar.n >= total:
                bar.close()

        return tick
    callback = progress

    def call(k: int) -> None:
        nonlocal done
        done += k
        callback(done, total)

    return call


async def _outlast(aw: Awaitable[T] | Future[T]) -> tuple[T, bool]:
    """Await ``aw`` to its end even through cancellations (bookkeeping in a thread must not be
    abandoned half-way); return its result and whether the caller was cancelled meanwhile.
    Cancelled, a failure of ``aw`` becomes the CancelledError."""
    if isinstance(aw, Future):
        if aw.done():  # finished while a request was in flight: no task, no wake-up
            return aw.result(), False
        aw = asyncio.wrap_future(aw)
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            return await asyncio.shield(task), cancelled
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True  # gather and _run_all may both cancel: wait again each time
        except Exception:
            if cancelled:
                raise asyncio.CancelledError() from None
            raise


async def _run_all(coros: Sequence[Coroutine[Any, Any, None]]) -> None:
    """Run all to completion; if the caller is cancelled, cancel them (reservations refunded).
    Once a stop is requested, they have ``STOP_GRACE_S`` to finish before they are cancelled."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        stop_seen: float | None = None
        pending = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=0.1)
            if _StopFlag.signum is not None and pending:
                now = time.monotonic()
                stop_seen = now if stop_seen is None else stop_seen
                if now - stop_seen > STOP_GRACE_S:
                    for t in pending:
                        t.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    break
        for t in tasks:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise

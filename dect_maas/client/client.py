"""The client: the only place in dect-maas that touches the network.

One request reads on one page (``Client._request``): reserve its worst case in the ledger
(``BudgetExceeded`` before anything leaves) -> rate limit -> record it as sent in the ledger
(write ahead: after a crash it counts at its worst case, never as zero) -> send, retrying per
``RetryPolicy`` -> parse -> store the answer in the cache -> settle the ledger to the actual
usage. Only what never left (or was answered with an error status) is refunded; a request that
left and whose outcome is unknown (timed out, cut off, cancelled while waiting, or answered 2xx
with a body the adapter rejects) counts at its worst case, and so does each attempt of it that
may have been answered before a retry.

Around it, ``_send_all`` is a plain loop of ``max_concurrency`` workers. A failure, or a stop
request (``request_stop``, from the CLI's SIGINT/SIGTERM handler), ends sending: nothing new
leaves, requests in flight get ``STOP_GRACE_S`` to finish and are stored and settled, then the
error (or ``Interrupted``) is raised.

What to send is planned in ``plan.py`` and answers become ``Features`` in ``assemble.py``; both
are pure. This module keeps the I/O. Ledger and cache writes are plain blocking calls on the
event loop (each is a short SQLite transaction): a cancellation can never cut one in half, and
no thread hand-off is paid per request. Reads before sending (cache look-ups of every example)
go through ``asyncio.to_thread``.

Units. A *query* is one example's forward pass on one endpoint (the paper's unit, what providers
bill); a *request* is one HTTP call carrying one or more queries. When scores and vectors come from
two endpoints, an example costs two queries. A *hit* is an example answered from the cache.

The core is async (``afeatures``); ``features`` is a plain synchronous call that runs it on a loop
the client owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from random import Random
from types import TracebackType
from typing import Any, TypeVar

import httpx

from dect_maas._exceptions import (
    CacheError,
    ConfigError,
    Interrupted,
    LedgerError,
    MalformedResponse,
    ProviderError,
    ProviderStatusError,
    TransportError,
    UnsupportedCapability,
)
from dect_maas._features import Features
from dect_maas._task import Task
from dect_maas.adapters._base import Adapter, Label, Prompt, RequestSpec, Role, TokenCounter

from .assemble import assemble, label_lookups, labels_of
from .batch_check import MIN_COSINE, PROBES, agreement, probe_key, verdict_key
from .budget import BudgetLimits
from .cache import CacheConfig, ResponseCache
from .ledger import Ledger, LedgerRecord, Reservation
from .plan import (
    Counted,
    Estimate,
    Plan,
    Record,
    actual,
    count_key,
    count_sample,
    estimate_of,
    label_key,
    meta_key,
    pairs_of,
    plan_role,
    split,
    worst,
)
from .ratelimit import RateLimiter
from .retry import Attempts, Retrier, TruncatedResponse, error_for_status, map_httpx_error
from .settings import Credentials, RateLimit, RetryPolicy

__all__ = ["Client", "Estimate"]

logger = logging.getLogger("dect_maas")
T = TypeVar("T")
Progress = bool | Callable[[int, int], None]

_HTTPX_ERRORS = (httpx.HTTPError, httpx.InvalidURL, httpx.CookieConflict, httpx.StreamError)
# raised by httpx before a request's first byte left: no connection was made
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass
class _Flight(Attempts):
    """A request under way: its open reservation and where it stands.

    ``sent``: the reservation is marked sent in the ledger (write ahead). ``billed``: the last
    attempt left and may have been answered, so the provider may bill it. ``done``: attempts
    already counted under earlier reservations (a retry after an attempt that may have been
    billed gets a reservation of its own).
    """

    reservation: Reservation | None = None
    since: float = 0.0
    sent: bool = False
    billed: bool = False
    done: int = 0


class _Held:
    """How many requests of one ``_send_all`` hold a reservation. A reservation refused beside
    them may not stay refused: it waits for one of them to close and asks again."""

    def __init__(self, stopping: Callable[[], bool] = lambda: False) -> None:
        self.count = 0
        self.stopping = stopping  # a failure or a stop request: reserve nothing more
        self._closed = asyncio.Event()

    def release(self) -> None:
        self.count -= 1
        self._closed.set()
        self._closed = asyncio.Event()

    async def closed(self) -> None:
        await self._closed.wait()


class _NotSent(Exception):
    """A request given up before its reservation: sending stopped meanwhile."""


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
        self._loop: asyncio.AbstractEventLoop | None = None
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
        pairs_of(task, texts, texts_b)  # bad input refused before the server is asked anything
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
        pairs = pairs_of(task, texts, texts_b)
        roles = adapter.roles(task)  # UnsupportedCapability before any query
        labels = await self._resolve_labels(adapter, task, roles)
        plans = [plan_role(adapter, role, task, pairs, labels) for role in roles]
        for plan in plans:
            plan.found = await self._lookup(plan.keys)
            split(adapter, plan, labels)
        for plan in plans:
            if plan.role == "vectors" and any(len(s.indices) > 1 for s in plan.specs):
                await self._check_batching(adapter)
        report = _progress(progress, sum(len(p.prompts) for p in plans))
        report(sum(sum(1 for k in p.keys if k in p.found) for p in plans))  # true hits
        for plan in plans:
            await self._record_hits(adapter, plan)
            await self._send_all(adapter, plan, report)
        return assemble(adapter, task, roles, plans, labels, len(pairs))

    def estimate(
        self,
        task: Task,
        texts: Sequence[str],
        texts_b: Sequence[str] | None = None,
        *,
        variant: Callable[[Adapter], Adapter] | None = None,
    ) -> Estimate:
        """What ``features`` would cost now; pays nothing (the ledger is not touched).

        It asks the server only what is free: what it serves, the label words' token ids and,
        where the adapter names a tokenizer route (``tokenize_api``, dect-maas-server's
        ``/v1/tokenize``), the token count of every prompt it would send (a seeded sample of
        ``COUNT_SAMPLE`` when there are more), all cached. Without a tokenizer it scales from the
        provider's counts in cached answers, else takes the byte bound; ``tokens_method`` says
        which, per role. A server that does not answer leaves what earlier runs stored in the
        cache; where that is missing, ``assumptions`` says so. ``variant``: estimate
        ``features_as(variant(adapter), ...)`` instead (its soft-prompt rows, billed per input,
        are counted as they are, never scaled).
        """
        return self._run(self.aestimate(task, texts, texts_b, variant=variant))

    async def aestimate(
        self,
        task: Task,
        texts: Sequence[str],
        texts_b: Sequence[str] | None = None,
        *,
        variant: Callable[[Adapter], Adapter] | None = None,
    ) -> Estimate:
        """``estimate`` for asyncio code."""
        pairs = pairs_of(task, texts, texts_b)
        adapter, assumptions = self._discovered_offline()
        down: dict[str, str] = {}  # server root -> why nothing free could be asked there
        if assumptions:  # never asked what it serves: ask now (free), once
            try:
                adapter = await self._discover(attempts=1)
                assumptions = []
            except ProviderError as exc:
                down[_root(self.adapter.info_request())] = _why(exc)
        if variant is not None:
            adapter = variant(adapter)
        _check_variant(self.adapter, adapter)
        roles = adapter.roles(task)
        labels, missing = self._labels_offline(adapter, task, roles)
        if missing and not down:
            try:
                labels = await self._resolve_labels(adapter, task, roles, attempts=1)
                missing = []
            except ProviderError as exc:
                down[_root(adapter.tokenize_request(missing[0]))] = _why(exc)
        if missing:
            assumptions.append(
                f"label token ids of {', '.join(repr(w) for w in missing)} not resolved yet "
                "(first run asks the server's tokenizer): nothing counted as cached for scores"
            )
        plans = []
        for role in roles:
            plan = plan_role(adapter, role, task, pairs, labels)
            known = not assumptions and (role == "vectors" or not missing)
            plan.found = self._cache_get_many(plan.keys) if known else {}
            split(adapter, plan, labels)
            plans.append(plan)
        counts: dict[str, Counted] = {}
        for plan in plans:
            if plan.specs and isinstance(adapter, TokenCounter):
                counted = await self._count(adapter, plan, down)
                if counted is not None:
                    counts[plan.role] = counted
        notes = [
            f"{root or 'the server'} was asked what is free (model, tokenizer) and failed: {why}"
            for root, why in down.items()
        ]
        checks = [
            spec
            for plan in plans
            if plan.role == "vectors" and any(len(s.indices) > 1 for s in plan.specs)
            for spec in await self._check_pending(adapter)
        ]
        return estimate_of(adapter, plans, labels, [*assumptions, *notes], counts, checks)

    async def _check_pending(self, adapter: Adapter) -> list[RequestSpec]:
        """The paid requests of the embeddings batching check (``_check_batching``) that the
        run would send first: none once its verdict is known."""
        _, verdict = await self._known_verdict(adapter)
        return [] if verdict is not None else _probe_specs(adapter)

    async def _count(self, adapter: Any, plan: Plan, down: dict[str, str]) -> Counted | None:
        """The server's token counts of ``plan``'s prompts (or a seeded sample of them), asked of
        its tokenizer route (free, never in the ledger) and cached per prompt; None where the
        adapter names no route or the route does not answer (``down`` says why)."""
        sample = count_sample(plan.misses)
        tokens = await self._count_texts(adapter, plan.role, [p.text for p in sample], down)
        if tokens is None:
            return None
        counted = {p.index: n for p, n in zip(sample, tokens, strict=True)}
        bound = int(adapter.uncounted(plan.role))
        if not bound:
            return Counted(counted)
        # the count misses a per-request overhead (a chat template): learn it from one cached
        # answer's usage, else take its bound
        for p, k in zip(plan.prompts, plan.keys, strict=True):
            record = plan.found.get(k)
            if record is not None and isinstance(record.get("t"), int):
                alone = await self._count_texts(adapter, plan.role, [p.text], down)
                if alone:
                    extra = max(0, int(record["t"]) - alone[0])
                    how = f"+{extra} token(s) per request beyond the text, from a cached answer"
                    return Counted(counted, extra, how)
                break
        how = (
            f"+{bound} token(s) per request for the chat template, a bound (the route counts "
            "text only; one cached answer makes it exact)"
        )
        return Counted(counted, bound, how)

    async def _count_texts(
        self, adapter: Any, role: Role, texts: Sequence[str], down: dict[str, str]
    ) -> list[int] | None:
        if not texts:
            return []
        singles = [adapter.count_requests(role, [t]) for t in texts]
        if any(len(s) != 1 for s in singles):
            return None  # no tokenizer route named
        root = _root(singles[0][0])
        if root in down:
            return None
        keys = [count_key(s[0], adapter) for s in singles]
        stored = await asyncio.to_thread(self._cache_get_many, keys)
        out: list[int | None] = [
            int(r["n"]) if (r := stored.get(k)) is not None else None for k in keys
        ]
        todo = [i for i, n in enumerate(out) if n is None]
        if todo:
            specs = adapter.count_requests(role, [texts[i] for i in todo])
            gate = asyncio.Semaphore(self._max_concurrency)

            async def ask(spec: RequestSpec) -> None:
                async with gate:
                    _, _, body = await self._http_json(adapter, spec)
                for j, n in zip(spec.indices, adapter.parse_count(spec, body), strict=True):
                    out[todo[j]] = int(n)

            try:
                await ask(specs[0])  # alone first: a server with no such route answers once
                done = await asyncio.gather(*(ask(s) for s in specs[1:]), return_exceptions=True)
                for result in done:
                    if isinstance(result, BaseException):
                        raise result
            except ProviderError as exc:
                down[root] = _why(exc)
                return None
            found = {keys[i]: {"n": out[i]} for i in todo}
            if self._cache is not None:
                await asyncio.to_thread(self._cache.set_many, found)
            logger.info(
                "%s %s: %d prompt(s) counted, free", adapter.provider, specs[0].path, len(todo)
            )
        return [int(n) for n in out if n is not None]

    # -- sending: a plain loop around one request ------------------------------------------------

    async def _send_all(self, adapter: Adapter, plan: Plan, report: Callable[[int], None]) -> None:
        """Send a plan's requests through ``max_concurrency`` workers, each through ``_request``.

        After the first failure or a stop request nothing new is sent. The error is raised once
        the requests already in flight have finished: the provider does their work (and bills
        it) anyway, so their answers are stored and settled, and a re-run pays only for what
        was never sent.
        """
        if not plan.specs:
            return
        key_of = {p.index: k for p, k in zip(plan.prompts, plan.keys, strict=True)}
        uses = Counter(plan.keys)
        todo = deque(plan.specs)
        failed: list[Exception] = []
        held = _Held(stopping=lambda: bool(failed) or _StopFlag.signum is not None)

        async def worker() -> None:
            while todo and not held.stopping():
                spec = todo.popleft()
                keys = [key_of[i] for i in spec.indices]
                try:
                    records = await self._request(adapter, spec, keys, held)
                except _NotSent:
                    return
                except Exception as exc:
                    failed.append(exc)
                    return
                plan.found.update(zip(keys, records, strict=True))
                report(sum(uses[k] for k in keys))  # a text given twice is answered twice

        _StopFlag.sending += 1
        try:
            await _run_all([worker() for _ in range(min(self._max_concurrency, len(todo)))])
        finally:
            _StopFlag.sending -= 1
        if failed:
            raise failed[0]
        if _StopFlag.signum is not None:
            raise _interrupted(_StopFlag.signum)

    # -- one request, top to bottom --------------------------------------------------------------

    async def _request(
        self, adapter: Adapter, spec: RequestSpec, keys: list[str], held: _Held
    ) -> list[Record]:
        """One request on one page; its answer's records, stored and settled.

        1. reserve its worst case in the ledger (``BudgetExceeded``: nothing leaves);
        2. attempts (``_attempt``), retried per ``RetryPolicy``: rate limit, record as sent in
           the ledger (write ahead), send, parse;
        3. store the answer in the cache: durable before the ledger says ok;
        4. settle the reservation to the actual usage.

        A failure is closed by ``_close_failed``: counted at its worst case if it left and may
        have been answered, refunded otherwise. Every ledger and cache call here is a plain
        blocking call: a cancellation (a signal's deadline) happens only while waiting on the
        rate limiter or the network, never half-way through a write.
        """
        reservation = await self._reserve(adapter, spec, held)  # 1
        flight = _Flight(reservation=reservation, since=self._clock())
        held.count += 1
        try:
            try:
                records = await self._retrier.call(  # 2
                    lambda: self._attempt(adapter, spec, flight), flight, spec.url
                )
            except BaseException as exc:
                self._close_failed(adapter, spec, flight, exc)
                raise
            self._store_and_settle(adapter, spec, keys, records, flight)  # 3, 4
        finally:
            held.release()
        return records

    async def _reserve(self, adapter: Adapter, spec: RequestSpec, held: _Held) -> Reservation:
        """Reserve the request's worst case. Refused while other requests of this call hold
        reservations, it asks again as each of them closes; refused with none left,
        ``BudgetExceeded``."""
        while True:
            if held.stopping():
                raise _NotSent()
            outcome = self._ledger.try_reserve(
                worst(adapter, spec),
                provider=adapter.provider,
                model=adapter.model_for(spec.role),
                endpoint=spec.url,
            )
            if isinstance(outcome, Reservation):
                return outcome
            if held.count == 0:
                raise outcome
            await held.closed()

    async def _attempt(self, adapter: Adapter, spec: RequestSpec, flight: _Flight) -> list[Record]:
        """One try: rate limit, record as sent, HTTP, status and body checks, parse."""
        await self._limiter.acquire(
            (adapter.provider, adapter.model_for(spec.role)), spec.input_tokens
        )
        if flight.billed:  # the attempt before left and may have been answered: count it
            self._recount(adapter, spec, flight)
        if not flight.sent:
            assert flight.reservation is not None
            self._ledger.mark_sent(flight.reservation)  # LedgerError here: nothing leaves
            flight.sent = True
        try:
            status, headers, body = await self._http_json(adapter, spec)
        except BaseException as exc:
            flight.billed = _may_be_billed(exc)
            raise
        try:
            return adapter.parse_response(spec, status, headers, body)
        except MalformedResponse:
            # A 2xx answer was computed and billed, whatever its shape: count it (never refund).
            flight.billed = 200 <= status < 300
            raise

    def _recount(self, adapter: Adapter, spec: RequestSpec, flight: _Flight) -> None:
        """Before retrying an attempt that may have been answered: reserve the retry's worst
        case (``BudgetExceeded``: no retry), then settle the attempt before at its own, as
        ``unknown``. A provider may bill both sends, so the limit must hold for both."""
        assert flight.reservation is not None
        nxt = self._ledger.reserve(
            worst(adapter, spec),
            provider=adapter.provider,
            model=adapter.model_for(spec.role),
            endpoint=spec.url,
        )
        before = flight.count - 1  # this attempt is already counted
        record = self._record(
            adapter,
            spec,
            flight,
            status="unknown",
            error="sent, then cut off or timed out; retried, and counted at its worst case",
            attempts=before - flight.done,
        )
        self._ledger.settle(flight.reservation, flight.reservation.usage, record)
        flight.reservation, flight.since, flight.done = nxt, self._clock(), before
        flight.sent = flight.billed = False

    def _store_and_settle(
        self,
        adapter: Adapter,
        spec: RequestSpec,
        keys: list[str],
        records: list[Record],
        flight: _Flight,
    ) -> None:
        """Store the paid answer, then settle. A failed store settles it as ``lost`` (paid,
        answer gone) and raises a ``CacheError`` naming the cache: sending stops."""
        assert flight.reservation is not None
        used = actual(adapter, spec, records)
        if self._cache is not None:
            try:
                self._cache.set_many(dict(zip(keys, records, strict=True)))
            except BaseException as exc:
                error = _cache_error(self._cache, exc)
                lost = self._record(adapter, spec, flight, status="lost", error=str(error))
                self._ledger.settle(flight.reservation, used, lost)
                if error is exc:
                    raise
                raise error from exc
        self._ledger.settle(flight.reservation, used, self._record(adapter, spec, flight))
        logger.info(
            "%s %s: %d quer%s, %d tokens, %d attempt(s), %.3fs",
            adapter.provider,
            spec.describe(),
            used.queries,
            "y" if used.queries == 1 else "ies",
            used.input_tokens,
            flight.count - flight.done,
            self._clock() - flight.since,
        )

    def _close_failed(
        self, adapter: Adapter, spec: RequestSpec, flight: _Flight, exc: BaseException
    ) -> None:
        """Close the reservation of a request that failed.

        Its last attempt left and may have been answered (timed out, cut off, cancelled while
        waiting, a 2xx cut short or with a body we reject): ``unknown``, counted at its reserved
        worst case. Never left, or answered with an error status: refunded (``cancelled`` or
        ``error``). The ledger itself failing (``LedgerError``): a reservation never marked sent
        is given back if possible; one marked sent stays, and is settled at its worst case when
        the ledger is next opened.
        """
        assert flight.reservation is not None
        unknown = flight.sent and flight.billed
        cancelled = isinstance(exc, asyncio.CancelledError)
        record = self._record(
            adapter,
            spec,
            flight,
            status="unknown" if unknown else "cancelled" if cancelled else "error",
            error=f"{type(exc).__name__}: {exc}"[:500],
        )
        quiet = contextlib.suppress(LedgerError) if isinstance(exc, LedgerError) else None
        with quiet or contextlib.nullcontext():
            if unknown:
                self._ledger.settle(flight.reservation, flight.reservation.usage, record)
            elif not flight.sent and isinstance(exc, LedgerError):
                self._ledger.release(flight.reservation)
            elif not isinstance(exc, LedgerError):
                self._ledger.refund(flight.reservation, record)
        logger.info(
            "%s %s failed after %d attempt(s): %s",
            adapter.provider,
            spec.describe(),
            flight.count,
            record.status,
        )

    def _record(
        self,
        adapter: Adapter,
        spec: RequestSpec,
        flight: _Flight,
        *,
        status: str = "ok",
        error: str | None = None,
        attempts: int | None = None,
    ) -> LedgerRecord:
        """The ledger record of the flight's current reservation (usage filled in on settle)."""
        return LedgerRecord(
            provider=adapter.provider,
            model=adapter.model_for(spec.role),
            endpoint=spec.url,
            queries=len(spec.indices),
            attempts=flight.count - flight.done if attempts is None else attempts,
            status=status,
            latency_s=max(0.0, self._clock() - flight.since),
            error=error,
        )

    async def _http_json(
        self, adapter: Adapter, spec: RequestSpec
    ) -> tuple[int, Mapping[str, str], Any]:
        """Send ``spec``; (status, headers, JSON body). The one boundary where httpx errors are
        mapped to ours."""
        rate_key = (adapter.provider, adapter.model_for(spec.role))
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

    # -- the embeddings batching check -----------------------------------------------------------

    async def _paid(self, adapter: Adapter, spec: RequestSpec, keys: list[str]) -> list[Record]:
        """One request through the whole paid path (reserve, send, store, settle), alone."""
        return await self._request(adapter, spec, keys, _Held())

    async def _check_batching(self, adapter: Adapter) -> None:
        """Refuse a vectors endpoint whose batched answers differ from single ones (checked once
        per endpoint, model and pooling; the verdict is cached). See ``_batch_check``."""
        key, verdict = await self._known_verdict(adapter)
        if verdict is None:
            specs = _probe_specs(adapter)
            if not specs:
                return  # the endpoint takes one input per request: nothing to check
            got = []
            for spec in specs:
                keys = [probe_key(spec.to_json(), i) for i in range(len(spec.indices))]
                got.append([r["h"] for r in await self._paid(adapter, spec, keys)])
            cosine = agreement(got[0], [got[1][0], got[2][0]])
            verdict = {"ok": cosine >= MIN_COSINE, "cosine": cosine}
            if self._cache is not None:
                await asyncio.to_thread(self._cache.set, key, verdict)
        self._verdicts[key] = verdict  # also without a cache: checked once per client
        if not verdict["ok"]:
            base, path = adapter.endpoint("vectors")
            raise UnsupportedCapability(
                f"the embeddings endpoint {base}{path} answers a batch of texts differently "
                f"from the same texts sent alone (cosine {float(verdict['cosine']):.2f}): it "
                "mis-batches, as llama-cpp-python does. Send one text per request: "
                "embeddings_batch_size = 1 in the config (max_embedding_inputs=1 in Python)"
            )

    async def _known_verdict(self, adapter: Adapter) -> tuple[str, dict[str, Any] | None]:
        """The batching check's cache key for ``adapter``'s vectors endpoint, and its verdict
        if this client or an earlier run already reached one."""
        base, path = adapter.endpoint("vectors")
        key = verdict_key(base + path, adapter.model_for("vectors"), adapter.hidden_kind("vectors"))
        verdict = self._verdicts.get(key)
        if verdict is None and self._cache is not None:
            verdict = await asyncio.to_thread(self._cache.get, key)
        return key, verdict

    # -- cache, ledger and label words ------------------------------------------------------------

    def _cache_get_many(self, keys: Sequence[str]) -> dict[str, Record]:
        return self._cache.get_many(list(dict.fromkeys(keys))) if self._cache is not None else {}

    async def _lookup(self, keys: Sequence[str]) -> dict[str, Record]:
        if self._cache is None:
            return {}
        return await asyncio.to_thread(self._cache.claim_many, keys)  # pays once (cache.py)

    async def _record_hits(self, adapter: Adapter, plan: Plan) -> None:
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

    async def _discover(self, attempts: int | None = None) -> Adapter:
        """Ask the server what it serves (free, unbilled), once per call; remember the answer.
        ``attempts=1``: one try, no retries (``estimate``, which can do without)."""
        spec = self.adapter.info_request()
        if spec is None:
            return self.adapter
        _, _, body = await self._free(lambda: self._http_json(self.adapter, spec), attempts)
        adapter = self.adapter.with_info(body)
        logger.info("%s %s: model %s, free", adapter.provider, spec.path, adapter.model)
        if self._cache is not None:
            await asyncio.to_thread(self._cache.set, meta_key(spec), {"body": body})
        return adapter

    def _discovered_offline(self) -> tuple[Adapter, list[str]]:
        spec = self.adapter.info_request()
        if spec is None:
            return self.adapter, []
        stored = self._cache.get(meta_key(spec)) if self._cache is not None else None
        if stored is None:
            return self.adapter, [
                "the server was never asked what model it serves: nothing counted as cached, "
                "and the adapter's settings (model kind, batch size) taken as they are"
            ]
        return self.adapter.with_info(stored["body"]), []

    async def _free(self, fn: Callable[[], Awaitable[T]], attempts: int | None) -> T:
        """A free request: retried per the policy, or tried ``attempts=1`` time only."""
        return await (fn() if attempts == 1 else self._retrier.call(fn, Attempts()))

    async def _resolve_labels(
        self, adapter: Adapter, task: Task, roles: Sequence[Role], attempts: int | None = None
    ) -> tuple[Label, ...]:
        """Each label word's token ids: known to the adapter, stored by an earlier run, or
        asked of the server's tokenizer (free) and stored."""
        resolved: list[tuple[str, Sequence[int] | None]] = []
        for look in label_lookups(adapter, task, roles):
            ids: Sequence[int] | None = look.ids
            if look.spec is not None:
                key = label_key(look.spec, adapter)
                stored = None
                if self._cache is not None:
                    stored = await asyncio.to_thread(self._cache.get, key)
                if stored is not None:
                    ids = list(stored["ids"])
                else:
                    ids = await self._tokenize(adapter, look.spec, attempts)
                    if self._cache is not None:
                        await asyncio.to_thread(self._cache.set, key, {"ids": ids})
            resolved.append((look.word, ids))
        return labels_of(resolved)

    async def _tokenize(
        self, adapter: Adapter, spec: RequestSpec, attempts: int | None = None
    ) -> list[int]:
        async def once() -> list[int]:
            _, _, body = await self._http_json(adapter, spec)
            return adapter.parse_tokenize(spec, body)

        try:
            ids = await self._free(once, attempts)
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
        out, missing = [], []
        for look in label_lookups(adapter, task, roles):
            ids: Sequence[int] | None = look.ids
            if look.spec is not None:
                key = label_key(look.spec, adapter)
                stored = self._cache.get(key) if self._cache is not None else None
                if stored is None:
                    missing.append(look.word)
                else:
                    ids = list(stored["ids"])
            out.append(Label(look.word, tuple(ids or ())))
        return tuple(out), missing

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

    def _close_stores(self) -> None:
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
            f"credentials={_show(self._credentials)}, ledger={self._ledger.location!r})"
        )


# -- helpers --------------------------------------------------------------------------------------


def _may_be_billed(exc: BaseException) -> bool:
    """Whether an attempt that failed this way left and may have been answered (and billed):
    cancelled or timed out while waiting, the connection cut after sending, or a 2xx whose body
    was cut short. Not: no connection was made, or the provider answered with an error status
    (providers bill answers, not errors)."""
    if isinstance(exc, (asyncio.CancelledError, TruncatedResponse)):
        return True
    if isinstance(exc, TransportError) and not isinstance(exc, ProviderStatusError):
        return not isinstance(exc.__cause__, _NOT_SENT)
    return False


def _probe_specs(adapter: Adapter) -> list[RequestSpec]:
    """The batching check's paid requests: the probes in one request, then each alone; [] when
    the vectors endpoint takes one input per request (nothing to check)."""
    prompts = [Prompt(i, text) for i, text in enumerate(PROBES)]
    specs = adapter.build_requests("vectors", prompts, ())
    if len(specs) != 1:
        return []
    return [specs[0], *(adapter.build_requests("vectors", [p], ())[0] for p in prompts)]


def _root(spec: RequestSpec | None) -> str:
    """The server a free request goes to (the estimate asks nothing more of one that failed)."""
    return "" if spec is None else spec.base_url.rstrip("/")


def _why(exc: BaseException) -> str:
    """A failed free request in a few words (its status and URL, or that nothing answered)."""
    if isinstance(exc, ProviderStatusError):
        if exc.status in (404, 405):
            return f"no tokenizer route there (HTTP {exc.status})"
        return f"HTTP {exc.status}"
    if isinstance(exc, MalformedResponse):
        return "its answer was not understood"
    return "not reachable"


def _cache_error(cache: ResponseCache | None, exc: BaseException) -> BaseException:
    """A cache write failure as a ``CacheError`` naming the cache's folder."""
    if isinstance(exc, CacheError) or not isinstance(exc, Exception) or cache is None:
        return exc
    where = cache.location
    text = str(exc)
    full = "full" in text or getattr(exc, "errno", None) == 28
    what = "disk full" if full else f"{type(exc).__name__}"
    return CacheError(
        f"cannot write the response cache at {where}: {what} ({text}); the answer was paid for "
        "and recorded as lost in the ledger; sending stopped"
    )


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

"""The one retry layer, and the one boundary where httpx errors and statuses become ours.

Deciding (which errors, how long to wait, when to stop) is kept apart from doing (``Retrier.call``),
and the wait uses an injectable ``sleep``, ``clock`` and random source, so that tests build
outcomes by hand and never really sleep. The loop is tenacity's ``AsyncRetrying`` object, built per
call from a ``RetryPolicy`` (no decorators, nothing stacked on top).
"""

from __future__ import annotations

import json
import logging
import random as _random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from dect_maas._exceptions import (
    AuthenticationError,
    ConfigError,
    DectError,
    MalformedResponse,
    ProviderError,
    ProviderStatusError,
    QuotaExhausted,
    RateLimited,
    ServerError,
    TransportError,
)

from .settings import RetryPolicy

__all__ = [
    "Attempts",
    "Retrier",
    "RetryableStatus",
    "TruncatedResponse",
    "error_for_status",
    "is_connect_failure",
    "is_retryable",
    "map_httpx_error",
    "origin",
    "retry_after_s",
]

T = TypeVar("T")
logger = logging.getLogger("dect_maas")

_QUOTA_MARKERS = ("insufficient_quota", "quota_exceeded", "exceeded your current quota", "billing")
_QUOTE_CHARS = 200


class RetryableStatus(ProviderStatusError):
    """408, 409, or a status the server marked ``x-should-retry: true``."""


class TruncatedResponse(MalformedResponse):
    """A 2xx whose body is not complete JSON (cut short on the way): worth another attempt."""


def is_retryable(exc: BaseException) -> bool:
    return isinstance(
        exc, (TransportError, RateLimited, ServerError, RetryableStatus, TruncatedResponse)
    )


# -- the httpx boundary --------------------------------------------------------------------------


def map_httpx_error(exc: Exception, request: str) -> DectError:
    """Our error for an httpx exception; the caller raises it ``from exc``.

    Network failures and timeouts may succeed on another attempt (TransportError); a URL or
    protocol we cannot use is a configuration mistake; anything else is a provider error that
    retrying will not fix.
    """
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return TransportError(f"request timed out ({name})", request=request)
    if isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError)):
        return TransportError(f"connection failed ({name}: {exc})", request=request)
    if isinstance(exc, (httpx.InvalidURL, httpx.UnsupportedProtocol)):
        return ConfigError(f"cannot send to this URL ({name}: {exc}) [{request}]")
    if isinstance(exc, httpx.DecodingError):
        return MalformedResponse(f"response body could not be decoded ({name})", request=request)
    if isinstance(exc, httpx.HTTPStatusError):
        return ProviderStatusError(
            f"HTTP {exc.response.status_code}", status=exc.response.status_code, request=request
        )
    return ProviderError(f"request failed ({name}: {exc})", request=request)


def retry_after_s(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, else ``Retry-After`` (s or date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def provider_message(text: str) -> str:
    """The provider's own error text, shortened, to be quoted (never shown as ours)."""
    message = text
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            err = err.get("message") or err.get("type") or err.get("detail") or err
        message = err if isinstance(err, str) else json.dumps(err)[:_QUOTE_CHARS]
    message = " ".join(message.split())
    if len(message) > _QUOTE_CHARS:
        message = message[:_QUOTE_CHARS] + "…"
    return message or "(empty message)"


def error_for_status(
    status: int,
    headers: Mapping[str, str],
    text: str,
    *,
    provider: str,
    request: str,
    scrub: Callable[[str], str] = lambda s: s,
) -> ProviderStatusError:
    """Our error for a non-2xx answer. The provider's text is quoted as theirs, truncated."""
    said = scrub(provider_message(text))
    msg = f"{provider} answered HTTP {status}; the provider said: {said!r}"
    should = headers.get("x-should-retry", "").strip().lower()
    wait = retry_after_s(headers)
    lowered = text.lower()
    if status == 402 or (status == 429 and any(m in lowered for m in _QUOTA_MARKERS)):
        return QuotaExhausted(
            msg + " (quota or credit exhausted: not retried)", status=status, request=request
        )
    if status in (401, 403):
        return AuthenticationError(msg, status=status, request=request)
    if should == "false":
        return ProviderStatusError(msg, status=status, request=request)
    if status == 429 or (status == 503 and wait is not None):
        return RateLimited(msg, status=status, retry_after=wait, request=request)
    if status >= 500:
        return ServerError(msg, status=status, request=request)
    if status in (408, 409) or should == "true":
        return RetryableStatus(msg, status=status, request=request)
    return ProviderStatusError(msg, status=status, request=request)


# -- the retry loop -------------------------------------------------------------------------------


@dataclass
class Attempts:
    """How many attempts a request took (for the ledger), whatever the outcome.

    ``ridden``: connection failures retried under ``RetryPolicy.connect_retry_s`` (not counted
    against ``max_attempts``). Whether a failed attempt may have been billed is the client's
    call (``client._may_be_billed``), made per attempt.
    """

    count: int = 0
    ridden: int = 0
    refused_since: float | None = None


def _cause(exc: BaseException) -> BaseException | None:
    return exc.__cause__


def is_connect_failure(exc: BaseException) -> bool:
    """Nothing took the connection (refused, unreachable, connect timeout): the request never
    left, so the provider cannot have done (or billed) any work for this attempt."""
    return (
        isinstance(exc, TransportError)
        and not isinstance(exc, ProviderStatusError)
        and isinstance(_cause(exc), (httpx.ConnectError, httpx.ConnectTimeout))
    )


def origin(url: str | None) -> str:
    """``scheme://host:port`` of a URL: what a restart takes down and brings back."""
    if not url:
        return ""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return url
    return f"{u.scheme}://{u.host}:{u.port or (443 if u.scheme == 'https' else 80)}"


class Retrier:
    """Runs one request under a ``RetryPolicy``.

    It remembers which servers (origins) have answered, so that a connection refused by one of
    them is taken for a restart and ridden out (``RetryPolicy.connect_retry_s``), while one that
    never answered fails as fast as any other error.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        sleep: Callable[[float], Awaitable[Any]],
        clock: Callable[[], float] = time.monotonic,
        rng: _random.Random | None = None,
    ) -> None:
        self.policy = policy
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or _random.Random()
        self._answered: set[str] = set()
        self._warned: dict[str, float] = {}  # origin -> when its outage was last announced

    def wait_s(self, attempt_number: int, exc: BaseException | None) -> float:
        """Server-given wait (capped) if any, else full-jitter exponential backoff."""
        p = self.policy
        hinted = getattr(exc, "retry_after", None)
        if isinstance(hinted, (int, float)):
            return float(min(max(0.0, hinted), p.max_retry_after_s))
        ceiling = min(p.max_backoff_s, p.initial_backoff_s * 2 ** (attempt_number - 1))
        return self._rng.uniform(0.0, ceiling)

    def _riding(self, attempts: Attempts, exc: BaseException | None) -> bool:
        return attempts.refused_since is not None and exc is not None and is_connect_failure(exc)

    def _stops(self, attempts: Attempts, exc: BaseException | None, start: float) -> bool:
        p = self.policy
        now = self._clock()
        if now - start >= p.max_total_s:
            return True
        if self._riding(attempts, exc):
            assert attempts.refused_since is not None
            return now - attempts.refused_since >= p.connect_retry_s
        return attempts.count - attempts.ridden >= p.max_attempts

    def _wait(self, attempts: Attempts, exc: BaseException | None, start: float) -> float:
        p = self.policy
        now = self._clock()
        remaining = max(0.0, p.max_total_s - (now - start))
        if self._riding(attempts, exc):
            assert attempts.refused_since is not None
            remaining = min(remaining, max(0.0, p.connect_retry_s - (now - attempts.refused_since)))
            ceiling = min(p.connect_backoff_s, p.initial_backoff_s * 2 ** (attempts.ridden - 1))
            return min(self._rng.uniform(ceiling / 2.0, ceiling), remaining)
        return min(self.wait_s(attempts.count - attempts.ridden, exc), remaining)

    def _note(self, exc: BaseException, attempts: Attempts, where: str) -> None:
        """Note a server that answered (an HTTP status, a body), and ride out connection
        failures at a server that has answered before (a restart)."""
        if isinstance(exc, (ProviderStatusError, MalformedResponse)):
            self._answered.add(where)  # it answered, if not as we wished
            return
        if not isinstance(exc, TransportError) or not is_connect_failure(exc):
            return
        if where not in self._answered or self.policy.connect_retry_s <= 0:
            return
        now = self._clock()
        attempts.ridden += 1
        if attempts.refused_since is None:
            attempts.refused_since = now
        last = self._warned.get(where)
        if last is None or now - last > self.policy.connect_retry_s:
            self._warned[where] = now
            logger.warning(
                "%s stopped taking connections (%s); retrying for up to %gs in case it is "
                "restarting (RetryPolicy.connect_retry_s)",
                where,
                exc,
                self.policy.connect_retry_s,
            )

    def _retrying(self, start: float, attempts: Attempts) -> AsyncRetrying:
        """Tenacity's loop for the attempts after the first (decisions read ``attempts``)."""

        def stop(state: RetryCallState) -> bool:
            exc = state.outcome.exception() if state.outcome else None
            return self._stops(attempts, exc, start)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return self._wait(attempts, exc, start)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            _log_retry(
                attempts.count,
                exc,
                state.next_action.sleep if state.next_action else 0.0,
            )

        return AsyncRetrying(
            stop=stop,
            wait=wait,
            retry=retry_if_exception(is_retryable),
            sleep=self._sleep,
            reraise=True,
            before_sleep=before_sleep,
        )

    async def call(
        self, fn: Callable[[], Awaitable[T]], attempts: Attempts, endpoint: str | None = None
    ) -> T:
        """Run ``fn`` until it succeeds or the policy stops; ``endpoint`` (the URL) says which
        server the request goes to, for the connection ride-out."""
        # The first attempt runs bare (most requests succeed at once and tenacity's machinery
        # costs ~50 us a call); after a retryable failure, the same decisions (stop, wait, log)
        # are made for it here, and tenacity runs the attempts that follow.
        where = origin(endpoint)
        start = self._clock()

        async def once() -> T:
            attempts.count += 1
            try:
                result = await fn()
            except Exception as exc:
                self._note(exc, attempts, where)
                raise
            if self._warned.pop(where, None) is not None:
                logger.warning("%s answers again", where)
            self._answered.add(where)
            return result

        try:
            return await once()
        except Exception as exc:
            if not is_retryable(exc) or self._stops(attempts, exc, start):
                raise
            first = exc
        wait = self._wait(attempts, first, start)
        _log_retry(1, first, wait)
        await self._sleep(wait)
        async for attempt in self._retrying(start, attempts):
            with attempt:
                return await once()
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover


def _log_retry(attempt_number: int, exc: BaseException | None, wait: float) -> None:
    logger.info(
        "retrying after attempt %d (%s), waiting %.2fs",
        attempt_number,
        type(exc).__name__,
        wait,
    )

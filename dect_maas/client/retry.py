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
    "is_retryable",
    "map_httpx_error",
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
    """How many attempts a request took (for the ledger), whatever the outcome."""

    count: int = 0


class Retrier:
    """Runs one request under a ``RetryPolicy``."""

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

    def wait_s(self, attempt_number: int, exc: BaseException | None) -> float:
        """Server-given wait (capped) if any, else full-jitter exponential backoff."""
        p = self.policy
        hinted = getattr(exc, "retry_after", None)
        if isinstance(hinted, (int, float)):
            return float(min(max(0.0, hinted), p.max_retry_after_s))
        ceiling = min(p.max_backoff_s, p.initial_backoff_s * 2 ** (attempt_number - 1))
        return self._rng.uniform(0.0, ceiling)

    def _stops(self, attempt_number: int, start: float) -> bool:
        p = self.policy
        return attempt_number >= p.max_attempts or self._clock() - start >= p.max_total_s

    def _wait(self, attempt_number: int, exc: BaseException | None, start: float) -> float:
        remaining = max(0.0, self.policy.max_total_s - (self._clock() - start))
        return min(self.wait_s(attempt_number, exc), remaining)

    def _retrying(self, start: float, done: int) -> AsyncRetrying:
        """Tenacity's loop for the attempts after the first ``done`` (numbers shifted by it)."""

        def stop(state: RetryCallState) -> bool:
            return self._stops(state.attempt_number + done, start)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return self._wait(state.attempt_number + done, exc, start)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            _log_retry(
                state.attempt_number + done,
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

    async def call(self, fn: Callable[[], Awaitable[T]], attempts: Attempts) -> T:
        # The first attempt runs bare (most requests succeed at once and tenacity's machinery
        # costs ~50 us a call); after a retryable failure, the same decisions (stop, wait, log)
        # are made for it here, and tenacity runs the attempts that follow.
        start = self._clock()
        attempts.count += 1
        try:
            return await fn()
        except Exception as exc:
            if not is_retryable(exc) or self._stops(1, start):
                raise
            first = exc
        wait = self._wait(1, first, start)
        _log_retry(1, first, wait)
        await self._sleep(wait)
        async for attempt in self._retrying(start, done=1):
            with attempt:
                attempts.count += 1
                return await fn()
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover


def _log_retry(attempt_number: int, exc: BaseException | None, wait: float) -> None:
    logger.info(
        "retrying after attempt %d (%s), waiting %.2fs",
        attempt_number,
        type(exc).__name__,
        wait,
    )

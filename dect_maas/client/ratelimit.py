"""Client-side pacing: token buckets per (provider, model), corrected by what the server says.

Each acquire debits the buckets at once (a bucket may go into debt) and returns how long to wait, so
concurrent asyncio tasks queue fairly with no lock. Server headers correct the picture:
``Retry-After`` pauses every request to that model; ``x-ratelimit-remaining-*`` lowers the level to
what the server counts and, at zero, ``x-ratelimit-reset-*`` pauses until the window resets. The
clock and sleep are injected, so tests never really wait.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .retry import retry_after_s
from .settings import RateLimit

__all__ = ["RateLimiter", "TokenBucket", "parse_duration_s"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration_s(value: str) -> float | None:
    """Seconds in ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"`` (OpenAI's reset headers)."""
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


class TokenBucket:
    """``rate_per_s`` refill up to ``capacity``; amounts beyond capacity wait for a full bucket."""

    def __init__(self, rate_per_s: float, capacity: float, clock: Callable[[], float]) -> None:
        self.rate = rate_per_s
        self.capacity = max(1.0, capacity)
        self.level = self.capacity
        self._clock = clock
        self._updated = clock()

    def _refill(self) -> float:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._updated) * self.rate)
        self._updated = now
        return now

    def reserve(self, amount: float) -> float:
        """Debit ``amount`` now; return the seconds to wait before using it."""
        self._refill()
        self.level -= min(amount, self.capacity)
        return max(0.0, -self.level / self.rate)

    def observe_remaining(self, remaining: float) -> None:
        self._refill()
        self.level = min(self.level, remaining)


class _Gate:
    def __init__(self, limit: RateLimit, clock: Callable[[], float]) -> None:
        self.requests = (
            None
            if limit.requests_per_minute is None
            else TokenBucket(
                limit.requests_per_minute / 60.0,
                limit.requests_per_minute / 60.0 * limit.burst_s,
                clock,
            )
        )
        self.tokens = (
            None
            if limit.tokens_per_minute is None
            else TokenBucket(
                limit.tokens_per_minute / 60.0,
                limit.tokens_per_minute / 60.0 * max(limit.burst_s, 1.0),
                clock,
            )
        )
        self.paused_until = 0.0


class RateLimiter:
    """Buckets for requests/min and tokens/min per (provider, model)."""

    def __init__(
        self,
        limit: RateLimit,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]],
    ) -> None:
        self.limit = limit
        self._clock = clock
        self._sleep = sleep
        self._gates: dict[tuple[str, str], _Gate] = {}

    def _gate(self, key: tuple[str, str]) -> _Gate:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(self.limit, self._clock)
        return gate

    def delay(self, key: tuple[str, str], tokens: int) -> float:
        """Reserve one request and ``tokens`` input tokens; seconds to wait before sending."""
        gate = self._gate(key)
        wait = max(0.0, gate.paused_until - self._clock())
        if gate.requests is not None:
            wait = max(wait, gate.requests.reserve(1))
        if gate.tokens is not None:
            wait = max(wait, gate.tokens.reserve(tokens))
        return wait

    async def acquire(self, key: tuple[str, str], tokens: int) -> float:
        wait = self.delay(key, tokens)
        if wait > 0:
            await self._sleep(wait)
        return wait

    def observe(self, key: tuple[str, str], status: int, headers: Mapping[str, str]) -> None:
        """Correct the buckets from a response's headers."""
        gate = self._gate(key)
        now = self._clock()
        if status == 429 or status == 503:
            wait = retry_after_s(headers)
            if wait is not None:
                gate.paused_until = max(gate.paused_until, now + wait)
        for kind, bucket in (("requests", gate.requests), ("tokens", gate.tokens)):
            remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
            if remaining is None:
                continue
            if bucket is not None:
                bucket.observe_remaining(remaining)
            reset = headers.get(f"x-ratelimit-reset-{kind}")
            reset_s = parse_duration_s(reset) if reset is not None else None
            if remaining <= 0 and reset_s is not None:
                gate.paused_until = max(gate.paused_until, now + reset_s)


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None

"""Small frozen settings for the client: retries, rate limits and the credential.

The credential is never a constructor argument that could end up in a config file: the user names
an environment variable and ``Credentials`` reads it when a request is sent. Its repr is masked.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from dect_maas._exceptions import ConfigError

__all__ = ["Credentials", "RateLimit", "RetryPolicy"]


def _positive(owner: str, name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{owner}.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to retry (one retry layer for the whole client).

    Retried: connect/read errors and timeouts, 408, 409, 429 (unless the quota is exhausted) and
    5xx, and 2xx bodies cut short. Waits are full-jitter exponential (``uniform(0,
    min(max_backoff_s, initial_backoff_s * 2**n))``) unless the server says when (``Retry-After``,
    ``retry-after-ms``), which is honoured up to ``max_retry_after_s``. ``max_attempts`` counts the
    first try; ``max_total_s`` bounds the time spent on one request including its waits.

    A server that restarts refuses connections for a while. So a **connection failure** (refused,
    unreachable, connect timeout: the request never left) at a server that has answered this
    client before is retried for up to ``connect_retry_s`` from the first such failure, whatever
    ``max_attempts`` says, waiting at most ``connect_backoff_s`` between tries (and always within
    ``max_total_s``). A server that never answered gets ``max_attempts`` like any other failure,
    so a run pointed at nothing fails within seconds. ``connect_retry_s=0`` turns the ride-out off.
    """

    max_attempts: int = 5
    max_total_s: float = 120.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 20.0
    max_retry_after_s: float = 60.0
    connect_retry_s: float = 60.0
    connect_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ConfigError(f"RetryPolicy.max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ConfigError("RetryPolicy.max_attempts must be at least 1 (1 means no retry)")
        for name in (
            "max_total_s",
            "initial_backoff_s",
            "max_backoff_s",
            "max_retry_after_s",
            "connect_backoff_s",
        ):
            _positive("RetryPolicy", name, getattr(self, name))
        c = self.connect_retry_s
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ConfigError(
                f"RetryPolicy.connect_retry_s must be a number of seconds >= 0 (0: no ride-out), "
                f"got {c!r}"
            )


@dataclass(frozen=True)
class RateLimit:
    """Client-side pacing per (provider, model): requests and input tokens per minute.

    ``None`` means no limit of that kind. The buckets start full (``burst`` seconds' worth, at least
    one request) and are corrected from the server's ``Retry-After`` and ``x-ratelimit-*`` headers.
    """

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    burst_s: float = 1.0

    def __post_init__(self) -> None:
        _positive("RateLimit", "requests_per_minute", self.requests_per_minute, allow_none=True)
        _positive("RateLimit", "tokens_per_minute", self.tokens_per_minute, allow_none=True)
        _positive("RateLimit", "burst_s", self.burst_s)


@dataclass(frozen=True)
class Credentials:
    """An API key read from the environment variable ``env``, sent as ``Authorization: Bearer``.

    Only the variable's name is stored; ``repr``/``str`` never show the key.
    """

    env: str

    def __post_init__(self) -> None:
        if not isinstance(self.env, str) or not self.env or "=" in self.env:
            raise ConfigError(
                "Credentials.env must name an environment variable (e.g. 'OPENAI_API_KEY'), "
                "not hold the key itself"
            )

    def secret(self) -> str:
        value = os.environ.get(self.env)
        if not value:
            raise ConfigError(
                f"environment variable {self.env} is not set or empty; export the API key there"
            )
        return value

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret()}"}

    def scrub(self, text: str) -> str:
        """``text`` with the key (if set) replaced by a mask: for provider messages we quote."""
        value = os.environ.get(self.env)
        return text.replace(value, "***") if value else text

    def __repr__(self) -> str:
        return f"Credentials(env={self.env!r}, key=***)"

    __str__ = __repr__

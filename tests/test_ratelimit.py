"""Token buckets per (provider, model) with a fake clock: pacing is computed, never slept.

Reaches inside: the token buckets are an internal of the client.
"""

from __future__ import annotations

import asyncio

import pytest

from dect_maas import ConfigError, RateLimit
from dect_maas.client.ratelimit import RateLimiter, parse_duration_s

KEY = ("openai", "gpt")


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def limiter(t: FakeTime, **limit: float) -> RateLimiter:
    return RateLimiter(RateLimit(**limit), clock=t.clock, sleep=t.sleep)


def test_no_limit_never_waits() -> None:
    t = FakeTime()
    rl = limiter(t)
    assert [rl.delay(KEY, 10**6) for _ in range(1000)] == [0.0] * 1000


def test_requests_per_minute_paces_after_the_burst() -> None:
    t = FakeTime()
    rl = limiter(t, requests_per_minute=120, burst_s=1.0)  # 2/s, bucket of 2
    waits = [rl.delay(KEY, 0) for _ in range(6)]
    # two go at once, then each waits half a second more than the one before (reserved slots)
    assert waits == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.5, 2.0])
    t.now += 10.0  # the bucket refills to its capacity, no more
    assert [rl.delay(KEY, 0) for _ in range(3)] == pytest.approx([0.0, 0.0, 0.5])


def test_tokens_per_minute_and_buckets_are_per_model() -> None:
    t = FakeTime()
    rl = limiter(t, tokens_per_minute=6000)  # 100 tokens/s, bucket of 100
    assert rl.delay(KEY, 100) == 0.0
    assert rl.delay(KEY, 50) == pytest.approx(0.5)
    assert rl.delay(("openai", "other"), 100) == 0.0  # another model has its own bucket
    # a request bigger than the bucket waits for a full bucket, not forever
    t.now += 100.0
    assert rl.delay(KEY, 10**6) == 0.0
    assert rl.delay(KEY, 1) == pytest.approx(0.01)


def test_acquire_sleeps_through_the_injected_sleep() -> None:
    t = FakeTime()
    rl = limiter(t, requests_per_minute=60)

    async def go() -> list[float]:
        return [await rl.acquire(KEY, 0) for _ in range(3)]

    waits = asyncio.run(go())
    assert waits == pytest.approx([0.0, 1.0, 1.0])  # each acquire waits out its own debt
    assert t.sleeps == pytest.approx([1.0, 1.0])
    assert t.now == pytest.approx(2.0)


def test_retry_after_pauses_every_request_to_that_model() -> None:
    t = FakeTime()
    rl = limiter(t)
    rl.observe(KEY, 429, {"retry-after": "7"})
    assert rl.delay(KEY, 0) == pytest.approx(7.0)
    assert rl.delay(("openai", "other"), 0) == 0.0
    t.now += 7.0
    assert rl.delay(KEY, 0) == 0.0
    rl.observe(KEY, 200, {"retry-after": "30"})  # only a refusal carries a pause
    assert rl.delay(KEY, 0) == 0.0


def test_ratelimit_headers_correct_the_buckets() -> None:
    t = FakeTime()
    rl = limiter(t, requests_per_minute=600, burst_s=10.0)  # 10/s, bucket of 100
    assert rl.delay(KEY, 0) == 0.0
    # the server says only 1 request is left: our bucket drops to it, the next waits
    rl.observe(KEY, 200, {"x-ratelimit-remaining-requests": "1"})
    assert rl.delay(KEY, 0) == 0.0
    assert rl.delay(KEY, 0) == pytest.approx(0.1)
    # nothing left until the window resets in 6m0s: everyone waits for the reset
    rl.observe(
        KEY,
        200,
        {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"},
    )
    assert rl.delay(KEY, 0) == pytest.approx(360.0)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("2.5", 2.5)],
)
def test_reset_durations(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == pytest.approx(seconds)


def test_bad_durations_and_limits() -> None:
    assert parse_duration_s("soon") is None
    assert parse_duration_s("5 s") is None
    with pytest.raises(ConfigError, match="requests_per_minute"):
        RateLimit(requests_per_minute=0)
    with pytest.raises(ConfigError, match="tokens_per_minute"):
        RateLimit(tokens_per_minute=float("inf"))

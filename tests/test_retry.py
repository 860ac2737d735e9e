"""The retry layer and the httpx boundary, with a fake clock and sleep: nothing really waits.

Reaches inside: the retry layer and the httpx error mapping are internals of the client.
"""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import Awaitable, Callable

import httpx
import pytest

from dect_maas import (
    AuthenticationError,
    ConfigError,
    DectError,
    MalformedResponse,
    ProviderError,
    ProviderStatusError,
    QuotaExhausted,
    RateLimited,
    RetryPolicy,
    ServerError,
    TransportError,
)
from dect_maas.client.retry import (
    Attempts,
    Retrier,
    RetryableStatus,
    TruncatedResponse,
    error_for_status,
    is_retryable,
    map_httpx_error,
    retry_after_s,
)


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def status(code: int, headers: dict[str, str] | None = None, text: str = "{}") -> Exception:
    return error_for_status(code, headers or {}, text, provider="p", request="POST /x")


@pytest.mark.parametrize(
    ("code", "headers", "text", "kind", "retry"),
    [
        (429, {"retry-after": "3"}, "{}", RateLimited, True),
        (429, {}, '{"error": {"type": "insufficient_quota"}}', QuotaExhausted, False),
        (402, {}, "{}", QuotaExhausted, False),
        (401, {}, "{}", AuthenticationError, False),
        (403, {}, "{}", AuthenticationError, False),
        (400, {}, "{}", ProviderStatusError, False),
        (404, {}, "{}", ProviderStatusError, False),
        (422, {}, "{}", ProviderStatusError, False),
        (408, {}, "{}", RetryableStatus, True),
        (409, {}, "{}", RetryableStatus, True),
        (500, {}, "{}", ServerError, True),
        (502, {}, "{}", ServerError, True),
        (503, {}, "{}", ServerError, True),
        (503, {"retry-after": "2"}, "{}", RateLimited, True),
        (500, {"x-should-retry": "false"}, "{}", ProviderStatusError, False),
        (400, {"x-should-retry": "true"}, "{}", RetryableStatus, True),
    ],
)
def test_statuses_map_to_the_tree_and_retry_only_what_may_succeed(
    code: int, headers: dict[str, str], text: str, kind: type, retry: bool
) -> None:
    err = status(code, headers, text)
    assert type(err) is kind
    assert is_retryable(err) is retry
    assert err.status == code  # type: ignore[attr-defined]


def test_retry_after_forms() -> None:
    assert retry_after_s({"retry-after": "2.5"}) == 2.5
    assert retry_after_s({"retry-after-ms": "150", "retry-after": "9"}) == pytest.approx(0.15)
    when = "Fri, 27 Nov 2026 12:00:10 GMT"
    noon = 1795780800.0  # 2026-11-27T12:00:00Z
    assert retry_after_s({"retry-after": when}, now=noon) == pytest.approx(10.0)
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None
    err = status(429, {"retry-after-ms": "250"})
    assert isinstance(err, RateLimited)
    assert err.retry_after == pytest.approx(0.25)


def _httpx_exception_classes() -> list[type[Exception]]:
    return sorted(
        (
            obj
            for name in httpx.__all__
            if inspect.isclass(obj := getattr(httpx, name)) and issubclass(obj, Exception)
        ),
        key=lambda c: c.__name__,
    )


def _instance(cls: type[Exception]) -> Exception:
    request = httpx.Request("POST", "http://x/v1")
    if issubclass(cls, httpx.HTTPStatusError):
        return cls("boom", request=request, response=httpx.Response(500, request=request))
    if issubclass(cls, httpx.RequestError):
        return cls("boom", request=request)
    try:
        return cls()
    except TypeError:
        return cls("boom")


def test_every_httpx_exception_is_mapped_at_the_boundary() -> None:
    classes = _httpx_exception_classes()
    assert len(classes) >= 25  # the enumeration really found httpx's tree
    for cls in classes:
        mapped = map_httpx_error(_instance(cls), "POST /v1/features for example(s) 0")
        assert isinstance(mapped, DectError), cls
        assert "POST /v1/features" in str(mapped), cls
        if issubclass(cls, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)):
            assert isinstance(mapped, TransportError), cls
            assert is_retryable(mapped), cls
        elif issubclass(cls, (httpx.InvalidURL, httpx.UnsupportedProtocol)):
            assert isinstance(mapped, ConfigError), cls
        else:
            assert isinstance(mapped, ProviderError | ConfigError), cls
            assert not is_retryable(mapped) or isinstance(mapped, TransportError), cls


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def make(policy: RetryPolicy, t: FakeTime, seed: int = 0) -> Retrier:
    return Retrier(policy, sleep=t.sleep, clock=t.clock, rng=random.Random(seed))


def test_retries_until_success_with_full_jitter_backoff() -> None:
    t = FakeTime()
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=1.0, max_backoff_s=3.0)
    outcomes: list[Exception | str] = [status(500), status(502), TransportError("x"), "ok"]

    async def fn() -> str:
        out = outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return out

    attempts = Attempts()
    assert run(make(policy, t).call(fn, attempts)) == "ok"
    assert attempts.count == 4
    assert len(t.sleeps) == 3
    # full jitter: uniform(0, min(cap, base * 2**n)) for n = 0, 1, 2
    for wait, ceiling in zip(t.sleeps, [1.0, 2.0, 3.0], strict=True):
        assert 0.0 <= wait <= ceiling
    rng = random.Random(0)
    assert t.sleeps == pytest.approx([rng.uniform(0, c) for c in (1.0, 2.0, 3.0)])


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    t = FakeTime()
    policy = RetryPolicy(max_attempts=3, max_retry_after_s=5.0)
    errors = [status(429, {"retry-after": "2"}), status(429, {"retry-after": "600"})]

    async def fn() -> str:
        if errors:
            raise errors.pop(0)
        return "ok"

    assert run(make(policy, t).call(fn, Attempts())) == "ok"
    assert t.sleeps == [2.0, 5.0]


@pytest.mark.parametrize(
    "error",
    [
        status(429, {}, '{"error": {"code": "insufficient_quota"}}'),
        status(401),
        status(400),
        MalformedResponse("bad shape"),
    ],
)
def test_what_cannot_succeed_is_never_retried(error: Exception) -> None:
    t = FakeTime()
    attempts = Attempts()

    async def fn() -> str:
        raise error

    with pytest.raises(type(error)):
        run(make(RetryPolicy(max_attempts=5), t).call(fn, attempts))
    assert attempts.count == 1
    assert t.sleeps == []


def test_attempts_are_bounded_in_number_and_in_total_time() -> None:
    t = FakeTime()
    attempts = Attempts()

    async def fail() -> str:
        raise TruncatedResponse("cut short")

    with pytest.raises(TruncatedResponse):
        run(make(RetryPolicy(max_attempts=4, initial_backoff_s=0.1), t).call(fail, attempts))
    assert attempts.count == 4

    t = FakeTime()
    attempts = Attempts()
    policy = RetryPolicy(max_attempts=100, max_total_s=10.0, max_retry_after_s=60.0)

    async def slow() -> str:
        raise status(503, {"retry-after": "3"})

    with pytest.raises(RateLimited):
        run(make(policy, t).call(slow, attempts))
    assert attempts.count == 5  # waits 3+3+3 then 1 (what is left of 10 s), then stops
    assert sum(t.sleeps) == pytest.approx(10.0)


def test_policy_is_validated() -> None:
    with pytest.raises(ConfigError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ConfigError, match="max_total_s"):
        RetryPolicy(max_total_s=-1)


def refused() -> TransportError:
    exc = TransportError("connection failed (ConnectError: refused)")
    exc.__cause__ = httpx.ConnectError("refused")
    return exc


def cut() -> TransportError:
    exc = TransportError("connection failed (RemoteProtocolError: disconnected)")
    exc.__cause__ = httpx.RemoteProtocolError("Server disconnected without sending a response")
    return exc


URL = "http://127.0.0.1:8000/v1/features"


def test_refused_connections_at_a_server_that_answered_are_ridden_out_for_connect_retry_s() -> None:
    t = FakeTime()
    policy = RetryPolicy(max_attempts=3, connect_retry_s=30.0, connect_backoff_s=2.0)
    retrier = make(policy, t)
    assert run(retrier.call(_returns("ok"), Attempts(), URL)) == "ok"  # the server answered once
    outcomes: list[Exception | str] = [cut()] + [refused()] * 12 + ["ok"]

    async def fn() -> str:
        out = outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return out

    attempts = Attempts()
    assert run(retrier.call(fn, attempts, URL)) == "ok"  # 14 attempts, max_attempts is 3
    assert attempts.count == 14
    assert attempts.ridden == 12
    ridden = t.sleeps[1:]
    assert all(w <= 2.0 for w in ridden)
    assert sum(ridden) < 30.0

    # a server that stays down: refused for connect_retry_s, then the error
    t2 = FakeTime()
    retrier = make(policy, t2)
    run(retrier.call(_returns("ok"), Attempts(), URL))
    attempts = Attempts()

    async def down() -> str:
        raise refused()

    with pytest.raises(TransportError):
        run(retrier.call(down, attempts, URL))
    assert sum(t2.sleeps) == pytest.approx(30.0)  # the window, to the second
    assert 15 <= attempts.count <= 60


def test_refused_connections_at_a_server_that_never_answered_get_max_attempts() -> None:
    t = FakeTime()
    attempts = Attempts()

    async def down() -> str:
        raise refused()

    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.5)
    with pytest.raises(TransportError):
        run(make(policy, t).call(down, attempts, URL))
    assert attempts.count == 3
    assert attempts.ridden == 0
    assert sum(t.sleeps) <= 0.5 + 1.0  # a run pointed at nothing fails within seconds

    # connect_retry_s=0 turns the ride-out off, even at a server that answered
    t = FakeTime()
    retrier = make(RetryPolicy(max_attempts=3, connect_retry_s=0), t)
    run(retrier.call(_returns("ok"), Attempts(), URL))
    attempts = Attempts()
    with pytest.raises(TransportError):
        run(retrier.call(down, attempts, URL))
    assert attempts.count == 3


def test_connect_retry_s_is_validated() -> None:
    with pytest.raises(ConfigError, match="connect_retry_s"):
        RetryPolicy(connect_retry_s=-1)
    with pytest.raises(ConfigError, match="connect_backoff_s"):
        RetryPolicy(connect_backoff_s=0)
    assert RetryPolicy().connect_retry_s == 60.0


def _returns(value: str) -> Callable[[], Awaitable[str]]:
    async def fn() -> str:
        return value

    return fn

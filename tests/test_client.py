"""The client chain against a deterministic provider behind httpx.MockTransport.

Real cache and ledger folders; only the network is replaced. Values are known exactly (the fake
model hashes its inputs), so every number below is checked against what the provider computed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from faultserver import FakeModel, MockProvider, SlowCache
from hypothesis import given, settings
from hypothesis import strategies as st

from dect_maas import (
    BudgetExceeded,
    ConfigError,
    MultiTokenLabelWarning,
    ProviderStatusError,
    QuotaExhausted,
    Task,
    TransportError,
)
from dect_maas.adapters import LocalAdapter
from dect_maas.client.budget import BudgetLimits, Usage
from dect_maas.client.cache import CacheConfig
from dect_maas.client.client import Client
from dect_maas.client.settings import RateLimit, RetryPolicy

TASK = Task("{text} Overall, it was {mask}", {"neg": ["bad", "awful"], "pos": "great"})
TEXTS = [f"review number {i}" for i in range(10)]
MODEL = FakeModel()


def expected(texts: list[str], words: tuple[str, ...] = (" bad", " awful", " great")) -> np.ndarray:
    ids = [MODEL.token_ids(w)[0] for w in words]
    flat = np.array([[MODEL.logit(f"{t} Overall, it was", i) - 10.0 for i in ids] for t in texts])
    return np.stack([flat[:, :2].max(axis=1), flat[:, 2]], axis=1)  # max over a class's words


def make(provider: MockProvider, tmp_path: Path, *, batch: int = 3, **kwargs: Any) -> Client:
    """A client on ``provider`` (or on ``transport=`` given) with a cache and ledger in tmp."""
    kwargs.setdefault("ledger", tmp_path / "ledger")
    kwargs.setdefault("cache", CacheConfig(tmp_path / "cache"))
    kwargs.setdefault("transport", provider.transport())
    return Client(LocalAdapter("http://fake", max_inputs_per_request=batch), **kwargs)


def test_features_are_the_providers_in_order_with_content_free(tmp_path: Path) -> None:
    provider = MockProvider()
    with make(provider, tmp_path) as client:
        feats = client.features(TASK, TEXTS)
        summary = client.ledger.summary()
    assert feats.scores is not None
    assert feats.hidden is not None
    np.testing.assert_allclose(feats.scores, expected(TEXTS), atol=1e-5)
    np.testing.assert_allclose(
        feats.hidden, [MODEL.hidden(f"{t} Overall, it was") for t in TEXTS], atol=1e-6
    )
    assert feats.content_free is not None
    np.testing.assert_allclose(feats.content_free, expected([""])[0], atol=1e-5)
    assert feats.meta.revision == FakeModel.fingerprint
    assert feats.meta.score_kind == "logprobs"  # causal model: log-probabilities
    assert feats.meta.hidden_kind == "last_hidden"
    ids = [MODEL.token_ids(w)[0] for w in (" bad", " awful", " great")]
    assert feats.meta.label_token_ids == ((ids[0], ids[1]), (ids[2],))
    # 11 queries (10 + content-free) in batches of 3 -> 4 requests, base64 vectors asked for
    batches = provider.sent()
    assert sorted(len(b["inputs"]) for b in batches) == [2, 3, 3, 3]
    assert all(b["encoding_format"] == "base64" for b in batches)
    assert summary.queries_paid == 11
    assert summary.requests == 4
    assert summary.cache_hits == 0


def test_a_second_run_pays_nothing_and_a_new_text_pays_once(tmp_path: Path) -> None:
    provider = MockProvider()
    with make(provider, tmp_path) as client:
        first = client.features(TASK, TEXTS)
        again = client.features(TASK, TEXTS)
        assert len(provider.sent()) == 4
        assert again == first
        more = client.features(TASK, [*TEXTS, "a new one"])
        summary = client.ledger.summary()
    assert provider.sent()[-1]["inputs"] == ["a new one Overall, it was"]
    assert len(provider.sent()) == 5
    assert summary.queries_paid == 12
    assert summary.cache_hits == 11 + 11
    np.testing.assert_allclose(more.scores, expected([*TEXTS, "a new one"]), atol=1e-5)


def test_duplicates_are_queried_once(tmp_path: Path) -> None:
    provider = MockProvider()
    with make(provider, tmp_path, batch=8) as client:
        feats = client.features(TASK, ["same", "same", "other", "same"])
    inputs = [i for b in provider.sent() for i in b["inputs"]]
    assert sorted(inputs) == sorted(
        ["same Overall, it was", "other Overall, it was", " Overall, it was"]
    )
    np.testing.assert_allclose(feats.scores, expected(["same", "same", "other", "same"]), atol=1e-5)


def test_multi_token_label_words_use_the_first_token_with_a_warning(tmp_path: Path) -> None:
    task = Task("{text} Overall, it was {mask}", {"neg": "bad", "pos": "very-good"})
    provider = MockProvider()
    with (
        make(provider, tmp_path) as client,
        pytest.warns(MultiTokenLabelWarning, match="very-good"),
    ):
        feats = client.features(task, ["x"])
    first = MODEL.token_ids(" very-good")[0]
    assert feats.meta.label_token_ids[1] == (first,)
    assert feats.meta.extra["multi_token_labels"] == {" very-good": MODEL.token_ids(" very-good")}
    assert provider.sent()[0]["label_token_ids"][1] == first


def test_budget_refuses_before_sending(tmp_path: Path) -> None:
    provider = MockProvider()
    limits = BudgetLimits(max_queries=2)
    with make(provider, tmp_path, budget=limits, max_concurrency=1) as client:
        with pytest.raises(BudgetExceeded) as info:
            client.features(TASK, TEXTS)
        assert client.ledger.reserved().queries == 0
    assert info.value.limit == "queries"
    assert provider.sent() == []  # even the first batch (3 queries) would break the limit

    provider = MockProvider()
    with make(
        provider, tmp_path / "b", budget=BudgetLimits(max_queries=7), max_concurrency=1
    ) as client:
        with pytest.raises(BudgetExceeded):
            client.features(TASK, TEXTS)
        spent = client.ledger.spent()
    assert len(provider.sent()) == 2  # 3 + 3 sent; the third batch of 3 would make 9 > 7
    assert spent.queries == 6


def test_duplicates_count_in_progress(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    with make(MockProvider(), tmp_path) as client:
        client.features(TASK, ["a", "a", "b"], progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (0, 4)
    assert seen[-1] == (4, 4)


def test_64_concurrent_requests_never_exceed_the_budget(tmp_path: Path) -> None:
    provider = MockProvider()
    texts = [f"t{i}" for i in range(300)]
    limits = BudgetLimits(max_queries=50)
    with make(provider, tmp_path, batch=1, budget=limits, max_concurrency=64) as client:
        with pytest.raises(BudgetExceeded):
            client.features(TASK, texts)
        spent, reserved = client.ledger.spent(), client.ledger.reserved()
    assert spent.queries <= 50
    assert reserved.queries == 0
    # requests in flight when the limit was hit finished and were settled: every query the
    # provider answered is on the ledger as paid (batch=1: one query per request)
    assert len(provider.sent()) == spent.queries


def test_a_refusal_keeps_what_was_in_flight_and_a_rerun_pays_only_the_rest(
    tmp_path: Path,
) -> None:
    provider = MockProvider()
    texts = [f"t{i}" for i in range(40)]

    async def slow(request: httpx.Request) -> httpx.Response:
        answer = provider(request)  # the provider does (and bills) the work on arrival
        await asyncio.sleep(0.05)  # several requests are in flight when the limit is hit
        return answer

    with make(
        provider,
        tmp_path,
        batch=1,
        transport=httpx.MockTransport(slow),
        budget=BudgetLimits(max_queries=20),
        max_concurrency=8,
    ) as client:
        with pytest.raises(BudgetExceeded):
            client.features(TASK, texts)
        first = client.ledger.spent()
    answered = len(provider.sent())
    assert first.queries == answered <= 20
    provider2 = MockProvider()
    with make(provider2, tmp_path, batch=1) as client:  # same cache, no budget
        feats = client.features(TASK, texts)
        second = client.ledger.spent(client.ledger.run_id)
    assert second.queries == len(provider2.sent()) == 41 - answered  # 40 texts + content-free
    assert feats.scores is not None
    np.testing.assert_allclose(feats.scores, expected(texts), atol=1e-5)


def test_estimate_matches_what_the_run_then_spends(tmp_path: Path) -> None:
    provider = MockProvider()
    with make(provider, tmp_path) as client:
        cold = client.estimate(TASK, TEXTS)
        # only what is free was asked: the model, the label words, the prompts' token counts
        assert {p for _, p, _, _ in provider.requests} == {"/v1/models", "/v1/tokenize"}
        assert provider.sent() == []
        assert client.ledger.spent().queries == 0
        assert cold.assumptions == ()
        assert cold.tokens_method == {"features": "tokenizer"}
        asked = len(provider.requests)
        assert client.estimate(TASK, TEXTS) == cold  # counts cached: nothing asked again
        assert len(provider.requests) == asked
        client.features(TASK, TEXTS[:4])
        est = client.estimate(TASK, TEXTS)
        assert est.assumptions == ()
        before = client.ledger.spent()
        client.features(TASK, TEXTS)
        spent = client.ledger.spent() - before
        after = client.estimate(TASK, TEXTS)
        total = client.ledger.spent()
    assert (est.queries, est.requests, est.cached_queries) == (6, 2, 5)
    assert (spent.queries, spent.requests) == (est.queries, est.requests)
    # counted by the (fake) server's tokenizer: exactly what the run is billed
    assert spent.input_tokens == est.input_tokens
    assert cold.input_tokens == total.input_tokens
    assert (after.queries, after.requests, after.cached_queries) == (0, 0, 11)
    assert after.tokens_method == {"features": "cached"}


def test_progress_reports_every_example(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    with make(MockProvider(), tmp_path) as client:
        client.features(TASK, TEXTS[:5], progress=lambda d, t: seen.append((d, t)))
        client.features(TASK, TEXTS, progress=lambda d, t: seen.append((d, t)))
    first, second = seen[: seen.index((6, 6)) + 1], seen[seen.index((6, 6)) + 1 :]
    assert [d for d, _ in first] == sorted(d for d, _ in first)
    assert first[-1] == (6, 6)
    assert second[0] == (6, 11)  # the cached ones at once
    assert second[-1] == (11, 11)


def test_quota_exhausted_is_not_retried_and_the_reservation_is_refunded(tmp_path: Path) -> None:
    provider = MockProvider()

    def quota(request: httpx.Request) -> httpx.Response | None:
        if request.url.path == "/v1/features":
            return httpx.Response(429, json={"error": {"code": "insufficient_quota"}})
        return None

    provider.override = quota
    with make(provider, tmp_path, batch=64) as client:
        with pytest.raises(QuotaExhausted, match="not retried"):
            client.features(TASK, TEXTS)
        summary = client.ledger.summary()
        reserved = client.ledger.reserved()
    assert len(provider.sent()) == 1
    assert summary.errors == 1
    assert summary.attempts == 1
    assert summary.queries_paid == 0
    assert reserved.queries == 0


def test_rate_limit_paces_requests_through_the_injected_sleep(tmp_path: Path) -> None:
    now = [0.0]
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    provider = MockProvider()
    with make(
        provider,
        tmp_path,
        rate_limit=RateLimit(requests_per_minute=60),
        clock=lambda: now[0],
        sleep=sleep,
        max_concurrency=1,
    ) as client:
        client.features(TASK, TEXTS)
    assert len(provider.sent()) == 4
    assert sleeps == pytest.approx([1.0, 1.0, 1.0])  # 1 request/s after the first


def test_sync_call_inside_a_running_loop_points_to_afeatures(tmp_path: Path) -> None:
    provider = MockProvider()

    async def main() -> None:
        async with make(provider, tmp_path) as client:
            with pytest.raises(ConfigError, match="afeatures"):
                client.features(TASK, TEXTS)
            feats = await client.afeatures(TASK, TEXTS)
            np.testing.assert_allclose(feats.scores, expected(TEXTS), atol=1e-5)

    asyncio.run(main())


def test_bad_inputs_are_refused_before_any_request(tmp_path: Path) -> None:
    provider = MockProvider()
    with make(provider, tmp_path) as client:
        with pytest.raises(ConfigError, match="not one string"):
            client.features(TASK, "just one string")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="texts_b"):
            client.features(TASK, ["a"], texts_b=["b", "c"])
        with pytest.raises(ConfigError, match="empty"):
            client.features(TASK, [])
        with pytest.raises(ConfigError, match=r"texts\[1\]"):
            client.features(TASK, ["a", 3])  # type: ignore[list-item]
    assert provider.requests == []
    with pytest.raises(ConfigError, match="max_concurrency"):
        Client(LocalAdapter(), cache=None, max_concurrency=0)


def test_a_truncated_body_is_retried_and_the_cut_attempt_counts_at_its_worst_case(
    tmp_path: Path,
) -> None:
    # A 2xx cut short was answered (and may be billed) by the provider: the retry is another
    # send it may bill too, so the first attempt is settled at its worst case before it leaves.
    provider = MockProvider()
    calls = {"n": 0}

    def cut_first(request: httpx.Request) -> httpx.Response | None:
        if request.url.path == "/v1/features" and calls["n"] == 0:
            calls["n"] += 1
            return httpx.Response(200, content=b'{"model": "fake", "data": [{"tok')
        return None

    provider.override = cut_first
    policy = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.001)
    with make(provider, tmp_path, batch=64, retry=policy) as client:
        feats = client.features(TASK, TEXTS)
        summary = client.ledger.summary()
        records = [r for r in client.ledger.records() if r.cache == "miss"]
        spent, reserved = client.ledger.spent(), client.ledger.reserved()
    np.testing.assert_allclose(feats.scores, expected(TEXTS), atol=1e-5)
    assert len(provider.sent()) == 2
    assert [(r.status, r.queries, r.attempts) for r in records] == [
        ("unknown", 11, 1),
        ("ok", 11, 1),
    ]
    assert (summary.queries_paid, summary.queries_unknown) == (11, 11)
    assert summary.requests == summary.attempts == 2
    assert spent.queries == 22
    assert reserved == Usage()


def test_retries_after_timeouts_never_pass_the_hard_limit(tmp_path: Path) -> None:
    # Every attempt times out after the server did the work: each send may be billed. With
    # max_queries=3 and one query per request, at most 3 sends may leave, whatever the retry
    # policy allows, and the ledger counts each of them.
    provider = MockProvider()

    def time_out(request: httpx.Request) -> httpx.Response:
        answer = provider(request)
        if request.url.path == "/v1/features":
            raise httpx.ReadTimeout("timed out", request=request)
        return answer

    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.001, max_backoff_s=0.001)
    with make(
        provider,
        tmp_path,
        batch=1,
        retry=policy,
        transport=httpx.MockTransport(time_out),
        budget=BudgetLimits(max_queries=3),
        max_concurrency=2,
    ) as client:
        with pytest.raises((BudgetExceeded, TransportError)):
            client.features(TASK, [f"t{i}" for i in range(4)])
        spent, reserved = client.ledger.spent(), client.ledger.reserved()
        statuses = {r.status for r in client.ledger.records() if r.cache == "miss"}
    assert len(provider.sent()) <= 3
    assert spent.queries == len(provider.sent())
    assert reserved == Usage()
    assert statuses == {"unknown"}


def test_cancelling_a_run_leaves_every_sent_request_on_the_ledger_and_nothing_reserved(
    tmp_path: Path,
) -> None:
    provider = MockProvider()
    texts = [f"t{i}" for i in range(60)]

    async def slow(request: httpx.Request) -> httpx.Response:
        answer = provider(request)
        await asyncio.sleep(0.02)
        return answer

    async def run(client: Client) -> None:
        task = asyncio.ensure_future(client.afeatures(TASK, texts))
        while len(provider.sent()) < 10:  # cancel mid-run, with requests in flight
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with make(
        provider,
        tmp_path,
        batch=1,
        transport=httpx.MockTransport(slow),
        max_concurrency=4,
    ) as client:
        asyncio.run(run(client))
        reserved = client.ledger.reserved()
        records = client.ledger.records()
        sent = len(provider.sent())
    assert reserved == Usage()  # nothing left reserved
    assert 10 <= sent < 61
    # every request that left is on the ledger: answered ones settled, the rest (sent, then
    # cancelled while waiting) counted at their worst case as "unknown", never as free
    assert len([r for r in records if r.cache == "miss"]) == sent
    ok = [r for r in records if r.status == "ok"]
    assert {r.status for r in records if r.cache == "miss"} <= {"ok", "unknown"}
    unknown = [r for r in records if r.status == "unknown"]
    assert client.ledger.spent().queries == len(ok) + len(unknown) == sent
    provider2 = MockProvider()
    with make(provider2, tmp_path, batch=1) as client:  # the settled answers were cached
        client.features(TASK, texts)
    assert len(provider2.sent()) == 61 - len(ok)


def test_a_refusal_while_others_are_in_flight_leaves_nothing_reserved(tmp_path: Path) -> None:
    # max_queries=5, one query per request, 3 at a time: each worker reserves its next request
    # when its last one is settled, until one is refused
    provider = MockProvider()
    with make(
        provider, tmp_path, batch=1, budget=BudgetLimits(max_queries=5), max_concurrency=3
    ) as client:
        with pytest.raises(BudgetExceeded) as info:
            client.features(TASK, [f"t{i}" for i in range(12)])
        spent, reserved = client.ledger.spent(), client.ledger.reserved()
        summary = client.ledger.summary()
    assert info.value.limit == "queries"
    # a request reserved when another was refused may be given back unsent: 3 to 5 paid
    assert 3 <= spent.queries == len(provider.sent()) == summary.queries_paid <= 5
    assert reserved.queries == 0


def test_a_failure_stops_new_sends_while_the_request_in_flight_is_settled(
    tmp_path: Path,
) -> None:
    # Two workers: t0 is slow, t1 fails at once (HTTP 400, not retried). t0's answer is settled
    # when it comes; its worker then reserves and sends nothing more.
    provider = MockProvider()

    async def handler(request: httpx.Request) -> httpx.Response:
        answer = provider(request)
        if request.url.path == "/v1/features":
            text = provider.sent()[-1]["inputs"][0]
            if text.startswith("t0"):
                await asyncio.sleep(0.1)
            if text.startswith("t1"):
                return httpx.Response(400, json={"error": {"message": "bad input"}})
        return answer

    with make(
        provider,
        tmp_path,
        batch=1,
        transport=httpx.MockTransport(handler),
        max_concurrency=2,
    ) as client:
        with pytest.raises(ProviderStatusError):
            client.features(TASK, ["t0", "t1", "t2", "t3"])
        reserved = client.ledger.reserved()
        statuses = [r.status for r in client.ledger.records() if r.cache == "miss"]
    assert [b["inputs"][0][:2] for b in provider.sent()] == ["t0", "t1"]
    assert sorted(statuses) == ["error", "ok"]
    assert reserved == Usage()


def test_each_answer_is_stored_and_settled_before_the_next_request_of_its_worker(
    tmp_path: Path,
) -> None:
    # One worker: one reservation at a time, and every answer is in the cache (and settled ok)
    # before the next request leaves, even when each cache write is slow.
    provider = MockProvider()
    seen: list[tuple[int, int]] = []  # (reservations held, answers settled) as each arrives

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/features":
            seen.append((client.ledger.reserved().requests, client.ledger.summary().queries_paid))
        return provider(request)

    cache = SlowCache(CacheConfig(tmp_path / "cache"), 0.01)  # a 10 ms write
    client = make(
        provider,
        tmp_path,
        batch=1,
        cache=cache,
        transport=httpx.MockTransport(handler),
        max_concurrency=1,
    )
    texts = [f"t{i}" for i in range(12)]
    with client:
        feats = client.features(TASK, texts)
        summary = client.ledger.summary()
        reserved = client.ledger.reserved()
    answers = len(provider.sent())
    assert answers == 13  # 12 texts and the content-free query
    assert seen == [(1, i) for i in range(answers)]
    assert cache.writes == [1] * answers
    assert (summary.queries_paid, reserved) == (answers, Usage())
    assert feats.scores is not None
    np.testing.assert_allclose(feats.scores, expected(texts), atol=1e-5)
    with make(MockProvider(), tmp_path, batch=1) as again:  # all of them were stored
        again.features(TASK, texts)
        assert again.ledger.summary(again.ledger.run_id).queries_paid == 0


def test_a_request_refused_beside_those_in_flight_is_asked_again_once_they_are_settled(
    tmp_path: Path,
) -> None:
    # Each request reserves its worst case (22 input tokens: a byte each, plus 4) and uses 5.
    # 60 tokens hold two worst cases, not three: with three workers the third reservation is
    # refused at first, then granted once a request in flight is settled. The run fits the
    # budget, so it must not fail.
    provider = MockProvider()
    held: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/features":
            held.append(client.ledger.reserved().requests)
            await asyncio.sleep(0.01)
        return provider(request)

    client = make(
        provider,
        tmp_path,
        batch=1,
        transport=httpx.MockTransport(handler),
        budget=BudgetLimits(max_input_tokens=60),
        max_concurrency=3,
    )
    texts = [f"t{i}" for i in range(6)]
    with client:
        feats = client.features(TASK, texts)
        spent, reserved = client.ledger.spent(), client.ledger.reserved()
    assert len(provider.sent()) == 7
    assert max(held) == 2  # the budget bounded what was in flight
    assert spent.input_tokens <= 60
    assert reserved == Usage()
    assert feats.scores is not None
    np.testing.assert_allclose(feats.scores, expected(texts), atol=1e-5)


def test_a_closed_client_can_be_used_again(tmp_path: Path) -> None:
    provider = MockProvider()
    client = make(provider, tmp_path)
    first = client.features(TASK, TEXTS[:4])
    client.close()
    again = client.features(TASK, [*TEXTS[:4], "one more"])  # stores and threads reopen
    client.close()
    assert again.scores is not None
    np.testing.assert_allclose(again.scores[:4], first.scores)
    assert provider.sent()[-1]["inputs"] == ["one more Overall, it was"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(), min_size=1, max_size=8))
def test_fast_example_keys_equal_cache_key(texts: list[str]) -> None:
    from dect_maas.client.cache import cache_key
    from dect_maas.client.plan import example_keys

    adapter = LocalAdapter("http://fake", kind="causal", revision="r")
    labels = ()

    def body_of(text: str) -> dict[str, Any]:
        return adapter.example_body("features", text, labels)

    prefix = cache_key({"p": 1})
    want = [cache_key({"body": body_of(t), "prefix": prefix}) for t in texts]
    assert example_keys(prefix, body_of, texts) == want

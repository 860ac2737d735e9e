"""``estimate`` counts tokens with the server's tokenizer route: on a fresh cache it is within
±15% of what the run then records (never more than 5% below), it pays nothing, and where no
tokenizer answers it falls back (scaled from cached answers, else the byte bound) and says so.

Against the real local server on loopback (tiny causal model with a chat template); the chat
template's overhead learned from a cached answer is checked on a recorded llama.cpp-like server
(text-only ``/tokenize``), since the local server counts conversations itself.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dect_maas import CacheConfig, CensoredScoreWarning, Client, Task, load_examples
from dect_maas.adapters import LocalAdapter, OpenAIChatAdapter, OpenAICompatibleAdapter, Prices
from dect_maas.client import plan

server_testing = pytest.importorskip("dect_maas_server.testing")

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "movies_train.jsonl"
TASK = Task("{text} It was {mask}", {"negative": ["bad", "terrible"], "positive": "great"})
PRICES = Prices(per_million_input_tokens=2.0, per_million_output_tokens=8.0, per_request=1e-6)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = server_testing.make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))
    with server_testing.run_server(path, max_wait_ms=5) as url:
        yield url


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return list(load_examples(DATA).texts[:40])


def _adapter(route: str, url: str) -> Any:
    if route == "features":
        return LocalAdapter(url, prices=PRICES)
    if route == "chat":
        return OpenAIChatAdapter(url, "tiny", tokenize_api="dect-maas", prices=PRICES)
    # completions with vectors from /v1/embeddings: two roles, each counted, and the one-time
    # batching check's three small paid requests before the first batched vectors request
    return OpenAICompatibleAdapter(
        url, "tiny", tokenize_api="dect-maas", embeddings_model="tiny", prices=PRICES
    )


def _run(client: Client, texts: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CensoredScoreWarning)
        client.features(TASK, texts)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["features", "chat", "completions"])
def test_a_fresh_estimate_is_within_15_percent_and_pays_nothing(
    server: str, texts: list[str], tmp_path: Path, route: str
) -> None:
    adapter = _adapter(route, server)
    with Client(adapter, cache=CacheConfig(tmp_path / "c"), ledger=tmp_path / "l") as client:
        est = client.estimate(TASK, texts)
        untouched = client.ledger.summary()
        _run(client, texts)
        run = client.ledger.summary()
    assert (untouched.queries_paid, untouched.requests, untouched.input_tokens) == (0, 0, 0)
    assert set(est.tokens_method.values()) == {"tokenizer"}, est.tokens_basis
    assert est.assumptions == ()
    assert est.queries == run.queries_paid
    assert est.requests == run.requests
    assert 0.95 * run.input_tokens <= est.input_tokens <= 1.15 * run.input_tokens
    assert 0.95 * run.cost_usd <= est.cost_usd <= 1.15 * run.cost_usd
    if route != "completions":  # top-20 completions' content-free prompt may differ by a token
        assert est.input_tokens == run.input_tokens  # the server's own count, exactly


@pytest.mark.slow
def test_many_prompts_are_counted_on_a_seeded_sample(
    server: str, texts: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plan, "COUNT_SAMPLE", 12)
    adapter = _adapter("features", server)
    with Client(adapter, cache=CacheConfig(tmp_path / "c"), ledger=tmp_path / "l") as client:
        est = client.estimate(TASK, texts)
        again = client.estimate(TASK, texts)
        _run(client, texts)
        run = client.ledger.summary()
    assert est.tokens_method == {"features": "tokenizer (sample of 12 of 41 prompts)"}
    assert again == est  # the same sample, its counts cached
    assert 0.95 * run.input_tokens <= est.input_tokens <= 1.15 * run.input_tokens


@pytest.mark.slow
def test_without_a_tokenizer_route_it_scales_from_cached_answers_else_the_byte_bound(
    server: str, texts: list[str], tmp_path: Path
) -> None:
    """``tokenize_api="auto"`` asks llama-cpp-python's /extras/tokenize: the local server
    answers 404, as OpenAI does. An explicit route that 404s is said in the notes."""
    auto = OpenAICompatibleAdapter(server, "tiny", prices=PRICES)
    explicit = OpenAICompatibleAdapter(server, "tiny", tokenize_api="llama.cpp", prices=PRICES)
    cache = CacheConfig(tmp_path / "c")
    with Client(auto, cache=cache, ledger=tmp_path / "l") as client:
        blind = client.estimate(TASK, texts)
        _run(client, texts[:10])
        scaled = client.estimate(TASK, texts)
    assert blind.tokens_method == {"scores": "byte bound"}
    assert scaled.tokens_method == {"scores": "scaled from 11 cached answers"}
    with Client(explicit, cache=CacheConfig(tmp_path / "c2"), ledger=tmp_path / "l2") as client:
        said = client.estimate(TASK, texts)
    assert said.tokens_method == {"scores": "byte bound"}
    assert any("no tokenizer route there (HTTP 404)" in a for a in said.assumptions)


def test_an_unreachable_server_leaves_the_offline_estimate(tmp_path: Path) -> None:
    adapter = LocalAdapter("http://127.0.0.1:9", prices=PRICES)  # discard port: nothing listens
    with Client(adapter, cache=CacheConfig(tmp_path / "c"), ledger=tmp_path / "l") as client:
        est = client.estimate(TASK, ["a fine film", "dull"])
    assert est.tokens_method == {"features": "byte bound"}
    assert any("not reachable" in a for a in est.assumptions)
    assert any("never asked what model it serves" in a for a in est.assumptions)


class _LlamaCppLike:
    """A llama.cpp-like server: ``/tokenize`` counts text only (one token per word), and a chat
    answer bills the words plus its template's 23 tokens."""

    OVERHEAD = 23

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.paths.append(request.url.path)
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [1] * len(body["content"].split())})
        words = len(body["messages"][-1]["content"].split())
        entry = {"token": "great", "logprob": -0.1, "bytes": None}
        return httpx.Response(
            200,
            json={
                "choices": [{"logprobs": {"content": [{**entry, "top_logprobs": [entry]}]}}],
                "usage": {"prompt_tokens": words + self.OVERHEAD, "completion_tokens": 1},
            },
        )  # fmt: skip


def test_a_chat_templates_overhead_is_bounded_then_learned_from_one_cached_answer(
    tmp_path: Path,
) -> None:
    server = _LlamaCppLike()
    adapter = OpenAIChatAdapter("http://llama:8080/v1", "m", tokenize_api="llama.cpp")
    texts = [f"review {i} " + "word " * i for i in range(20)]
    cache = CacheConfig(tmp_path / "c")
    with Client(
        adapter, cache=cache, ledger=tmp_path / "l", transport=httpx.MockTransport(server)
    ) as client:
        blind = client.estimate(TASK, texts)
        assert "/v1/chat/completions" not in server.paths  # counting is free
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CensoredScoreWarning)
            client.features(TASK, texts[:1])
            learned = client.estimate(TASK, texts)
            before = client.ledger.summary()
            client.features(TASK, texts)
        run = client.ledger.summary()

    def words(part: list[str]) -> int:
        return sum(len(TASK.render(t).split()) for t in part)

    bound = OpenAIChatAdapter("http://h", "m").uncounted("scores")
    content_free = len(TASK.render("").split())
    assert blind.input_tokens == words(texts) + content_free + 21 * bound
    assert any("a bound" in a for a in blind.tokens_basis)
    assert any("+23 token(s) per request" in a for a in learned.tokens_basis)
    # the first text and the content-free prompt are cached: 19 to pay, counted exactly
    assert learned.input_tokens == words(texts[1:]) + 19 * server.OVERHEAD
    assert learned.input_tokens == run.input_tokens - before.input_tokens

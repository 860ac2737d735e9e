"""The chat-completions adapter: messages, surface forms, censoring, refusals and URLs, then end to
end against the real local server's ``/v1/chat/completions`` (tiny model with a chat template).

Reaches inside for ``surface_forms``, the chat adapter's label-word spellings, checked alone.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from dect_maas import (
    CacheConfig,
    CensoredScoreWarning,
    Client,
    MalformedResponse,
    ProviderStatusError,
    Task,
    UnsupportedCapability,
)
from dect_maas.adapters import Label, OpenAIChatAdapter, OpenAICompatibleAdapter, Prices, Prompt
from dect_maas.adapters.openai_chat import surface_forms

TASK = Task("Review: {text}\nSentiment: {mask}", {"neg": "negative", "pos": ["positive", "good"]})
LABELS = (Label(" negative"), Label(" positive"), Label(" good"))


def _chat(top: list[tuple[str, float]]) -> dict[str, Any]:
    entries = [{"token": t, "logprob": v, "bytes": None} for t, v in top]
    return {
        "choices": [
            {"index": 0, "logprobs": {"content": [{**entries[0], "top_logprobs": entries}]}}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 1},
    }


def _parse(adapter: OpenAIChatAdapter, top: list[tuple[str, float]]) -> dict[str, Any]:
    (spec,) = adapter.build_requests("scores", [Prompt(0, "x")], LABELS)
    (record,) = adapter.parse_response(spec, 200, {}, _chat(top))
    return record


def test_the_task_renders_to_system_and_user_messages() -> None:
    adapter = OpenAIChatAdapter("https://api.openai.com/v1", "gpt-4o-mini", system="One word.")
    prompt = adapter.prompt("scores", TASK, "A fine film.", None)
    (spec,) = adapter.build_requests("scores", [Prompt(0, prompt)], LABELS)
    assert spec.url == "https://api.openai.com/v1/chat/completions"
    assert spec.body == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "One word."},
            {"role": "user", "content": "Review: A fine film.\nSentiment:"},
        ],
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 20,
    }
    no_system = OpenAIChatAdapter("http://h", "m").build_requests("scores", [Prompt(0, "x")], ())
    assert no_system[0].body is not None
    assert no_system[0].body["messages"] == [{"role": "user", "content": "x"}]


def test_surface_forms_cover_case_and_leading_space() -> None:
    assert surface_forms(" positive") == (
        "positive",
        "Positive",
        " positive",
        " Positive",
    )
    assert surface_forms("NBA") == ("NBA", "nba", " NBA", " nba")


def test_forms_combine_by_logsumexp_or_max_and_absent_words_are_censored() -> None:
    top = [("The", -0.2), ("Positive", -1.0), ("positive", -2.0), (" good", -3.5), ("A", -4.0)]
    lse = OpenAIChatAdapter("http://h", "m")
    record = _parse(lse, top)
    assert record["s"] == pytest.approx([-4.0, math.log(math.exp(-1.0) + math.exp(-2.0)), -3.5])
    assert record["c"] == [True, False, False]  # "negative" in no form: the k-th value
    assert record["t"] == 12
    best = _parse(replace(lse, combine="max"), top)
    assert best["s"] == pytest.approx([-4.0, -1.0, -3.5])
    as_written = _parse(replace(lse, surface_forms=False), top)
    assert as_written["s"] == pytest.approx([-4.0, -2.0, -4.0])
    assert as_written["c"] == [True, False, True]


def test_the_openai_sentinel_is_not_a_score() -> None:
    top = [("The", -0.2), ("positive", -1.5), ("negative", -9999.0)]
    record = _parse(OpenAIChatAdapter("http://h", "m"), top)
    assert record["s"] == pytest.approx([-1.5, -1.5, -1.5])
    assert record["c"] == [True, False, True]


def test_null_logprobs_point_to_an_embeddings_only_run() -> None:
    adapter = OpenAIChatAdapter("http://h", "m")
    (spec,) = adapter.build_requests("scores", [Prompt(0, "x")], LABELS)
    body = {"choices": [{"index": 0, "message": {"content": "Pos"}, "logprobs": None}]}
    with pytest.raises(MalformedResponse, match="embeddings-only"):
        adapter.parse_response(spec, 200, {}, body)


@pytest.mark.parametrize("model", ["o3-mini", "o1", "gpt-5", "gpt-5-mini", "openai/o4-mini"])
def test_reasoning_models_are_refused_before_anything_is_sent(model: str, tmp_path: Path) -> None:
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    adapter = OpenAIChatAdapter("https://api.openai.com/v1", model)
    with (
        Client(adapter, cache=None, transport=httpx.MockTransport(record)) as client,
        pytest.raises(UnsupportedCapability, match="embeddings-only") as info,
    ):
        client.features(TASK, ["a film"])
    assert "does not return logprobs" in str(info.value)
    assert sent == []
    vectors = replace(adapter, scores=False, embeddings_model="text-embedding-3-small")
    assert vectors.roles(TASK) == ("vectors",)  # the embeddings-only run it points to
    assert OpenAIChatAdapter("http://h", "gpt-4o-mini").roles(TASK) == ("scores",)


def test_top_logprobs_above_twenty_is_refused_when_built() -> None:
    with pytest.raises(ValueError, match="between 1 and 20"):
        OpenAIChatAdapter("http://h", "m", top_logprobs=50)


@pytest.mark.parametrize(
    ("base", "scores", "vectors", "tokenize"),
    [
        ("http://h:8000", "http://h:8000/v1/chat/completions", "http://h:8000/v1/embeddings",
         "http://h:8000/tokenize"),
        ("http://h:8000/v1", "http://h:8000/v1/chat/completions", "http://h:8000/v1/embeddings",
         "http://h:8000/tokenize"),
        ("https://api.deepinfra.com/v1/openai/",
         "https://api.deepinfra.com/v1/openai/chat/completions",
         "https://api.deepinfra.com/v1/openai/embeddings",
         "https://api.deepinfra.com/v1/openai/tokenize"),
    ],
)  # fmt: skip
def test_base_urls_in_openai_python_form(
    base: str, scores: str, vectors: str, tokenize: str
) -> None:
    adapter = OpenAIChatAdapter(base, "m", embeddings_model="e", tokenize_api="vllm")
    (spec,) = adapter.build_requests("scores", [Prompt(0, "x")], ())
    assert spec.url == scores
    (spec,) = adapter.build_requests("vectors", [Prompt(0, "x")], ())
    assert spec.url == vectors
    tok = adapter.tokenize_request(" positive")
    assert tok is not None
    assert tok.url == tokenize
    assert tok.body == {"prompt": "positive", "model": "m", "add_special_tokens": False}
    legacy = OpenAICompatibleAdapter(base, "m")
    (spec,) = legacy.build_requests("scores", [Prompt(0, "x")], ())
    assert spec.url == scores.replace("chat/completions", "completions")


# -- end to end against the real server ----------------------------------------------------------

server_testing = pytest.importorskip("dect_maas_server.testing")
TEXTS = ["the movie was great fun", "a dull and boring film", "i loved the acting", "bad plot"]
CHAT_TASK = Task("{text} It was {mask}", {"negative": ["bad", "terrible"], "positive": "great"})


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = server_testing.make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))
    with server_testing.run_server(path, max_wait_ms=5) as url:
        yield url


def _rendered(text: str, task: Task = CHAT_TASK) -> str:
    """TINY_CHAT_TEMPLATE, written out: what the server must score for one example."""
    user = task.render(text)
    return (
        "<|im_start|>system\nYou are a critic<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )


def _exact(url: str, prompts: list[str], ids: list[int]) -> np.ndarray[Any, Any]:
    body = {"inputs": prompts, "label_token_ids": ids, "return_hidden": False}
    data = httpx.post(f"{url}/v1/features", json=body, timeout=60).json()["data"]
    return np.array([d["token_logprobs"] for d in data])


def _ids(url: str, word: str) -> int:
    ids = httpx.post(f"{url}/v1/tokenize", json={"text": word}, timeout=30).json()["ids"]
    assert len(ids) == 1, (word, ids)
    return int(ids[0])


@pytest.mark.slow
def test_chat_exact_scores_equal_the_servers_features(chat_server: str, tmp_path: Path) -> None:
    url = chat_server
    adapter = OpenAIChatAdapter(url, "tiny", exact_token_ids=True, tokenize_api="dect-maas")
    with Client(adapter, cache=CacheConfig(tmp_path / "c"), ledger=tmp_path / "l") as client:
        feats = client.features(CHAT_TASK, TEXTS)
        summary = client.ledger.summary()
    ids = [i for group in feats.meta.label_token_ids for i in group]
    assert ids == [_ids(url, w) for w in ("bad", "terrible", "great")]  # no leading space in chat
    flat = _exact(url, [_rendered(t) for t in TEXTS], ids)
    want = np.stack([flat[:, :2].max(axis=1), flat[:, 2]], axis=1)
    assert feats.censored is None
    np.testing.assert_allclose(feats.scores, want, rtol=1e-5, atol=1e-5)
    assert summary.requests == len(TEXTS) + 1  # one conversation per request, + content-free


def _top(url: str, text: str, k: int) -> list[dict[str, Any]]:
    body = {
        "messages": [{"role": "user", "content": CHAT_TASK.render(text)}],
        "max_tokens": 1,
        "logprobs": True,
        "top_logprobs": k,
    }
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    return list(answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"])


@pytest.mark.slow
def test_chat_top_k_combines_the_forms_found(chat_server: str, tmp_path: Path) -> None:
    url = chat_server
    k = 20
    # label words the random tiny model ranks high for the first text, so that some are found
    seen = [t["token"].strip().lower() for t in _top(url, TEXTS[0], k)]
    words = [w for w in dict.fromkeys(seen) if w in server_testing.TINY_WORDS][:3]
    assert len(words) == 3, seen
    shown = {t["token"].strip().lower() for text in TEXTS for t in _top(url, text, k)}
    words.append(next(w for w in ("great", "terrible", "movie", "story") if w not in shown))
    task = Task("{text} It was {mask}", {"a": words[:2], "b": words[2], "c": words[3]})
    adapter = OpenAIChatAdapter(url, "tiny", top_logprobs=k)
    with (
        Client(adapter, cache=CacheConfig(tmp_path / "c"), ledger=tmp_path / "l") as client,
        pytest.warns(CensoredScoreWarning),
    ):
        feats = client.features(task, TEXTS)
    forms = {w: [_ids(url, f) for f in surface_forms(w)] for w in words}
    all_ids = [i for w in words for i in forms[w]]
    exact = _exact(url, [_rendered(t, task) for t in TEXTS], all_ids)  # [N, 16]: every form
    assert feats.scores is not None
    assert feats.censored is not None
    for n, text in enumerate(TEXTS):
        floor = min(t["logprob"] for t in _top(url, text, k))
        per_word = []
        for j in range(4):
            vals = exact[n, 4 * j : 4 * j + 4]
            shown = vals[vals >= floor - 1e-6]  # the forms among the top k
            per_word.append(
                (float(np.logaddexp.reduce(shown)), False) if shown.size else (floor, True)
            )
        want = [max(per_word[0][0], per_word[1][0]), per_word[2][0], per_word[3][0]]
        np.testing.assert_allclose(feats.scores[n], want, rtol=1e-5, atol=1e-5)
        cens = [per_word[0][1] and per_word[1][1], per_word[2][1], True]
        assert list(feats.censored[n]) == cens
    assert list(feats.censored[0]) == [False, False, True]  # a, b picked from its top k


@pytest.mark.slow
def test_the_default_tokenize_api_falls_back_to_string_matching(
    chat_server: str, tmp_path: Path
) -> None:
    """Our server, like OpenAI, Together and vLLM, has no /extras/tokenize: it answers 404, and
    the completions adapter's default matches the top-k candidates by string instead."""
    adapter = OpenAICompatibleAdapter(chat_server, "tiny", top_logprobs=20)
    assert adapter.tokenize_api == "auto"
    with Client(adapter, cache=CacheConfig(tmp_path / "c"), ledger=tmp_path / "l") as client:
        with pytest.warns(CensoredScoreWarning):
            feats = client.features(CHAT_TASK, TEXTS)
        with pytest.warns(CensoredScoreWarning):
            again = client.features(CHAT_TASK, TEXTS)  # the 404 is remembered: nothing re-asked
        summary = client.ledger.summary()
    assert feats.meta.label_token_ids == ((), ())
    assert feats.scores is not None
    np.testing.assert_array_equal(again.scores, feats.scores)
    assert summary.requests == len(TEXTS) + 1
    exact = replace(adapter, tokenize_api="auto", exact_token_ids=True)
    with (
        Client(exact, cache=None, ledger=tmp_path / "l2") as client,
        pytest.raises(ProviderStatusError) as info,
    ):
        client.features(CHAT_TASK, TEXTS)  # exact scores need the ids: the 404 is an error
    assert info.value.status == 404
    assert f"{chat_server}/extras/tokenize" in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_estimate_scaled_from_cached_answers_is_within_15_percent(
    chat_server: str, tmp_path: Path, route: str
) -> None:
    """With no tokenizer route (chat's default ``tokenize_api="none"``; completions' ``"auto"``
    finds no /extras/tokenize here) and after a first run, ``estimate`` scales the byte bound by
    the provider's own token counts in the cache: within ±15% of what the next run records, and
    never more than 5% below (tests/test_estimate_tokenizer.py: with the tokenizer route)."""
    from dect_maas import load_examples

    data = Path(__file__).resolve().parent.parent / "examples" / "data" / "movies_train.jsonl"
    texts = list(load_examples(data).texts[:40])
    prices = Prices(per_million_input_tokens=2.0, per_million_output_tokens=8.0)
    adapter: Any = (
        OpenAIChatAdapter(chat_server, "tiny", prices=prices)
        if route == "chat"
        else OpenAICompatibleAdapter(chat_server, "tiny", prices=prices)
    )
    cache = CacheConfig(tmp_path / "c")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CensoredScoreWarning)
        with Client(adapter, cache=cache, ledger=tmp_path / "l1") as client:
            blind = client.estimate(CHAT_TASK, texts)
            client.features(CHAT_TASK, texts[:10])
            first = client.ledger.summary()
        with Client(adapter, cache=cache, ledger=tmp_path / "l2") as client:
            est = client.estimate(CHAT_TASK, texts)
            client.features(CHAT_TASK, texts)
            run = client.ledger.summary()
    assert any("byte bound" in a for a in blind.tokens_basis)
    assert blind.input_tokens > 2 * first.input_tokens  # the bound: far above the truth
    assert any("scaled from 11 cached answer(s)" in a for a in est.tokens_basis)
    assert est.queries == run.queries_paid == 30
    assert 0.95 * run.input_tokens <= est.input_tokens <= 1.15 * run.input_tokens
    assert 0.95 * run.cost_usd <= est.cost_usd <= 1.15 * run.cost_usd

"""Recorded llama.cpp traffic (tests/fixtures/llamacpp) replayed through httpx.MockTransport.

The client talks to the transport exactly as to the real server, so these tests check that the
OpenAI-compatible adapter parses what llama.cpp really sends, and that the client copes with what
it really refuses (a list of prompts, a malformed body answered with 500 and a traceback).

Reaches inside for the batching check's cache key and ``error_for_status``: both are checked
against what llama.cpp really answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from dect_maas import CensoredScoreWarning, Client, RetryPolicy, ServerError, Task
from dect_maas.adapters import OpenAICompatibleAdapter
from dect_maas.client.batch_check import verdict_key
from dect_maas.client.retry import error_for_status

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "llamacpp"
SCORING, EMBEDDING = "http://llama-scores.test", "http://llama-embed.test"
TASK = Task("{text} Overall, it was {mask}", {"negative": "terrible", "positive": "great"})


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())  # type: ignore[no-any-return]


class Replay:
    """Answers a request with the recording whose request it matches (our body may add 'model')."""

    def __init__(self, *names: str, fallback: str | None = None) -> None:
        self.recordings = [load(n) for n in names]
        self.fallback = load(fallback) if fallback else None
        self.seen: list[tuple[str, str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.seen.append((request.url.host, request.url.path, body))
        for rec in self.recordings:
            want = rec["request"]
            if want["path"] == request.url.path and all(
                body.get(k) == v for k, v in want["json"].items()
            ):
                return httpx.Response(rec["response"]["status"], json=rec["response"]["json"])
        if self.fallback is not None and self.fallback["request"]["path"] == request.url.path:
            # No recording of this exact body (e.g. the content-free prompt): answer as recorded.
            answer = self.fallback["response"]
            return httpx.Response(answer["status"], json=answer["json"])
        return httpx.Response(404, json={"error": {"message": "no recording"}})


def client(replay: Replay, tmp_path: Path, concurrency: int = 8, **adapter: Any) -> Client:
    settings: dict[str, Any] = {"top_logprobs": 20, **adapter}
    return Client(
        OpenAICompatibleAdapter(SCORING, "SmolLM2-135M-Instruct.Q4_1.gguf", **settings),
        max_concurrency=concurrency,
        cache=None,
        ledger=tmp_path / "ledger",
        transport=httpx.MockTransport(replay),
        retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.001, max_backoff_s=0.002),
    )


def test_top20_logprobs_with_a_censored_label(tmp_path: Path) -> None:
    replay = Replay(
        "tokenize", "tokenize_terrible", "completions_logprobs20", fallback="completions_logprobs20"
    )
    text = "The movie was wonderful and moving."
    with client(replay, tmp_path) as c, pytest.warns(CensoredScoreWarning, match="50.0%"):
        feats = c.features(TASK, [text])
    top = load("completions_logprobs20")["response"]["json"]["choices"][0]["logprobs"]
    top20 = top["top_logprobs"][0]
    # " great" is in the top 20: exact. " terrible" is not: the 20th value, as an upper bound.
    assert feats.scores is not None
    assert feats.censored is not None
    np.testing.assert_allclose(feats.scores[0], [min(top20.values()), top20[" great"]], rtol=1e-6)
    assert feats.censored[0].tolist() == [True, False]
    assert feats.meta.label_token_ids == ((13321,), (1109,))
    assert feats.meta.score_kind == "logprobs"
    # Label ids came from the llama-cpp-python tokenize endpoint; prompts went one per request.
    paths = [p for _, p, _ in replay.seen]
    assert paths.count("/extras/tokenize") == 2
    assert paths.count("/v1/completions") == 2
    assert all(isinstance(b["prompt"], str) for _, p, b in replay.seen if p == "/v1/completions")
    sent = next(b for _, p, b in replay.seen if b and b.get("prompt") == f"{text} Overall, it was")
    assert sent["max_tokens"] == 1
    assert sent["temperature"] == 0
    assert sent["logprobs"] == 20


def test_a_list_of_prompts_is_refused_and_the_retries_are_bounded(tmp_path: Path) -> None:
    rec = load("completions_logprobs_batch")
    prompts = [p.removesuffix(" Overall, it was") for p in rec["request"]["json"]["prompt"]]
    replay = Replay("tokenize", "tokenize_terrible", "completions_logprobs_batch")
    # Two prompts per request: the recorded list, then the content-free prompt (never reached).
    with client(replay, tmp_path, concurrency=1, max_prompts_per_request=2) as c:
        with pytest.raises(ServerError) as info:
            c.features(TASK, prompts)
        summary = c.ledger.summary()
    assert info.value.status == 500
    assert "the provider said: 'internal_server_error'" in str(info.value)
    completions = [b for _, p, b in replay.seen if p == "/v1/completions"]
    assert len(completions) == 3  # max_attempts, then the error; never retried forever
    assert summary.queries_paid == 0
    assert summary.errors == 1
    assert summary.attempts == 3


def test_a_malformed_body_500_is_quoted_as_the_providers_and_truncated() -> None:
    rec = load("completions_bad_request")["response"]
    raw = rec["json"]["error"]["message"]
    err = error_for_status(
        rec["status"],
        {},
        json.dumps(rec["json"]),
        provider="llama.cpp",
        request="POST /v1/completions for example(s) 0",
    )
    assert isinstance(err, ServerError)
    text = str(err)
    assert text.startswith("llama.cpp answered HTTP 500; the provider said: ")
    assert "3 validation errors:" in text
    assert "llama_cpp/server/app.py" not in text  # the traceback tail is cut
    assert len(text) < len(raw)
    assert "…" in text
    assert text.endswith("[POST /v1/completions for example(s) 0]")


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_per_token_embeddings_are_pooled_and_the_choice_recorded(
    tmp_path: Path, pooling: str
) -> None:
    rec = load("embeddings_batch")
    texts = rec["request"]["json"]["input"]
    replay = Replay("embeddings_batch")
    with client(
        replay, tmp_path, scores=False, embeddings_base_url=EMBEDDING, pooling=pooling
    ) as c:
        # This recording is the server's mis-batched answer (only data[0] is right); here only
        # its pooling is checked, so the one-time batching check (which would refuse this
        # server: tests/test_batch_check.py) is marked as passed for this client.
        key = verdict_key(f"{EMBEDDING}/v1/embeddings", c.adapter.model_for("vectors"),
                          c.adapter.hidden_kind("vectors"))  # fmt: skip
        c._verdicts[key] = {"ok": True, "cosine": 1.0}
        feats = c.features(TASK, texts)
    per_token = [np.asarray(d["embedding"]) for d in rec["response"]["json"]["data"]]
    assert [v.shape for v in per_token] == [(7, 576), (5, 576)]
    want = np.stack([v.mean(axis=0) if pooling == "mean" else v[-1] for v in per_token])
    assert feats.hidden is not None
    assert feats.scores is None
    np.testing.assert_allclose(feats.hidden, want, rtol=1e-6, atol=1e-6)
    assert feats.meta.hidden_kind == f"pooled_{pooling}"
    assert feats.meta.extra["pooling"] == pooling
    assert [h for h, _, _ in replay.seen] == ["llama-embed.test"]  # one request, both texts


def test_embeddings_asked_of_the_scoring_instance_fail_with_the_providers_message(
    tmp_path: Path,
) -> None:
    # Recorded with one string as input; the scoring instance refuses any embeddings call alike.
    replay = Replay(fallback="embeddings_on_scoring_server")
    with (
        client(replay, tmp_path, scores=False, embeddings_base_url=SCORING) as c,
        pytest.raises(ServerError, match="must be created with embedding=True"),
    ):
        c.features(TASK, ["hello"])


def test_the_logit_bias_recording_parses_with_the_forced_token_unbiased() -> None:
    rec = load("completions_logit_bias")
    adapter = OpenAICompatibleAdapter(SCORING, "m", top_logprobs=5)
    from dect_maas.adapters import Label, Prompt

    labels = [Label(" great", (1109,)), Label(" terrible", (13321,))]
    spec = adapter.build_requests("scores", [Prompt(0, rec["request"]["json"]["prompt"])], labels)[
        0
    ]
    (record,) = adapter.parse_response(spec, 200, {}, rec["response"]["json"])
    assert record["s"][0] == pytest.approx(-6.242308616638184)
    assert record["c"] == [False, True]
    assert record["s"][1] == pytest.approx(-6.242308616638184)  # smallest of the six returned
    assert record["t"] == 9

"""``POST /v1/chat/completions`` on the real server: template, shapes, numbers and refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dect_maas_server import default_model as dm
from dect_maas_server.testing import make_tiny_chat_model, run_server
from server_reference import Reference

USER = "the movie was great"
# TINY_CHAT_TEMPLATE written out by hand: the prompt the server must build from the messages.
RENDERED = (
    "<|im_start|>system\nYou are a critic<|im_end|>\n"
    f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def chat(tiny_chat: Path) -> Iterator[httpx.Client]:
    with (
        run_server(tiny_chat, max_logprobs=5, max_wait_ms=20) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        yield client


def _body(**extra: object) -> dict[str, object]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": USER}],
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 5,
        **extra,
    }


def test_chat_scores_the_template_rendered_prompt(chat: httpx.Client, tiny_chat: Path) -> None:
    ref = Reference(tiny_chat, "causal")
    ids = list(ref.tokenizer(RENDERED, add_special_tokens=False)["input_ids"])
    want = ref.score(ids)["logprobs"]  # [V]
    resp = chat.post("/v1/chat/completions", json=_body())
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 1,
        "total_tokens": len(ids) + 1,
    }
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 1
    top = content[0]["top_logprobs"]
    assert len(top) == 5
    best = ref.torch.topk(want, 5)
    assert [t["token"] for t in top] == [ref.tokenizer.decode([int(i)]) for i in best.indices]
    assert [t["logprob"] for t in top] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert choice["message"] == {"role": "assistant", "content": top[0]["token"]}
    assert content[0]["token"] == top[0]["token"]
    assert top[0]["bytes"] == list(top[0]["token"].encode())


def test_chat_reports_listed_ids_exactly(chat: httpx.Client, tiny_chat: Path) -> None:
    ref = Reference(tiny_chat, "causal")
    ids = list(ref.tokenizer(RENDERED, add_special_tokens=False)["input_ids"])
    want = ref.score(ids)["logprobs"]
    listed = [int(ref.tokenizer("great", add_special_tokens=False)["input_ids"][0]), 7]
    body = _body(top_logprobs=0, logprob_token_ids=listed, return_tokens_as_token_ids=True)
    resp = chat.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    top = resp.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert [t["token"] for t in top] == [f"token_id:{i}" for i in listed]
    assert [t["logprob"] for t in top] == pytest.approx([float(want[i]) for i in listed], abs=1e-4)


def test_chat_without_logprobs_has_null_logprobs(chat: httpx.Client) -> None:
    resp = chat.post("/v1/chat/completions", json=_body(logprobs=False, top_logprobs=None))
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["logprobs"] is None


def test_tokenize_counts_a_conversation_as_chat_completions_bills_it(
    chat: httpx.Client, tiny_chat: Path
) -> None:
    """vLLM's form: ``messages`` rendered with the model's chat template (what ``estimate``
    counts); ``texts`` with ``add_special_tokens`` as /v1/features tokenizes."""
    ref = Reference(tiny_chat, "causal")
    ids = list(ref.tokenizer(RENDERED, add_special_tokens=False)["input_ids"])
    body = {"messages": [{"role": "user", "content": USER}]}
    got = chat.post("/v1/tokenize", json=body).json()
    billed = chat.post("/v1/chat/completions", json=_body()).json()["usage"]["prompt_tokens"]
    assert got["ids"] == ids
    assert got["count"] == len(ids) == billed
    assert got["max_input_tokens"] > 0
    bare = chat.post("/v1/tokenize", json={**body, "add_generation_prompt": False}).json()
    assert bare["count"] < got["count"]  # without "<|im_start|>assistant\n"
    many = chat.post("/v1/tokenize", json={"texts": [USER, ""], "add_special_tokens": True})
    assert [d["ids"] for d in many.json()["data"]] == [
        list(ref.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in (USER, "")
    ]
    for wrong, status, words in (
        ({"text": "a", "messages": body["messages"]}, 422, "exactly one"),
        ({"messages": []}, 422, "messages is empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 422, "messages"),
    ):
        resp = chat.post("/v1/tokenize", json=wrong)
        assert resp.status_code == status, resp.text
        assert words in resp.json()["error"]["message"]


def test_tokenize_refuses_a_conversation_without_a_chat_template(causal: httpx.Client) -> None:
    resp = causal.post("/v1/tokenize", json={"messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 400
    assert "no chat template" in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "status", "words"),
    [
        ({"max_tokens": 5}, 400, "max_tokens must be 1"),
        ({"logprobs": False}, 400, "top_logprobs requires logprobs"),
        ({"top_logprobs": 6}, 400, "between 0 and 5"),
        ({"logprob_token_ids": [10**7]}, 422, "outside the vocabulary"),
        ({"stream": True}, 400, "stream must be false"),
        ({"messages": []}, 422, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 422, "role"),
    ],
)
def test_chat_refusals_say_what_was_wrong(
    chat: httpx.Client, extra: dict[str, object], status: int, words: str
) -> None:
    resp = chat.post("/v1/chat/completions", json=_body(**extra))
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]["message"]


def test_chat_needs_a_chat_template(causal: httpx.Client) -> None:
    resp = causal.post("/v1/chat/completions", json=_body(top_logprobs=2))
    assert resp.status_code == 400
    assert "no chat template" in resp.json()["error"]["message"]
    assert "/v1/completions" in resp.json()["error"]["message"]


def test_chat_refused_by_a_masked_model(masked: httpx.Client) -> None:
    resp = masked.post("/v1/chat/completions", json=_body(top_logprobs=2))
    assert resp.status_code == 400
    assert "causal LM" in resp.json()["error"]["message"]


@pytest.mark.slow
def test_default_model_chat_matches_features() -> None:
    """SmolLM2-Instruct's own template; the listed ids equal /v1/features on the rendered text."""
    dm.ensure_default_model()
    question = (
        "Review: I loved this movie, wonderful acting.\n"
        "Is the sentiment of this review positive or negative? Answer with one word."
    )
    rendered = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        f"Face<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    with (
        run_server(None, startup_timeout=600, max_wait_ms=10, threads=1) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        words = ["positive", "negative", "Positive"]
        ids = [client.post("/v1/tokenize", json={"text": w}).json()["ids"][0] for w in words]
        exact = client.post(
            "/v1/features", json={"inputs": [rendered], "label_token_ids": ids}
        ).json()["data"][0]["token_logprobs"]
        body = {
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 1,
            "logprobs": True,
            "top_logprobs": 20,
        }
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        top = resp.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        found = {t["token"]: t["logprob"] for t in top}
        for word, value in zip(words, exact, strict=True):
            assert found[word] == pytest.approx(value, abs=1e-4)  # all three in the top 20
        assert found["positive"] > found["negative"]
        resp = client.post(
            "/v1/chat/completions",
            json={**body, "top_logprobs": 0, "logprob_token_ids": ids},
        )
        listed = resp.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        assert [t["logprob"] for t in listed] == pytest.approx(exact, abs=1e-4)

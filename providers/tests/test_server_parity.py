"""The server's numbers equal transformers run directly on the same weights (atol 1e-4).

Inputs are batched with others of different lengths in the server (right padding) and run alone
and unpadded in the reference, so these also show that padding does not leak into results.
"""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_reference import Reference

ATOL = 1e-4

MASKED_INPUTS = [
    "The movie was great. It was <mask>.",
    "A boring and dull film, I hated it. In summary, it was <mask>.",
    "<mask> movie!",
    "It was fun, the music was beautiful and the actors were perfect. Overall it was <mask>.",
]
CAUSAL_INPUTS = [
    "The movie was great. It was",
    "A boring and dull film, I hated it. In summary, it was",
    "Good",
    "It was fun, the music was beautiful and the actors were perfect. Overall it was",
]


def _close(got: list[float], want: object) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want), atol=ATOL)


def _label_ids(ref: Reference) -> list[int]:
    ids = [
        ref.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" great", " terrible")
    ]
    return [*ids, 0, 7]


def test_masked_features_match_transformers(
    masked: httpx.Client, ref_masked: Reference, tiny_masked: Path
) -> None:
    labels = _label_ids(ref_masked)
    resp = masked.post("/v1/features", json={"inputs": MASKED_INPUTS, "label_token_ids": labels})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == tiny_masked.name  # served under its folder's name
    assert body["fingerprint"].startswith("sha256:")
    assert len(body["data"]) == len(MASKED_INPUTS)
    total = 0
    for text, item in zip(MASKED_INPUTS, body["data"], strict=True):
        ids = ref_masked.ids(text)
        want = ref_masked.score(ids)
        _close(item["token_logits"], want["logits"][labels])
        _close(item["token_logprobs"], want["logprobs"][labels])
        _close(item["hidden"], want["hidden"])
        assert item["n_tokens"] == len(ids)
        assert item["truncated"] is False
        total += len(ids)
    assert body["usage"]["prompt_tokens"] == total


def test_causal_features_match_transformers(causal: httpx.Client, ref_causal: Reference) -> None:
    labels = _label_ids(ref_causal)
    resp = causal.post(
        "/v1/features",
        json={"inputs": CAUSAL_INPUTS, "label_token_ids": labels, "return_hidden": True},
    )
    assert resp.status_code == 200, resp.text
    for text, item in zip(CAUSAL_INPUTS, resp.json()["data"], strict=True):
        ids = ref_causal.ids(text)
        want = ref_causal.score(ids)
        _close(item["token_logits"], want["logits"][labels])
        _close(item["token_logprobs"], want["logprobs"][labels])
        _close(item["hidden"], want["hidden"])
        assert item["n_tokens"] == len(ids)


def test_base64_hidden_is_little_endian_float32(masked: httpx.Client) -> None:
    body = {"inputs": MASKED_INPUTS[:2], "label_token_ids": [5]}
    floats = masked.post("/v1/features", json=body).json()["data"]
    packed = masked.post("/v1/features", json={**body, "encoding_format": "base64"}).json()["data"]
    for f, p in zip(floats, packed, strict=True):
        vec = np.frombuffer(base64.b64decode(p["hidden"]), dtype="<f4")
        np.testing.assert_array_equal(vec, np.asarray(f["hidden"], dtype=np.float32))
        assert p["token_logits"] == f["token_logits"]


def test_return_hidden_false_gives_null(masked: httpx.Client) -> None:
    body = {"inputs": MASKED_INPUTS[:1], "label_token_ids": [5], "return_hidden": False}
    item = masked.post("/v1/features", json=body).json()["data"][0]
    assert item["hidden"] is None
    assert len(item["token_logits"]) == 1


def test_completions_logprobs_match(causal: httpx.Client, ref_causal: Reference) -> None:
    labels = _label_ids(ref_causal)[:2]
    resp = causal.post(
        "/v1/completions",
        json={
            "model": "anything",
            "prompt": CAUSAL_INPUTS,
            "max_tokens": 1,
            "logprobs": 3,
            "temperature": 0,
        },
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == len(CAUSAL_INPUTS)
    for text, choice in zip(CAUSAL_INPUTS, body["choices"], strict=True):
        want = ref_causal.score(ref_causal.ids(text))["logprobs"]
        top = want.topk(3)
        greedy = int(want.argmax())
        lp = choice["logprobs"]
        assert choice["text"] == ref_causal.tokenizer.decode([greedy])
        assert lp["tokens"] == [ref_causal.tokenizer.decode([greedy])]
        _close(lp["token_logprobs"], [want[greedy]])
        top_dict = lp["top_logprobs"][0]
        assert len(top_dict) == 3  # the greedy token is the top one
        for tid, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert top_dict[ref_causal.tokenizer.decode([tid])] == pytest.approx(value, abs=ATOL)
    # vLLM's logprob_token_ids: exactly the listed ids plus the chosen one, whatever their rank.
    resp = causal.post(
        "/v1/completions",
        json={
            "prompt": CAUSAL_INPUTS[0],
            "max_tokens": 1,
            "logprobs": 0,
            "logprob_token_ids": labels,
            "return_tokens_as_token_ids": True,
        },
    )
    assert resp.status_code == 200, resp.text
    want = ref_causal.score(ref_causal.ids(CAUSAL_INPUTS[0]))["logprobs"]
    top_dict = resp.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    greedy = int(want.argmax())
    assert set(top_dict) == {f"token_id:{i}" for i in [*labels, greedy]}
    for tid in labels:
        assert top_dict[f"token_id:{tid}"] == pytest.approx(float(want[tid]), abs=ATOL)


def test_completions_echo_prompt_logprobs(causal: httpx.Client, ref_causal: Reference) -> None:
    text = CAUSAL_INPUTS[1]
    resp = causal.post(
        "/v1/completions",
        json={"prompt": text, "max_tokens": 0, "logprobs": 1, "echo": True},
    )
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    ids = ref_causal.ids(text)
    all_lp = ref_causal.score(ids)["all_logprobs"]
    lp = choice["logprobs"]
    assert choice["text"] == text
    assert len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None
    want = [float(all_lp[i - 1, ids[i]]) for i in range(1, len(ids))]
    _close(lp["token_logprobs"][1:], want)
    assert lp["text_offset"][0] == 0
    assert resp.json()["usage"]["completion_tokens"] == 0


def test_completions_prompt_as_token_ids(causal: httpx.Client, ref_causal: Reference) -> None:
    ids = ref_causal.ids(CAUSAL_INPUTS[0])
    by_ids = causal.post("/v1/completions", json={"prompt": ids, "logprobs": 2}).json()
    by_text = causal.post(
        "/v1/completions", json={"prompt": CAUSAL_INPUTS[0], "logprobs": 2}
    ).json()
    assert by_ids["choices"][0]["logprobs"] == by_text["choices"][0]["logprobs"]
    assert by_ids["choices"][0]["prompt_token_ids"] == ids


def test_embeddings_are_mean_pooled_last_layer(
    causal: httpx.Client, masked: httpx.Client, ref_causal: Reference, ref_masked: Reference
) -> None:
    for client, ref in ((causal, ref_causal), (masked, ref_masked)):
        texts = ["a great movie", "the plot was dull and the acting was poor"]
        resp = client.post("/v1/embeddings", json={"input": texts, "model": "x"})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["object"] == "list"
        for i, (text, item) in enumerate(zip(texts, body["data"], strict=True)):
            assert item["object"] == "embedding"
            assert item["index"] == i
            _close(item["embedding"], ref.score(ref.ids(text))["pooled"])
        single = client.post(
            "/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}
        ).json()["data"][0]["embedding"]
        vec = np.frombuffer(base64.b64decode(single), dtype="<f4")
        np.testing.assert_allclose(vec, body["data"][0]["embedding"], atol=ATOL)


def test_fill_mask_matches_full_vocab_softmax(masked: httpx.Client, ref_masked: Reference) -> None:
    text = MASKED_INPUTS[0]
    resp = masked.post(
        "/fill-mask",
        json={"inputs": text, "parameters": {"targets": [" great", " terrible"], "top_k": 5}},
    )
    assert resp.status_code == 200, resp.text
    rows = resp.json()
    probs = ref_masked.score(ref_masked.ids(text))["logits"].softmax(-1)
    great, terrible = _label_ids(ref_masked)[:2]
    assert {r["token"] for r in rows} == {great, terrible}
    assert rows[0]["score"] >= rows[1]["score"]
    for r in rows:
        assert r["score"] == pytest.approx(float(probs[r["token"]]), abs=1e-6)
        assert r["token_str"] == ref_masked.tokenizer.decode([r["token"]])
        assert r["sequence"] == "The movie was" + " great. It was" + r["token_str"] + "."
    # Without targets: the top_k of the whole vocabulary, in order; list input -> list of lists.
    resp = masked.post("/models/tiny", json={"inputs": [text, text], "parameters": {"top_k": 3}})
    assert resp.status_code == 200, resp.text
    both = resp.json()
    assert both[0] == both[1]
    top = probs.topk(3)
    assert [r["token"] for r in both[0]] == top.indices.tolist()

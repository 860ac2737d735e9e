"""The /v1/features fast path: batch tokenizing, label gathering on the device, the LM head run at
the scoring positions only, the hand-written JSON, mixed label sets in one forward pass, and the
CPU counters the benchmark reads. Each is checked against the plain way of doing the same."""

from __future__ import annotations

import asyncio
import base64
import json
import math
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from dect_maas_server.app import features_body
from dect_maas_server.engine import Engine, InputError, load_engine
from dect_maas_server.testing import TINY_WORDS
from hypothesis import given, settings
from hypothesis import strategies as st
from server_reference import Reference

ATOL = 1e-4

MASKED_TEXTS = [
    "It was <mask>.",
    "<mask>",
    "  The movie was great.   It was<mask> !",
    "Café, naïve 😀 — it was <mask>.",
    "The movie " + "was really very good and " * 8 + "in summary it was <mask> .",
    "tab\tand\nnewline <mask>",
]
CAUSAL_TEXTS = [
    "The movie was great. It was",
    "Good",
    "  leading and trailing spaces  ",
    "Café, naïve 😀 — it was",
    "The movie " + "was really very good and " * 8 + "in summary it was",
]


@pytest.fixture(scope="module")
def masked_engine(tiny_masked: Path) -> Engine:
    return load_engine(str(tiny_masked), max_input_tokens=24)


@pytest.fixture(scope="module")
def causal_engine(tiny_causal: Path) -> Engine:
    return load_engine(str(tiny_causal), max_input_tokens=24)


# -- tokenizing -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["masked", "causal"])
def test_encode_many_equals_encode_one_by_one(
    kind: str, masked_engine: Engine, causal_engine: Engine
) -> None:
    engine = masked_engine if kind == "masked" else causal_engine
    texts = MASKED_TEXTS if kind == "masked" else CAUSAL_TEXTS
    many = engine.encode_many(texts)
    assert many == [engine.encode(t, i) for i, t in enumerate(texts)]
    assert many[4].truncated  # the long input
    assert len(many[4].ids) == 24
    assert not many[0].truncated
    assert engine.encode_many([]) == []


def test_encode_many_names_the_first_bad_input(masked_engine: Engine) -> None:
    with pytest.raises(InputError) as info:
        masked_engine.encode_many(["It was <mask>.", "no mask", "two <mask> <mask>"])
    assert info.value.index == 1
    assert "input 1 " in str(info.value)


_pieces = st.sampled_from(
    [*TINY_WORDS, *(" " + w for w in TINY_WORDS), " ", "  ", ".", "!", "é", "😀", "\n", "<mask>"]
)


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.lists(_pieces, max_size=12).map("".join), min_size=1, max_size=6))
def test_batch_tokenizing_equals_the_transformers_tokenizer(
    masked_engine: Engine, causal_engine: Engine, texts: list[str]
) -> None:
    """The private Rust backend gives the ids ``tokenizer(text, add_special_tokens=False)`` does."""
    for engine in (masked_engine, causal_engine):
        want = [list(engine.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        assert engine._bodies(texts) == want


# -- scoring --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["masked", "causal"])
def test_label_scores_equal_full_vocabulary_rows(
    kind: str,
    masked_engine: Engine,
    causal_engine: Engine,
    ref_masked: Reference,
    ref_causal: Reference,
) -> None:
    engine, ref = (masked_engine, ref_masked) if kind == "masked" else (causal_engine, ref_causal)
    texts = MASKED_TEXTS if kind == "masked" else CAUSAL_TEXTS
    items = engine.encode_many(texts)
    labels = [9, 3, 9, 0, engine.vocab_size - 1]  # unsorted, repeated, both ends
    scores = engine.score(items, label_ids=labels, full=[True] * len(items))
    assert scores.label_logits.shape == (len(items), len(labels))
    assert scores.hidden.shape == (len(items), engine.hidden_size)
    assert scores.label_logits.dtype == np.float32
    for row, it in enumerate(items):
        full = scores.full[row]
        assert full is not None
        want = ref.score(list(it.ids))  # alone, unpadded, the whole LM head
        np.testing.assert_allclose(scores.label_logits[row], want["logits"][labels], atol=ATOL)
        np.testing.assert_allclose(scores.label_logprobs[row], want["logprobs"][labels], atol=ATOL)
        np.testing.assert_allclose(scores.hidden[row], want["hidden"], atol=ATOL)
        np.testing.assert_allclose(full.logits.numpy(), want["logits"], atol=ATOL)
        np.testing.assert_allclose(full.logprobs.numpy(), want["logprobs"], atol=ATOL)
    # Without ``full``, no full-vocabulary rows come back; the label scores are the same.
    light = engine.score(items, label_ids=labels)
    assert light.full == [None] * len(items)
    np.testing.assert_array_equal(light.label_logits, scores.label_logits)


def test_masked_lm_head_runs_at_the_mask_only(masked_engine: Engine, causal_engine: Engine) -> None:
    """The probe enabled the gather for the masked model; the causal one uses logits_to_keep."""
    assert masked_engine._head_gather
    assert causal_engine._keep_arg
    head = masked_engine.model.get_output_embeddings()
    seen: list[tuple[int, ...]] = []
    handle = head.register_forward_hook(lambda _m, _a, out: seen.append(tuple(out.shape)))
    try:
        masked_engine.score(masked_engine.encode_many(MASKED_TEXTS[:3]), label_ids=[5])
    finally:
        handle.remove()
    assert seen == [(3, 1, masked_engine.vocab_size)]  # not (3, longest input, V)
    assert not head._forward_pre_hooks  # the gather hook is removed after each pass


def test_echo_still_gets_every_position(causal_engine: Engine, ref_causal: Reference) -> None:
    items = causal_engine.encode_many(CAUSAL_TEXTS[:2])
    scores = causal_engine.score(items, full=[True, True], want_all=[True, False])
    first = scores.full[0]
    assert first is not None
    assert first.all_logprobs is not None
    want = ref_causal.score(list(items[0].ids))["all_logprobs"]
    np.testing.assert_allclose(first.all_logprobs.numpy(), want, atol=ATOL)
    second = scores.full[1]
    assert second is not None
    assert second.all_logprobs is None


# -- the response text --------------------------------------------------------------------


def _reference_body(
    logits: np.ndarray[Any, Any],
    logprobs: np.ndarray[Any, Any],
    hidden: np.ndarray[Any, Any] | None,
    n_tokens: list[int],
    truncated: list[bool],
    fmt: str,
) -> dict[str, Any]:
    def floats(row: np.ndarray[Any, Any]) -> list[float | None]:
        return [float(x) if math.isfinite(x) else None for x in row]

    data = []
    for i in range(len(n_tokens)):
        h: Any = None
        if hidden is not None:
            h = (
                base64.b64encode(hidden[i].astype("<f4").tobytes()).decode()
                if fmt == "base64"
                else floats(hidden[i])
            )
        data.append(
            {
                "token_logits": floats(logits[i]),
                "token_logprobs": floats(logprobs[i]),
                "hidden": h,
                "n_tokens": n_tokens[i],
                "truncated": truncated[i],
            }
        )
    return {
        "model": 'm "ü"',
        "fingerprint": "sha256:ab",
        "data": data,
        "usage": {"prompt_tokens": sum(n_tokens)},
    }


def _strict_json(raw: bytes) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    return json.loads(raw, parse_constant=refuse)


@pytest.mark.parametrize("fmt", ["base64", "float"])
@pytest.mark.parametrize("finite", [True, False])
@pytest.mark.parametrize("with_hidden", [True, False])
def test_features_body_is_the_json_of_the_arrays(fmt: str, finite: bool, with_hidden: bool) -> None:
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((3, 4)).astype(np.float32) * 1e3
    logprobs = (logits - 2000.0).astype(np.float32)
    hidden = rng.standard_normal((3, 5)).astype(np.float32)
    if not finite:
        logprobs[1, 2] = -np.inf
        logits[2, 0] = np.nan
        hidden[0, 1] = np.inf
    n_tokens, truncated = [3, 7, 1], [False, True, False]
    raw = features_body(
        'm "ü"',
        "sha256:ab",
        logits,
        logprobs,
        hidden if with_hidden else None,
        n_tokens,
        truncated,
        fmt,
    )
    got = _strict_json(raw)
    want = _reference_body(
        logits, logprobs, hidden if with_hidden else None, n_tokens, truncated, fmt
    )
    assert got == want  # floats exactly: each float32 written as the shortest exact repr


# -- through the server -------------------------------------------------------------------


def test_requests_with_different_labels_share_a_forward_pass(causal: httpx.Client) -> None:
    """The causal test server waits 100 ms for a batch: these four requests meet in one pass
    (the label union has 5 ids) and each gets exactly its own columns."""
    asks = [
        (["The movie was great. It was"], [5, 9]),
        (["Good", "The plot was bad"], [9]),
        (["It was fun"], [3, 5, 8, 9, 11]),
        (["Good"], []),
    ]
    alone = [
        causal.post("/v1/features", json={"inputs": t, "label_token_ids": ids}).json()["data"]
        for t, ids in asks
    ]
    before = causal.get("/metrics").json()
    url = str(causal.base_url)

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post("/v1/features", json={"inputs": t, "label_token_ids": ids})
                    for t, ids in asks
                )
            )

    responses = asyncio.run(together())
    after = causal.get("/metrics").json()
    assert after["batches_total"] - before["batches_total"] < len(asks)  # some were coalesced
    for (_, ids), single, resp in zip(asks, alone, responses, strict=True):
        assert resp.status_code == 200, resp.text
        for a, b in zip(single, resp.json()["data"], strict=True):
            assert len(b["token_logits"]) == len(ids)
            np.testing.assert_allclose(b["token_logits"], a["token_logits"], atol=ATOL)
            np.testing.assert_allclose(b["token_logprobs"], a["token_logprobs"], atol=ATOL)
            np.testing.assert_allclose(b["hidden"], a["hidden"], atol=ATOL)


def test_metrics_count_cpu_time(masked: httpx.Client) -> None:
    before = masked.get("/metrics").json()
    body = {"inputs": ["It was <mask>."] * 8, "label_token_ids": [1], "encoding_format": "base64"}
    for _ in range(3):
        assert masked.post("/v1/features", json=body).status_code == 200
    after = masked.get("/metrics").json()
    for key in (
        "process_cpu_seconds_total",
        "forward_cpu_seconds_total",
        "tokenize_cpu_seconds_total",
    ):
        assert after[key] > before[key] >= 0
    # Forward passes and tokenizing are parts of the process's CPU time.
    used = after["process_cpu_seconds_total"] - before["process_cpu_seconds_total"]
    parts = (after["forward_cpu_seconds_total"] - before["forward_cpu_seconds_total"]) + (
        after["tokenize_cpu_seconds_total"] - before["tokenize_cpu_seconds_total"]
    )
    assert 0 < parts <= used + 1e-3


def test_raw_route_errors_keep_their_shapes(masked: httpx.Client) -> None:
    cases = [
        (b"", 422),
        (b"[1, 2]", 422),
        (json.dumps({"inputs": ["<mask>"], "label_token_ids": ["x"]}).encode(), 422),
        (json.dumps({"inputs": ["<mask>"], "return_hidden": "maybe"}).encode(), 422),
    ]
    for content, status in cases:
        resp = masked.post(
            "/v1/features", content=content, headers={"Content-Type": "application/json"}
        )
        assert resp.status_code == status, resp.text
        assert set(resp.json()["error"]) == {"type", "message"}
        assert resp.json()["error"]["type"] == "invalid_request_error"
    ok = masked.post("/v1/features", json={"inputs": ["<mask>"], "label_token_ids": [2, 2]})
    assert ok.headers["content-type"] == "application/json"
    item = ok.json()["data"][0]
    assert item["token_logits"][0] == item["token_logits"][1]  # a repeated id, twice

"""Dynamic batching: concurrent queries share forward passes, and results do not depend on
what they were batched with (to 1e-4 absolute, float32 on CPU; differences come only from the
order of floating-point sums in differently shaped matmuls)."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
from dect_maas_server.batcher import split_by_length

ATOL = 1e-4

TEXTS = [
    "Good",
    "The movie was great. It was",
    "A boring and dull film, I hated it, the acting was poor. In summary, it was",
    "Fun",
    "It was fun, the music was beautiful and the actors were perfect. Overall it was",
    "The plot was bad",
]


def _features(client: httpx.Client, texts: list[str]) -> list[dict[str, object]]:
    resp = client.post("/v1/features", json={"inputs": texts, "label_token_ids": [3, 5, 8]})
    assert resp.status_code == 200, resp.text
    return list(resp.json()["data"])


def _same(a: dict[str, object], b: dict[str, object]) -> None:
    for key in ("token_logits", "token_logprobs", "hidden"):
        np.testing.assert_allclose(a[key], b[key], atol=ATOL)  # type: ignore[arg-type]
    assert a["n_tokens"] == b["n_tokens"]


def test_result_does_not_depend_on_batch_companions(causal: httpx.Client) -> None:
    alone = [_features(causal, [t])[0] for t in TEXTS]
    together = _features(causal, TEXTS)
    reordered = _features(causal, TEXTS[::-1])[::-1]
    doubled = _features(causal, [TEXTS[1]] * 3 + [TEXTS[2]])
    for a, b, c in zip(alone, together, reordered, strict=True):
        _same(a, b)
        _same(a, c)
    for item in doubled[:3]:
        _same(alone[1], item)
    _same(alone[2], doubled[3])


def test_masked_padding_does_not_leak(masked: httpx.Client) -> None:
    texts = [
        "<mask>",
        "It was <mask>.",
        "The movie was boring and the plot was bad. It was <mask>.",
    ]
    alone = [_features(masked, [t])[0] for t in texts]
    together = _features(masked, texts)
    for a, b in zip(alone, together, strict=True):
        _same(a, b)


def test_concurrent_requests_are_coalesced(causal: httpx.Client) -> None:
    before = causal.get("/metrics").json()
    url = str(causal.base_url)

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/v1/features",
                        json={"inputs": [TEXTS[i % len(TEXTS)]], "label_token_ids": [3, 5, 8]},
                    )
                    for i in range(24)
                )
            )

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    after = causal.get("/metrics").json()
    assert after["queries_total"] - before["queries_total"] == 24
    batches = after["batches_total"] - before["batches_total"]
    assert batches < 24  # 24 single-input requests shared forward passes
    alone = {t: _features(causal, [t])[0] for t in TEXTS}
    for i, r in enumerate(responses):
        _same(alone[TEXTS[i % len(TEXTS)]], r.json()["data"][0])


def test_split_by_length_limits_padding_and_tokens() -> None:
    lengths = [5, 100, 6, 7, 98, 300, 5]
    groups = split_by_length(lengths, max_tokens=250)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        lens = [lengths[i] for i in g]
        assert max(lens) <= min(lens) * 1.5 + 8
        assert len(g) == 1 or len(g) * max(lens) <= 250
    assert [sorted(lengths[i] for i in g) for g in groups] == [[5, 5, 6, 7], [98, 100], [300]]

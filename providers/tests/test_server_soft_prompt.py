"""Soft prompts on /v1/features (``prompt_embeds``, for Black-Box Tuning).

The key check: a soft prompt equal to the input embeddings of some words must score exactly as
those words written in front of the text, over real HTTP, so the insertion point, the shifted
scoring position and the padding are right.
"""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from dect_maas_server.engine import load_engine


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def test_models_declares_soft_prompts_for_causal_only(
    causal: httpx.Client, masked: httpx.Client
) -> None:
    info = causal.get("/v1/models").json()["data"][0]["soft_prompt"]
    assert info["field"] == "prompt_embeds"
    assert info["placement"] == "prepended"
    assert info["hidden_size"] == causal.get("/v1/models").json()["data"][0]["hidden_size"]
    assert info["embedding_std"] > 0
    assert masked.get("/v1/models").json()["data"][0]["soft_prompt"] is None


def test_soft_prompt_of_word_embeddings_equals_the_words(
    causal: httpx.Client, tiny_causal: Path
) -> None:
    engine = load_engine(str(tiny_causal))
    prefix = " the movie was"
    ids = engine.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        emb = engine.model.get_input_embeddings()(torch.tensor(ids)).numpy()  # [P, H]
    labels = [int(t) for t in engine.tokenizer(" great bad", add_special_tokens=False)["input_ids"]]
    texts = [" fun and sad", " good"]  # different lengths: padding is exercised
    soft = causal.post(
        "/v1/features",
        json={"inputs": texts, "label_token_ids": labels, "prompt_embeds": _b64(emb)},
    )
    assert soft.status_code == 200, soft.text
    plain = causal.post(
        "/v1/features",
        json={"inputs": [prefix + t for t in texts], "label_token_ids": labels},
    )
    got, want = soft.json()["data"], plain.json()["data"]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g["token_logprobs"], w["token_logprobs"], atol=1e-4)
        np.testing.assert_allclose(g["hidden"], w["hidden"], atol=1e-4)
        assert g["n_tokens"] == w["n_tokens"]  # the soft rows are billed as tokens
    # and a different soft prompt gives different scores
    other = causal.post(
        "/v1/features",
        json={"inputs": texts, "label_token_ids": labels, "prompt_embeds": _b64(emb * 0)},
    ).json()["data"]
    assert not np.allclose(other[0]["token_logprobs"], got[0]["token_logprobs"], atol=1e-3)


@pytest.mark.parametrize(
    ("embeds", "message"),
    [
        ("not base64!", "not valid base64"),
        (base64.b64encode(b"\x00" * 6).decode(), "whole number of float32 rows"),
        ("NAN", "not finite"),
        ("BIG", "the limit is 256"),
    ],
)
def test_bad_soft_prompts_are_422_with_the_reason(
    causal: httpx.Client, embeds: str, message: str
) -> None:
    h = causal.get("/v1/models").json()["data"][0]["hidden_size"]
    if embeds == "NAN":
        embeds = _b64(np.full((1, h), np.nan))
    elif embeds == "BIG":
        embeds = _b64(np.zeros((257, h)))
    r = causal.post("/v1/features", json={"inputs": ["fun"], "prompt_embeds": embeds})
    assert r.status_code == 422
    assert message in r.json()["error"]["message"]


def test_masked_server_refuses_soft_prompts(masked: httpx.Client) -> None:
    h = masked.get("/v1/models").json()["data"][0]["hidden_size"]
    r = masked.post(
        "/v1/features", json={"inputs": ["It was <mask>."], "prompt_embeds": _b64(np.zeros((2, h)))}
    )
    assert r.status_code == 422
    assert "causal LMs only" in r.json()["error"]["message"]


def test_concurrent_soft_prompts_share_a_pass_and_score_as_alone(
    tiny_causal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from dect_maas_server import soft_prompt as sp

    engine = load_engine(str(tiny_causal))
    items = engine.encode_many([" fun and sad", " good", " a long and winding review"])
    labels = [int(t) for t in engine.tokenizer(" great bad", add_special_tokens=False)["input_ids"]]
    rng = np.random.default_rng(0)
    prompts = [
        torch.from_numpy(rng.normal(0, 0.02, (4, engine.hidden_size)).astype(np.float32))
        for _ in range(6)
    ]
    alone = [sp.score_with_soft_prompt(engine, items, labels, p) for p in prompts]
    passes: list[int] = []
    real = sp.score_with_soft_prompt

    def counted(e: object, its: list[object], ids: object, p: torch.Tensor) -> object:
        passes.append(len(its))
        return real(e, its, ids, p)  # type: ignore[arg-type]

    monkeypatch.setattr(sp, "score_with_soft_prompt", counted)

    async def main() -> list[sp.Arrays]:
        batcher = sp.SoftPromptBatcher(engine)
        return await asyncio.gather(*(batcher.score(items, labels, p) for p in prompts))

    together = asyncio.run(main())
    assert passes == [18]  # all six were waiting when the first pass began: one pass
    for got, want in zip(together, alone, strict=True):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4)

"""End to end: the client against the real local server (a subprocess on loopback, tiny models).

Features must equal what the server computes when asked directly, and what transformers computes on
the same weights; a second run must pay zero queries; the estimate must match what a run spends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from dect_maas import CacheConfig, CensoredScoreWarning, Client, Task
from dect_maas.adapters import HFInferenceAdapter, LocalAdapter, OpenAICompatibleAdapter

server_testing = pytest.importorskip("dect_maas_server.testing")
pytestmark = pytest.mark.slow  # two server processes start here (~20-30 s each on 2 busy cores)

TEXTS = ["the movie was great fun", "a dull and boring film", "i loved the acting", "bad plot"]
TASKS = {
    "masked": Task("{text} It was {mask}.", {"negative": ["bad", "terrible"], "positive": "great"}),
    "causal": Task("{text} It was {mask}", {"negative": ["bad", "terrible"], "positive": "great"}),
}


@pytest.fixture(scope="module", params=["masked", "causal"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    kind = request.param
    path = server_testing.make_tiny_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
    with server_testing.run_server(path) as url:
        yield kind, path, url


def reference(kind: str, path: Path, prompts: list[str], ids: list[int]) -> tuple[Any, Any]:
    """Label scores and the hidden state at the scoring position, from transformers directly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    cls = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
    model = cls.from_pretrained(path).eval()
    scores, hidden = [], []
    with torch.no_grad():
        for prompt in prompts:
            enc = tok(prompt, return_tensors="pt")
            out = model(**enc, output_hidden_states=True)
            if kind == "masked":
                pos = int((enc["input_ids"][0] == tok.mask_token_id).nonzero()[0, 0])
                row = out.logits[0, pos]  # raw logits: the paper's scores
            else:
                pos = enc["input_ids"].shape[1] - 1
                row = torch.log_softmax(out.logits[0, pos].float(), dim=-1)
            scores.append(row[ids].numpy())
            hidden.append(out.hidden_states[-1][0, pos].numpy())
    return np.stack(scores), np.stack(hidden)


def test_features_equal_the_server_and_transformers(served: Any, tmp_path: Path) -> None:
    kind, path, url = served
    task = TASKS[kind]
    with Client(LocalAdapter(url), cache=CacheConfig(tmp_path / "c"), ledger=tmp_path / "l") as c:
        feats = c.features(task, TEXTS)
    assert feats.scores is not None
    assert feats.hidden is not None
    assert feats.meta.score_kind == ("logits" if kind == "masked" else "logprobs")
    flat_ids = [i for ids in feats.meta.label_token_ids for i in ids]
    assert len(flat_ids) == 3
    mask = "<mask>" if kind == "masked" else None
    prompts = [task.render(t, mask_token=mask) for t in TEXTS]

    direct = httpx.post(
        f"{url}/v1/features",
        json={"inputs": prompts, "label_token_ids": flat_ids, "encoding_format": "float"},
        timeout=60,
    ).json()
    field = "token_logits" if kind == "masked" else "token_logprobs"
    flat = np.array([d[field] for d in direct["data"]])
    per_class = np.stack([flat[:, :2].max(axis=1), flat[:, 2]], axis=1)
    np.testing.assert_allclose(feats.scores, per_class, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(feats.hidden, [d["hidden"] for d in direct["data"]], atol=1e-6)
    assert feats.meta.revision == direct["fingerprint"]

    ref_scores, ref_hidden = reference(kind, path, prompts, flat_ids)
    ref = np.stack([ref_scores[:, :2].max(axis=1), ref_scores[:, 2]], axis=1)
    np.testing.assert_allclose(feats.scores, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats.hidden, ref_hidden, rtol=1e-4, atol=1e-4)
    cf_scores, cf_hidden = reference(kind, path, [task.content_free(mask_token=mask)], flat_ids)
    assert feats.content_free is not None
    np.testing.assert_allclose(
        feats.content_free, [cf_scores[0, :2].max(), cf_scores[0, 2]], rtol=1e-4, atol=1e-4
    )
    # the content-free prompt's vector is kept too (a reference point for the decoders)
    assert feats.content_free_hidden is not None
    np.testing.assert_allclose(feats.content_free_hidden, cf_hidden[0], rtol=1e-4, atol=1e-4)


def test_second_run_pays_zero_queries_and_estimate_matches(served: Any, tmp_path: Path) -> None:
    kind, _, url = served
    task = TASKS[kind]
    adapter = LocalAdapter(url, max_inputs_per_request=2)
    with Client(adapter, cache=CacheConfig(tmp_path / "c"), ledger=tmp_path / "l") as client:
        client.features(task, TEXTS[:1])  # learns the server and the label ids
        est = client.estimate(task, TEXTS)
        before = client.ledger.spent()
        first = client.features(task, TEXTS)
        spent = client.ledger.spent() - before
        second = client.features(task, TEXTS)
        again = client.ledger.spent() - before
        summary = client.ledger.summary()
    assert est.assumptions == ()
    assert (est.queries, est.cached_queries, est.requests) == (3, 2, 2)
    assert (spent.queries, spent.requests) == (est.queries, est.requests)
    # scaled from the provider's counts in the cache: never more than 5% below what is spent
    assert 0 < 0.95 * spent.input_tokens <= est.input_tokens
    assert again == spent  # the second run paid nothing
    assert second == first
    assert summary.cache_hits == 2 + 5


def _local_logprobs(url: str, prompts: list[str], ids: list[int]) -> np.ndarray:
    direct = httpx.post(
        f"{url}/v1/features",
        json={"inputs": prompts, "label_token_ids": ids, "encoding_format": "float"},
        timeout=60,
    ).json()
    return np.array([d["token_logprobs"] for d in direct["data"]])


def test_openai_compatible_adapter_on_the_servers_completions(served: Any, tmp_path: Path) -> None:
    kind, _, url = served
    if kind != "causal":
        pytest.skip("/v1/completions serves causal LMs")
    task = TASKS[kind]
    common = {"tokenize_api": "dect-maas", "max_prompts_per_request": 4}
    exact = OpenAICompatibleAdapter(url, "tiny", exact_token_ids=True, **common)
    with Client(exact, cache=CacheConfig(tmp_path / "c"), ledger=tmp_path / "l") as client:
        feats = client.features(task, TEXTS)
    ids = [i for group in feats.meta.label_token_ids for i in group]
    flat = _local_logprobs(url, [task.render(t) for t in TEXTS], ids)
    want = np.stack([flat[:, :2].max(axis=1), flat[:, 2]], axis=1)
    assert feats.scores is not None
    assert feats.censored is None  # exact: nothing censored
    np.testing.assert_allclose(feats.scores, want, rtol=1e-5, atol=1e-5)

    top2 = OpenAICompatibleAdapter(url, "tiny", top_logprobs=2, embeddings_base_url=url, **common)
    with (
        Client(top2, cache=CacheConfig(tmp_path / "c2"), ledger=tmp_path / "l2") as client,
        pytest.warns(CensoredScoreWarning),
    ):
        approx = client.features(task, TEXTS)
    assert approx.scores is not None
    assert approx.censored is not None
    exact_part = ~approx.censored
    np.testing.assert_allclose(approx.scores[exact_part], want[exact_part], rtol=1e-5, atol=1e-5)
    assert (want[approx.censored] <= approx.scores[approx.censored] + 1e-6).all()  # upper bounds
    pooled = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS}, timeout=60).json()
    np.testing.assert_allclose(
        approx.hidden, [d["embedding"] for d in pooled["data"]], rtol=1e-5, atol=1e-6
    )
    assert approx.meta.extra["roles"] == ["scores", "vectors"]


def test_hf_inference_adapter_on_the_servers_fill_mask(served: Any, tmp_path: Path) -> None:
    kind, _, url = served
    if kind != "masked":
        pytest.skip("fill-mask serves masked LMs")
    task = TASKS[kind]
    adapter = HFInferenceAdapter("tiny", base_url=f"{url}/fill-mask", mask_token="<mask>")
    with Client(adapter, cache=CacheConfig(tmp_path / "c"), ledger=tmp_path / "l") as client:
        feats = client.features(task, TEXTS)
        summary = client.ledger.summary()
    with Client(LocalAdapter(url), cache=None, ledger=tmp_path / "l2") as client:
        ids = [i for group in client.features(task, TEXTS[:1]).meta.label_token_ids for i in group]
    flat = _local_logprobs(url, [task.render(t, mask_token="<mask>") for t in TEXTS], ids)
    want = np.stack([flat[:, :2].max(axis=1), flat[:, 2]], axis=1)
    assert feats.meta.score_kind == "logprobs"
    np.testing.assert_allclose(feats.scores, want, rtol=1e-4, atol=1e-5)
    assert summary.requests == len(TEXTS) + 1  # fill-mask: one input per request

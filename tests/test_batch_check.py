"""The one-time batching check on embeddings endpoints: a batch of two against the two alone.

Reaches inside: the probes and their agreement rule are internals of the client.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from dect_maas import CacheConfig, Client, Task, UnsupportedCapability
from dect_maas.adapters import OpenAICompatibleAdapter
from dect_maas.client.batch_check import PROBES, agreement

TASK = Task("{text} It was {mask}", {"neg": "bad", "pos": "great"})
TEXTS = ["a dull film", "i loved it", "bad plot", "great fun", "meh"]


def _vector(text: str) -> list[float]:
    seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return np.random.RandomState(seed).normal(size=16).tolist()


def misbatching(request: httpx.Request) -> httpx.Response:
    """llama-cpp-python 0.3.36's bug: in a batch only the first input's vector is right."""
    inputs = json.loads(request.content)["input"]
    texts = [inputs] if isinstance(inputs, str) else inputs
    data = [
        {"index": i, "object": "embedding", "embedding": _vector(t if i == 0 else t[::-1])}
        for i, t in enumerate(texts)
    ]
    return httpx.Response(200, json={"data": data, "usage": {"prompt_tokens": 3 * len(texts)}})


def test_agreement_is_the_worst_cosine() -> None:
    a, b = [1.0, 0.0], [0.0, 1.0]
    assert agreement([a, b], [a, b]) == pytest.approx(1.0)
    assert agreement([a, b], [a, a]) == pytest.approx(0.0)
    assert agreement([a], [[2.0, 0.0]]) == pytest.approx(1.0)  # scale does not matter
    assert agreement([a], [[1.0, 0.0, 0.0]]) == -1.0


def test_a_misbatching_server_is_refused_once_checked(tmp_path: Path) -> None:
    adapter = OpenAICompatibleAdapter(
        "http://llama-embed.test", "m", scores=False, embeddings_base_url="http://llama-embed.test"
    )
    sent: list[object] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content)["input"])
        return misbatching(request)

    cache = CacheConfig(tmp_path / "c")
    with (
        Client(adapter, cache=cache, transport=httpx.MockTransport(record)) as client,
        pytest.raises(UnsupportedCapability, match="embeddings_batch_size = 1") as info,
    ):
        client.features(TASK, TEXTS)
    assert "http://llama-embed.test/v1/embeddings" in str(info.value)
    assert sent == [list(PROBES), [PROBES[0]], [PROBES[1]]]  # the check only; no text was sent
    sent.clear()
    with (
        Client(adapter, cache=cache, transport=httpx.MockTransport(record)) as client,
        pytest.raises(UnsupportedCapability),
    ):
        client.features(TASK, TEXTS)
    assert sent == []  # the verdict is cached: refused at once
    one = OpenAICompatibleAdapter(
        "http://llama-embed.test", "m", scores=False, embeddings_base_url="http://llama-embed.test",
        max_embedding_inputs=1,
    )  # fmt: skip
    with Client(one, cache=cache, transport=httpx.MockTransport(record)) as client:
        feats = client.features(TASK, TEXTS)
    assert feats.hidden is not None
    np.testing.assert_allclose(feats.hidden[0], _vector(TEXTS[0]), rtol=1e-6)
    assert all(len(x) == 1 for x in sent)  # one text per request, no check needed


server_testing = pytest.importorskip("dect_maas_server.testing")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = server_testing.make_tiny_model("causal", tmp_path_factory.mktemp("tiny"))
    with server_testing.run_server(path) as url:
        yield url


@pytest.mark.slow
def test_a_server_that_batches_right_passes_and_the_check_is_paid_once(
    server: str, tmp_path: Path
) -> None:
    adapter = OpenAICompatibleAdapter(server, "tiny", scores=False, embeddings_base_url=server)
    cache = CacheConfig(tmp_path / "c")
    with Client(adapter, cache=cache, ledger=tmp_path / "l") as client:
        feats = client.features(TASK, TEXTS)
        first = client.ledger.summary()
    assert feats.hidden is not None
    assert first.requests == 1 + 3  # the texts in one batch, after the check's three requests
    with Client(adapter, cache=cache, ledger=tmp_path / "l2") as client:
        client.features(TASK, ["a new text", "and another"])
        second = client.ledger.summary()
    assert second.requests == 1  # checked already

"""The client fits its requests to the server's advertised label-id caps (``/v1/models``), so a
large label set is split into smaller requests instead of meeting a 413; a set larger than the
per-input cap is refused before anything is sent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dect_maas import CacheConfig, Client, LocalAdapter, Task, UnsupportedCapability
from dect_maas.adapters import Label, Prompt

server_testing = pytest.importorskip("dect_maas_server.testing")

TEXTS = ["the movie was great fun", "a dull and boring film", "i loved it", "bad plot", "fine"]
# Three label words: with 6 scores per request the server takes two inputs at a time.
TASK = Task("{text} It was {mask}", {"negative": ["bad", "terrible"], "positive": "great"})


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = server_testing.make_tiny_model("causal", tmp_path_factory.mktemp("tiny-causal"))
    with server_testing.run_server(path, max_label_token_ids=3, max_scores_per_request=6) as url:
        yield url


def test_requests_are_cut_to_the_servers_score_cap(capped: str, tmp_path: Path) -> None:
    adapter = LocalAdapter(capped, max_inputs_per_request=64)
    with Client(adapter, cache=CacheConfig(tmp_path / "c"), ledger=tmp_path / "l") as client:
        before = client.ledger.spent()
        feats = client.features(TASK, TEXTS)
        spent = client.ledger.spent() - before
    assert feats.scores is not None
    assert feats.scores.shape == (5, 2)  # per class
    # 5 texts and the content-free prompt, two at a time (one request without the cap)
    assert (spent.queries, spent.requests) == (6, 3)


def test_more_label_words_than_the_server_scores_are_refused_before_sending(
    capped: str, tmp_path: Path
) -> None:
    task = Task(
        "{text} It was {mask}", {"negative": ["bad", "awful"], "positive": ["great", "fun"]}
    )
    with Client(LocalAdapter(capped), cache=None, ledger=tmp_path / "l") as client:
        with pytest.raises(
            UnsupportedCapability,
            match="4 label words to score per input; the server takes at most 3",
        ):
            client.features(task, TEXTS)
        assert client.ledger.spent().queries == 0


def test_the_adapter_reads_the_caps_and_splits_requests() -> None:
    info = {
        "data": [
            {
                "kind": "causal",
                "id": "m",
                "max_label_token_ids": 4,
                "max_scores_per_request": 10,
                "max_inputs_per_request": 256,
            }
        ]
    }
    adapter = LocalAdapter("http://127.0.0.1:1", max_inputs_per_request=64).with_info(info)
    assert (adapter.max_label_token_ids, adapter.max_scores_per_request) == (4, 10)
    labels = [Label(" a", (1,)), Label(" b", (2,)), Label(" c", (3,))]
    prompts = [Prompt(i, f"text {i}") for i in range(7)]
    specs = adapter.build_requests("features", prompts, labels)
    assert [len(s.indices) for s in specs] == [3, 3, 1]  # 10 // 3 inputs each
    with pytest.raises(UnsupportedCapability, match="5 label words"):
        adapter.build_requests("features", prompts, [*labels, Label(" d", (4,)), Label(" e", (5,))])

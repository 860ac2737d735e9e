"""Endpoint roles: scores and vectors with their own URL, model, key and prices, from Python and
from a config; chat and embeddings-only provider kinds; keys never cross to another host.

Reaches inside for ``price_for`` and the wiring from config to per-role keys and adapters.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dect_maas import (
    AuthenticationError,
    CacheConfig,
    Client,
    ConfigError,
    ExperimentConfig,
    OpenAIChatAdapter,
    Prices,
    Task,
)
from dect_maas.adapters._base import price_for
from dect_maas.experiments.wiring import api_keys, make_adapter

TASK = Task("{text} It was {mask}", {"negative": ["bad", "terrible"], "positive": "great"})
TEXTS = ["the movie was great fun", "a dull and boring film"]


def _config(**provider: Any) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "provider": provider,
            "task": {"template": "{text} It was {mask}", "label_words": {"a": "x", "b": "y"}},
            "data": {"train": {"path": "t.jsonl"}, "test": {"path": "t.jsonl"}},
        }
    )


def test_a_chat_config_builds_the_chat_adapter() -> None:
    cfg = _config(
        kind="openai_chat",
        base_url="https://api.openai.com/v1",
        model="gpt-4o-mini",
        system_prompt="Answer with one word.",
        combine_forms="max",
        top_k=10,
        embeddings_model="text-embedding-3-small",
        api_key_env="OPENAI_API_KEY",
        price_per_million_input_tokens=0.15,
        price_per_million_output_tokens=0.60,
        embeddings_price_per_million_input_tokens=0.02,
    )
    adapter = make_adapter(cfg.provider)
    assert isinstance(adapter, OpenAIChatAdapter)
    assert (adapter.system, adapter.combine, adapter.top_logprobs) == (
        "Answer with one word.",
        "max",
        10,
    )
    assert adapter.roles(TASK) == ("scores", "vectors")
    # a scoring request: 1000 input tokens and the one output token it generates
    assert price_for(adapter, "scores").cost(requests=1, input_tokens=1000) == pytest.approx(
        0.15 * 1000 / 1e6 + 0.60 / 1e6
    )
    assert price_for(adapter, "vectors").cost(requests=1, input_tokens=1000) == pytest.approx(
        0.02 * 1000 / 1e6
    )
    assert api_keys(cfg.provider) == "OPENAI_API_KEY"  # same host: one key for both roles


def test_config_kinds_and_keys_that_were_refused_before() -> None:
    emb = _config(
        kind="embeddings",
        embeddings_base_url="https://api.voyageai.com/v1",
        embeddings_model="voyage-3-lite",
        embeddings_api_key_env="VOYAGE_API_KEY",
        embeddings_batch_size=8,
    )
    adapter = make_adapter(emb.provider)
    assert adapter.roles(TASK) == ("vectors",)
    assert adapter.capabilities("vectors").max_inputs_per_request == 8
    assert adapter.endpoint("vectors") == ("https://api.voyageai.com/v1", "/embeddings")
    assert api_keys(emb.provider) == {"scores": None, "vectors": "VOYAGE_API_KEY"}
    vllm = _config(kind="openai", base_url="http://h:8000", model="m", tokenize_api="dect-maas")
    assert make_adapter(vllm.provider).tokenize_api == "dect-maas"
    split = _config(
        kind="openai_chat",
        base_url="https://api.together.xyz/v1",
        model="m",
        api_key_env="TOGETHER_API_KEY",
        embeddings_base_url="https://api.openai.com/v1",
        embeddings_model="text-embedding-3-small",
        embeddings_api_key_env="OPENAI_API_KEY",
    )
    assert api_keys(split.provider) == {"scores": "TOGETHER_API_KEY", "vectors": "OPENAI_API_KEY"}


CHAT = {"kind": "openai_chat", "base_url": "http://h", "model": "m"}


@pytest.mark.parametrize(
    ("provider", "words"),
    [
        ({**CHAT, "top_k": 50}, "between 1 and 20"),
        ({"kind": "embeddings", "base_url": "http://h"}, "needs embeddings_model"),
        ({"kind": "openai_chat", "base_url": "http://h"}, "needs model"),
        ({**CHAT, "kind": "openai", "system_prompt": "x"}, "openai_chat"),
        ({**CHAT, "embeddings_api_key_env": "sk-1"}, "NAME"),
    ],
)
def test_provider_mistakes_are_one_clear_error(provider: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        make_adapter(_config(**provider).provider)
    assert "sk-1" not in str(info.value)


# -- keys per role, against two real servers that each want their own key -----------------------

server_testing = pytest.importorskip("dect_maas_server.testing")
KEY_A, KEY_B = "sk-scores-AAAA-never-log", "sk-vectors-BBBB-never-log"


@pytest.fixture(scope="module")
def two_vendors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    chat = server_testing.make_tiny_chat_model(tmp_path_factory.mktemp("chat"))
    with (
        server_testing.run_server(chat, api_key=KEY_A) as scores_url,
        server_testing.run_server(chat, api_key=KEY_B) as vectors_url,
    ):
        yield scores_url, vectors_url.replace("127.0.0.1", "localhost") + "/v1"


@pytest.mark.slow
def test_each_role_gets_its_own_key_and_no_other(
    two_vendors: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scores_url, vectors_url = two_vendors
    monkeypatch.setenv("KEY_A", KEY_A)
    monkeypatch.setenv("KEY_B", KEY_B)
    adapter = OpenAIChatAdapter(
        scores_url,
        "tiny",
        exact_token_ids=True,
        tokenize_api="dect-maas",
        embeddings_base_url=vectors_url,
        embeddings_prices=Prices(per_million_input_tokens=1.0),
    )
    with Client(
        adapter,
        cache=CacheConfig(tmp_path / "c"),
        ledger=tmp_path / "l",
        api_key_env={"scores": "KEY_A", "vectors": "KEY_B"},
    ) as client:
        feats = client.features(TASK, TEXTS)
        summary = client.ledger.summary()
        assert "KEY_A" in repr(client)
        assert KEY_A not in repr(client)
    assert feats.scores is not None
    assert feats.hidden is not None
    assert feats.hidden.shape[0] == len(TEXTS)
    assert summary.cost_usd > 0  # only the vectors endpoint bills here
    # One key for both: the vectors host (another host) must not receive it, so it answers 401.
    with (
        Client(adapter, cache=None, ledger=tmp_path / "l2", api_key_env="KEY_A") as client,
        pytest.raises(AuthenticationError) as info,
    ):
        client.features(TASK, TEXTS)
    assert f"{vectors_url}/embeddings" in str(info.value)  # the full URL that was sent
    assert KEY_A not in str(info.value)

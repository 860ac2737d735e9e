"""The provider recipes under examples/providers/: each is a valid config whose adapter reaches
the URLs its comments promise; the chat recipe runs end to end from the CLI against the real
local server's chat route (a tiny model with a chat template).

Reaches inside for the config reader and the wiring, which turn a recipe into an adapter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from dect_maas.cli import main
from dect_maas.experiments.config_file import load_config
from dect_maas.experiments.wiring import api_keys, make_adapter

RECIPES = Path(__file__).resolve().parent.parent / "examples" / "providers"
EXPECTED = {
    # recipe: (kind, scores URL or None, vectors URL or None)
    "openai_chat": ("https://api.openai.com/v1/chat/completions", "https://api.openai.com/v1/embeddings"),
    "azure_openai": ("https://my-resource.openai.azure.com/openai/v1/chat/completions",
                     "https://my-resource.openai.azure.com/openai/v1/embeddings"),
    "together": ("https://api.together.xyz/v1/chat/completions", "https://api.openai.com/v1/embeddings"),
    "vllm": ("http://127.0.0.1:8000/v1/chat/completions", "http://127.0.0.1:8001/v1/embeddings"),
    "llamacpp": ("http://127.0.0.1:8080/v1/completions", "http://127.0.0.1:8081/v1/embeddings"),
    "llamacpp_chat": ("http://127.0.0.1:8080/v1/chat/completions",
                      "http://127.0.0.1:8081/v1/embeddings"),
    "ollama": ("http://127.0.0.1:11434/v1/chat/completions", "http://127.0.0.1:11434/v1/embeddings"),
    "tgi": ("http://127.0.0.1:8080/v1/chat/completions", "http://127.0.0.1:8090/v1/embeddings"),
    "tei": (None, "http://127.0.0.1:8090/embed"),
    "embeddings_only": (None, "https://api.voyageai.com/v1/embeddings"),
    "local_chat": ("http://127.0.0.1:8000/v1/chat/completions", "http://127.0.0.1:8000/v1/embeddings"),
}  # fmt: skip


def test_every_recipe_is_listed() -> None:
    assert {p.stem for p in RECIPES.glob("*.toml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_reaches_the_urls_it_names(name: str) -> None:
    cfg = load_config(RECIPES / f"{name}.toml")
    task = cfg.task.to_task()
    adapter = make_adapter(cfg.provider)
    urls = {role: "".join(adapter.endpoint(role)) for role in adapter.roles(task)}
    scores, vectors = EXPECTED[name]
    assert urls.get("scores") == scores
    assert urls.get("vectors") == vectors
    assert cfg.data.train.path is not None
    assert cfg.data.train.path.exists()
    keys = api_keys(cfg.provider)
    names = [keys] if isinstance(keys, str) else list((keys or {}).values())
    assert all(k is None or re.fullmatch(r"[A-Z_]+_API_KEY", k) for k in names)
    if name == "together":  # two vendors: each key to its own host only
        assert keys == {"scores": "TOGETHER_API_KEY", "vectors": "OPENAI_API_KEY"}


server_testing = pytest.importorskip("dect_maas_server.testing")


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = server_testing.make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))
    with server_testing.run_server(path) as url:
        yield url


@pytest.mark.slow
def test_the_chat_recipe_runs_from_the_cli(
    chat_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head, _, rest = (RECIPES / "local_chat.toml").read_text().partition("[provider]")
    head = re.sub(r"(?m)^shots = .*$", "shots = [1]", head)
    head = re.sub(r"(?m)^seeds = .*$", "seeds = [0]", head)
    head = head.replace('"../../runs"', f'"{tmp_path / "runs"}"')
    head += f'cache_dir = "{tmp_path / "cache"}"\nledger_dir = "{tmp_path / "ledger"}"\n'
    rest = rest.replace("http://127.0.0.1:8000", chat_server)
    rest = rest.replace('"../data/', f'"{RECIPES.parent / "data"}/')
    rest = rest.replace('movies_test.jsonl"', 'movies_test.jsonl"\nlimit = 12')
    config = tmp_path / "chat.toml"
    config.write_text(head + "[provider]" + rest)
    assert main(["run", str(config), "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    methods = {r["method"] for r in out["runs"]}
    assert {"dect", "zero_shot", "linear_probe"} <= methods
    assert out["usage"]["queries_paid"] > 0

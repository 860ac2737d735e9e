"""Faults on a real loopback server: 429 + Retry-After, 500/503, slow replies past the timeout,
dropped connections and truncated JSON. The results must equal a clean run's, every example must
be paid once, and the ledger must hold the attempts."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from faultserver import BAD_SHAPE, FAULTS, FaultServer

from dect_maas import (
    CacheConfig,
    Client,
    Features,
    Ledger,
    MalformedResponse,
    RetryPolicy,
    Task,
    TransportError,
)
from dect_maas.adapters import LocalAdapter

TASK = Task("{text} Overall, it was {mask}", {"neg": "bad", "pos": "great"})
TEXTS = [f"text number {i} of the fault run" for i in range(40)]
POLICY = RetryPolicy(
    max_attempts=15, initial_backoff_s=0.005, max_backoff_s=0.05, max_retry_after_s=0.05
)


def run(server: FaultServer, tmp_path: Path, name: str) -> tuple[Features, Client]:
    with server.run() as url:
        client = Client(
            LocalAdapter(url, max_inputs_per_request=4),
            cache=CacheConfig(tmp_path / f"{name}-cache"),
            ledger=tmp_path / f"{name}-ledger",
            retry=POLICY,
            timeout=httpx.Timeout(0.5),
            max_concurrency=4,
        )
        try:
            return client.features(TASK, TEXTS), client
        finally:
            client.close()


def test_faults_on_every_endpoint_give_the_clean_result(tmp_path: Path) -> None:
    clean, _ = run(FaultServer(rate=0.0), tmp_path, "clean")
    faulty_server = FaultServer(rate=0.35, seed=1, slow_s=1.0)
    faulty, _client = run(faulty_server, tmp_path, "faulty")
    assert faulty == clean
    assert sum(faulty_server.injected.values()) >= 5

    summary = Ledger(tmp_path / "faulty-ledger").summary()
    assert summary.queries_paid == len(TEXTS) + 1  # each example (and the content-free) once
    # ceil(41 / 4) answered, none failed for good; each attempt that timed out or was cut off
    # may have been answered (and billed): it is on record at its worst case, apart
    records = [r for r in Ledger(tmp_path / "faulty-ledger").records() if r.cache == "miss"]
    unknown = [r for r in records if r.status == "unknown"]
    assert [r.status for r in records if r not in unknown] == ["ok"] * 11
    assert summary.requests == 11 + len(unknown)
    assert summary.queries_unknown == sum(r.queries for r in unknown)
    assert summary.errors == len(unknown)


def test_every_fault_kind_is_survived_and_each_attempt_is_on_record(tmp_path: Path) -> None:
    server = FaultServer(rate=0.5, seed=7, slow_s=1.0, paths=("/v1/features",))
    feats, _ = run(server, tmp_path, "kinds")
    clean, _ = run(FaultServer(rate=0.0), tmp_path, "clean")
    assert feats == clean
    assert set(server.injected) == set(FAULTS)  # each kind happened at least once

    ledger = Ledger(tmp_path / "kinds-ledger")
    records = [r for r in ledger.records() if r.cache == "miss"]
    assert sum(r.queries for r in records if r.status == "ok") == len(TEXTS) + 1
    assert {r.status for r in records} <= {"ok", "unknown"}  # unknown: timed out or cut off
    # every HTTP attempt the server saw on /v1/features is one attempt in the ledger
    seen = server.served["/v1/features"] + sum(server.injected.values())
    assert sum(r.attempts for r in records) == seen
    assert max(r.attempts for r in records) >= 2
    assert np.isfinite(feats.scores).all()  # type: ignore[arg-type]


def test_a_server_that_never_answers_fails_with_bounded_attempts(tmp_path: Path) -> None:
    server = FaultServer(rate=1.0, faults=("drop",), paths=("/v1/features",))
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.001, max_backoff_s=0.002)
    with server.run() as url:
        client = Client(
            LocalAdapter(url, max_inputs_per_request=64),
            cache=CacheConfig(tmp_path / "c"),
            ledger=tmp_path / "l",
            retry=policy,
        )
        with client, pytest.raises(TransportError, match="example"):
            client.features(TASK, TEXTS[:3])
        summary = client.ledger.summary()
    assert server.injected["drop"] == 3
    # each dropped send may have been computed (and billed): all three at their worst case
    assert summary.errors == 3
    assert summary.attempts == 3
    assert summary.queries_paid == 0
    assert summary.queries_unknown == 3 * 4  # 3 texts and the content-free prompt, 3 times


def test_a_2xx_body_the_adapter_rejects_is_counted_never_refunded(tmp_path: Path) -> None:
    """The provider computed (and billed) a 200, whatever its shape: it counts at its worst
    case, is not retried (the same request would get the same body) and is not cached."""
    server = FaultServer(rate=1.0, faults=(BAD_SHAPE,), paths=("/v1/features",))
    with server.run() as url:
        client = Client(
            LocalAdapter(url, max_inputs_per_request=64),
            cache=CacheConfig(tmp_path / "c"),
            ledger=tmp_path / "l",
            retry=POLICY,
        )
        with client, pytest.raises(MalformedResponse, match="/v1/features"):
            client.features(TASK, TEXTS[:3])
        summary = client.ledger.summary()
        records = client.ledger.records()
    assert server.injected[BAD_SHAPE] == 1  # not retried
    assert [r.status for r in records] == ["unknown"]
    assert "MalformedResponse" in (records[0].error or "")
    assert summary.queries_paid == 0
    assert summary.queries_unknown == 4  # 3 texts and the content-free prompt
    assert summary.input_tokens > 0  # at the reserved worst case

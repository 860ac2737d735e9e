"""Shared fixtures: tiny models on disk, their reference copies in-process, and real servers.

Each server is a real ``python -m dect_maas_server`` process on loopback, started once per
session (starting one costs a few seconds, mostly imports).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dect_maas_server.testing import make_tiny_model, run_server
from server_reference import API_KEY, Reference


@pytest.fixture(scope="session")
def tiny_masked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("masked", tmp_path_factory.mktemp("tiny-masked"))


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("causal", tmp_path_factory.mktemp("tiny-causal"))


@pytest.fixture(scope="session")
def ref_masked(tiny_masked: Path) -> Reference:
    return Reference(tiny_masked, "masked")


@pytest.fixture(scope="session")
def ref_causal(tiny_causal: Path) -> Reference:
    return Reference(tiny_causal, "causal")


@pytest.fixture(scope="session")
def masked_server(tiny_masked: Path) -> Iterator[tuple[str, list[str]]]:
    """Masked LM behind a key, with small limits so that each can be hit cheaply."""
    log: list[str] = []
    with run_server(
        tiny_masked,
        api_key=API_KEY,
        log=log,
        max_input_tokens=24,
        max_inputs_per_request=16,
        max_body_bytes=8192,
        max_wait_ms=20,
    ) as url:
        yield url, log


@pytest.fixture(scope="session")
def causal_server(tiny_causal: Path) -> Iterator[tuple[str, list[str]]]:
    log: list[str] = []
    with run_server(
        tiny_causal, log=log, max_input_tokens=24, max_logprobs=5, max_wait_ms=100
    ) as url:
        yield url, log


@pytest.fixture
def masked(masked_server: tuple[str, list[str]]) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=masked_server[0], headers=headers, timeout=30) as client:
        yield client


@pytest.fixture
def causal(causal_server: tuple[str, list[str]]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=causal_server[0], timeout=30) as client:
        yield client

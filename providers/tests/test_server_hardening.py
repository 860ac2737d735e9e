"""Hostile clients against the real server process: label-id caps, slow and partial requests,
oversized heads, and a flood of idle connections while legitimate requests keep being served.

One server with small limits serves the whole module, so each limit is reached cheaply:
8 label ids per input, 32 scores per request, 1 s to send a request head, 2 s for a body,
a 4 KiB head, 64 connections.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from dect_maas_server.testing import run_server

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
MAX_CONNECTIONS = 64
FEATURES_BODY = {"inputs": ["It was <mask>."], "label_token_ids": [5, 9]}


@pytest.fixture(scope="module")
def hardened(tiny_masked: Path) -> Iterator[str]:
    with run_server(
        tiny_masked,
        max_input_tokens=24,
        max_label_token_ids=8,
        max_scores_per_request=32,
        header_timeout=HEADER_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
        max_header_bytes=4096,
        max_connections=MAX_CONNECTIONS,
        max_wait_ms=1,
    ) as url:
        yield url


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def _error(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    return str(resp.json()["error"]["message"])


def _closed_after(sock: socket.socket, *, limit: float = 10.0) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock``, and what it sent before closing."""
    start = time.monotonic()
    sock.settimeout(limit)
    got = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        got += chunk
    return time.monotonic() - start, got


# -- label token ids ---------------------------------------------------------------------------


def test_label_id_caps_are_advertised_and_enforced(hardened: str) -> None:
    with httpx.Client(base_url=hardened, timeout=30) as client:
        info = client.get("/v1/models").json()["data"][0]
        assert info["max_label_token_ids"] == 8
        assert info["max_scores_per_request"] == 32
        body = {"inputs": ["It was <mask>."], "label_token_ids": list(range(9))}
        msg = _error(client.post("/v1/features", json=body), 413)
        assert msg == "9 label_token_ids per input; the limit is 8"
        body = {"inputs": ["It was <mask>."] * 5, "label_token_ids": list(range(8))}
        msg = _error(client.post("/v1/features", json=body), 413)
        assert msg.startswith("5 inputs x 8 label_token_ids = 40 scores in one request")
        body = {"inputs": ["It was <mask>."] * 4, "label_token_ids": list(range(8))}
        resp = client.post("/v1/features", json=body)
        assert resp.status_code == 200
        assert [len(d["token_logits"]) for d in resp.json()["data"]] == [8, 8, 8, 8]


def test_fill_mask_targets_are_capped_like_label_ids(hardened: str) -> None:
    words = ["good", "bad", "great", "awful", "fine", "poor", "nice", "dull", "fun"]
    with httpx.Client(base_url=hardened, timeout=30) as client:
        body = {"inputs": "It was <mask>.", "parameters": {"targets": words}}
        assert _error(client.post("/fill-mask", json=body), 413) == (
            "9 targets per input; the limit is 8"
        )
        body = {"inputs": "It was <mask>.", "parameters": {"targets": words[:8]}}
        assert client.post("/fill-mask", json=body).status_code == 200


def test_completions_logprob_token_ids_are_capped(causal: httpx.Client) -> None:
    # The default server: 1024 ids per input.
    body = {"prompt": "It was", "max_tokens": 1, "logprobs": 1}
    msg = _error(
        causal.post("/v1/completions", json={**body, "logprob_token_ids": [5] * 1025}), 413
    )
    assert msg == "1025 logprob_token_ids per input; the limit is 1024"
    resp = causal.post("/v1/completions", json={**body, "logprob_token_ids": [5, 9]})
    assert resp.status_code == 200


def test_a_huge_label_id_list_is_refused_without_stalling_others(hardened: str) -> None:
    # The attack: ~1.8 MB of label ids. Refused after parsing, before any forward pass.
    ids = [100 + i % 900 for i in range(360_000)]  # in the vocabulary: only the count is wrong
    huge = {"inputs": ["It was <mask>."] * 16, "label_token_ids": ids}
    payload = json.dumps(huge).encode()
    assert len(payload) > 1_500_000
    latencies: list[float] = []
    huge_answers: list[tuple[int, int, float]] = []

    def legit() -> None:
        with httpx.Client(base_url=hardened, timeout=30) as client:
            for _ in range(10):
                t0 = time.perf_counter()
                assert client.post("/v1/features", json=FEATURES_BODY).status_code == 200
                latencies.append(time.perf_counter() - t0)

    thread = threading.Thread(target=legit)
    thread.start()
    try:
        with httpx.Client(base_url=hardened, timeout=30) as client:
            while thread.is_alive() or not huge_answers:
                t0 = time.perf_counter()
                resp = client.post(
                    "/v1/features", content=payload, headers={"Content-Type": "application/json"}
                )
                huge_answers.append((resp.status_code, len(resp.content), time.perf_counter() - t0))
    finally:
        thread.join()
    assert len(latencies) == 10
    assert {status for status, _, _ in huge_answers} == {413}
    assert max(size for _, size, _ in huge_answers) < 200  # an error, not 400 MB of scores
    assert max(took for _, _, took in huge_answers) < 5.0
    assert max(latencies) < 2.0  # was 14 s before the cap (one 1-input request behind it)


# -- slow and partial requests ---------------------------------------------------------------


def test_a_partial_request_head_is_closed_with_408_after_the_header_timeout(hardened: str) -> None:
    with socket.create_connection(_address(hardened)) as sock:
        sock.sendall(b"POST /v1/features HTTP/1.1\r\nHost: x\r\n")
        took, got = _closed_after(sock)
    assert HEADER_TIMEOUT * 0.9 <= took <= HEADER_TIMEOUT + 2.0
    assert got.startswith(b"HTTP/1.1 408 ")
    assert b"request head not received within 1 s" in got


def test_an_idle_connection_is_closed_silently(hardened: str) -> None:
    with socket.create_connection(_address(hardened)) as sock:
        took, got = _closed_after(sock)
    assert HEADER_TIMEOUT * 0.9 <= took <= HEADER_TIMEOUT + 2.0
    assert got == b""


def test_trickling_bytes_does_not_extend_the_header_deadline(hardened: str) -> None:
    start = time.monotonic()
    closed_at = None
    with socket.create_connection(_address(hardened)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        for _ in range(40):  # one header byte every 0.1 s: 4 s if the server waited
            time.sleep(0.1)
            try:
                sock.sendall(b"X")
            except OSError:
                closed_at = time.monotonic() - start
                break
        else:
            _closed_after(sock, limit=0.5)
            closed_at = time.monotonic() - start
    assert closed_at is not None
    assert closed_at <= HEADER_TIMEOUT + 2.0


def test_a_slow_body_is_cut_after_the_body_timeout(hardened: str) -> None:
    with socket.create_connection(_address(hardened)) as sock:
        sock.sendall(
            b"POST /v1/features HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"inputs"'
        )
        took, got = _closed_after(sock)
    assert BODY_TIMEOUT * 0.9 <= took <= BODY_TIMEOUT + 2.0
    assert not got.startswith(b"HTTP/1.1 200")


def test_an_oversized_request_head_is_431(hardened: str) -> None:
    with socket.create_connection(_address(hardened)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(10):
                sock.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
        except OSError:
            pass  # closed while we were still sending: also a refusal
        took, got = _closed_after(sock)
    assert took < HEADER_TIMEOUT  # refused for its size, not left to time out
    assert got.startswith(b"HTTP/1.1 431 ") or got == b""


def test_keep_alive_connections_still_work(hardened: str) -> None:
    # The header deadline restarts after each response: a pooled connection serves many
    # requests, each well within the deadline, and idles past it only to be reconnected.
    with httpx.Client(base_url=hardened, timeout=30) as client:
        for _ in range(20):
            assert client.post("/v1/features", json=FEATURES_BODY).status_code == 200
        time.sleep(HEADER_TIMEOUT + 0.5)
        assert client.post("/v1/features", json=FEATURES_BODY).status_code == 200


# -- a flood of idle connections ------------------------------------------------------------


def test_legit_requests_are_served_during_a_flood_of_partial_heads(hardened: str) -> None:
    """1,000 connections that send half a request line and wait, against a 64-connection cap:
    the longest-waiting ones are closed to make room, and each legitimate request (a new
    connection, as a client after a restart makes) is answered."""
    address = _address(hardened)
    flood: list[socket.socket] = []
    latencies: list[float] = []
    try:
        with httpx.Client(base_url=hardened, timeout=30) as client:
            warm = []
            for _ in range(5):
                t0 = time.perf_counter()
                assert client.post("/v1/features", json=FEATURES_BODY).status_code == 200
                warm.append(time.perf_counter() - t0)
        for i in range(1000):
            s = socket.create_connection(address)
            s.sendall(b"POST /v1/features HTTP/1.1\r\nHost: fl")
            flood.append(s)
            if i % 50 == 49:  # a legitimate request on a fresh connection every 50
                with httpx.Client(base_url=hardened, timeout=30) as client:
                    t0 = time.perf_counter()
                    resp = client.post("/v1/features", json=FEATURES_BODY)
                    latencies.append(time.perf_counter() - t0)
                    assert resp.status_code == 200, resp.text
        with httpx.Client(base_url=hardened, timeout=30) as client:
            metrics = client.get("/metrics").json()
    finally:
        for s in flood:
            s.close()
    assert len(latencies) == 20
    assert metrics["connections_open"] <= MAX_CONNECTIONS + 2
    assert metrics["connections_shed_total"] >= 1000 - MAX_CONNECTIONS
    # Served as fast as without the flood, give or take a busy shared machine.
    assert statistics.median(latencies) < max(0.5, 10 * statistics.median(warm))
    assert max(latencies) < 2.0


def test_the_connection_cap_stays_below_the_file_descriptor_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import resource

    from dect_maas_server.cli import _connection_cap

    def refuse(*_: object) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 256))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert _connection_cap(1024) == 192  # 64 descriptors kept for files, the socket and logs
    assert "using 192" in caplog.text
    assert _connection_cap(100) == 100
    raised: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 65536))
    monkeypatch.setattr(resource, "setrlimit", lambda _, limits: raised.append(limits))
    assert _connection_cap(4096) == 4096  # the soft limit was raised to the hard one first
    assert raised == [(65536, 65536)]

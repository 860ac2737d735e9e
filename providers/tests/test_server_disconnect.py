"""Clients that go away before their answer: their queued rows are never computed, the rows of
everyone else are, with the same results as when sent alone.

One real server process on loopback with the test-only hold file (``TEST_HOLD_ENV``): while the
file exists every forward pass waits before it starts, so a queue forms behind a held pass
deterministically. The clients that leave use raw sockets and close them (what a killed process
does); those that stay use httpx.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from dect_maas_server.batcher import TEST_HOLD_ENV
from dect_maas_server.testing import run_server

ATOL = 1e-4
LABELS = [5, 9, 12]
TEXTS = [
    "The movie was great. It was",
    "A boring and dull film, I hated it",
    "Fun",
    "It was fun, the music was beautiful",
    "The plot was bad",
    "good",
    "I loved the actors",
]


@dataclass
class Server:
    url: str
    hold: Path
    log: list[str]

    @property
    def held(self) -> Path:
        return self.hold.with_name(self.hold.name + ".held")


@pytest.fixture(scope="module")
def server(tiny_causal: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    hold = tmp_path_factory.mktemp("hold") / "hold"
    log: list[str] = []
    env = {TEST_HOLD_ENV: str(hold)}
    with run_server(tiny_causal, env=env, log=log, max_input_tokens=24, max_wait_ms=5) as url:
        yield Server(url, hold, log)


@pytest.fixture(scope="module")
def soft_prompt(server: Server) -> str:
    info = httpx.get(f"{server.url}/v1/models").json()["data"][0]["soft_prompt"]
    rows = np.random.default_rng(7).normal(0, 0.05, (3, info["hidden_size"]))
    return base64.b64encode(np.ascontiguousarray(rows, dtype="<f4").tobytes()).decode("ascii")


def _request(kind: str, texts: list[str], soft: str) -> tuple[str, dict[str, Any]]:
    """The path and body of a request of ``len(texts)`` rows on one of the computing routes."""
    if kind == "features":
        return "/v1/features", {"inputs": texts, "label_token_ids": LABELS}
    if kind == "soft_prompt":
        return "/v1/features", {"inputs": texts, "label_token_ids": LABELS, "prompt_embeds": soft}
    if kind == "completions":
        return "/v1/completions", {"prompt": texts, "max_tokens": 1, "logprobs": 3}
    assert kind == "embeddings"
    return "/v1/embeddings", {"input": texts}


def _values(kind: str, resp: httpx.Response) -> list[np.ndarray]:
    assert resp.status_code == 200, resp.text
    if kind == "completions":
        choices = resp.json()["choices"]
        return [np.asarray(sorted(c["logprobs"]["top_logprobs"][0].values())) for c in choices]
    data = resp.json()["data"]
    if kind == "embeddings":
        return [np.asarray(d["embedding"]) for d in data]
    return [np.asarray(d["token_logprobs"] + d["hidden"]) for d in data]


def _metrics(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/metrics").json())


def _wait(what: str, check: Callable[[], bool], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _send_and_leave_open(url: str, path: str, body: dict[str, Any]) -> socket.socket:
    """A whole request on a fresh connection, not read: the caller closes it to leave."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {parts.hostname}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


@contextmanager
def _held(server: Server) -> Iterator[None]:
    """Forward passes wait while inside; the ``.held`` marker says one is waiting."""
    server.held.unlink(missing_ok=True)
    server.hold.touch()
    try:
        yield
    finally:
        server.hold.unlink(missing_ok=True)


@pytest.mark.parametrize("kind", ["features", "soft_prompt", "embeddings", "completions"])
def test_rows_of_a_client_that_went_away_are_never_computed(
    server: Server, soft_prompt: str, kind: str
) -> None:
    url = server.url
    a, b, c, d = TEXTS[:1], TEXTS[1:4], TEXTS[4:6], TEXTS[6:7]
    alone = {}
    for name, texts in (("c", c), ("d", d)):
        path, body = _request(kind, texts, soft_prompt)
        alone[name] = _values(kind, httpx.post(url + path, json=body, timeout=30))
    before = _metrics(url)
    log_start = len(server.log)
    with ThreadPoolExecutor(2) as pool, _held(server):
        # A's one row is taken into a forward pass, which waits; B, C and D queue behind it.
        sock_a = _send_and_leave_open(url, *_request(kind, a, soft_prompt))
        _wait("the held pass", server.held.exists)
        sock_b = _send_and_leave_open(url, *_request(kind, b, soft_prompt))
        _wait("B queued", lambda: _metrics(url)["queue_depth"] == 3)
        stays: dict[str, Future[httpx.Response]] = {}
        for name, texts in (("c", c), ("d", d)):
            path, body = _request(kind, texts, soft_prompt)
            stays[name] = pool.submit(httpx.post, url + path, json=body, timeout=60)
        _wait("C and D queued", lambda: _metrics(url)["queue_depth"] == 6)
        # A and B leave: B's rows leave the queue; A's row is in the pass and is computed.
        sock_a.close()
        sock_b.close()
        _wait(
            "A and B abandoned",
            lambda: (
                _metrics(url)["requests_abandoned_total"] == 2 + before["requests_abandoned_total"]
            ),
        )
        mid = _metrics(url)
        assert mid["queue_depth"] == 3  # C and D only
        assert mid["rows_dropped_total"] - before["rows_dropped_total"] == 3
    for name in ("c", "d"):
        got = _values(kind, stays[name].result(timeout=60))
        for g, w in zip(got, alone[name], strict=True):
            np.testing.assert_allclose(g, w, atol=ATOL)
    after = _metrics(url)
    assert after["queries_total"] - before["queries_total"] == len(a) + len(c) + len(d)
    assert after["rows_dropped_total"] - before["rows_dropped_total"] == len(b)
    assert after["requests_abandoned_total"] - before["requests_abandoned_total"] == 2
    assert after["queue_depth"] == 0
    lines = [line for line in server.log[log_start:] if "client went away" in line]
    path = _request(kind, a, soft_prompt)[0]
    assert len(lines) == 2, lines
    assert sum(f"POST {path}: 3 queued rows dropped" in line for line in lines) == 1, lines
    assert sum(f"POST {path}: 0 queued rows dropped" in line for line in lines) == 1, lines
    assert all(" INFO " in line for line in lines)
    noise = [line for line in server.log[log_start:] if "ERROR" in line or "Traceback" in line]
    assert not noise  # a cancelled handler is not a server failure


def test_a_client_that_stays_is_never_dropped(server: Server, soft_prompt: str) -> None:
    """A client kept waiting behind a held pass is answered; a keep-alive connection serves a
    second request and is then closed: neither is counted as gone."""
    url = server.url
    path, body = _request("features", TEXTS[:3], soft_prompt)
    want = _values("features", httpx.post(url + path, json=body, timeout=30))
    before = _metrics(url)
    with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(1) as pool:
        with _held(server):
            waiting = pool.submit(client.post, path, json=body)
            _wait("the held pass", server.held.exists)
            time.sleep(1.0)  # well past any watcher's first look at the connection
            assert not waiting.done()
        first = _values("features", waiting.result(timeout=60))
        second = _values("features", client.post(path, json=body))  # same connection
    for got in (first, second):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=ATOL)
    time.sleep(0.3)  # the keep-alive connection is closed now; give the server a look at it
    after = _metrics(url)
    assert after["requests_abandoned_total"] == before["requests_abandoned_total"]
    assert after["rows_dropped_total"] == before["rows_dropped_total"]
    assert after["queries_total"] - before["queries_total"] == 2 * len(TEXTS[:3])


def test_rows_taken_for_a_later_pass_of_the_same_batch_are_dropped_too(
    tiny_causal: Path, tmp_path: Path
) -> None:
    """A batch of very different lengths runs as several passes; when the first is running,
    the rows of the later ones are not started yet, so a cancelled request loses them too."""
    from dect_maas_server.batcher import Batcher, Metrics, split_by_length
    from dect_maas_server.engine import load_engine

    engine = load_engine(str(tiny_causal))
    short, long = engine.encode_many(["good", " ".join(TEXTS)])
    assert len(split_by_length([len(short.ids), len(long.ids)], 4096)) == 2
    hold = tmp_path / "hold"
    hold.touch()
    metrics = Metrics()
    batcher = Batcher(
        engine,
        max_batch_size=8,
        max_wait_ms=200,  # both requests are in the queue long before the batch is taken
        max_queue=64,
        max_batch_tokens=4096,
        metrics=metrics,
        test_hold_file=str(hold),
    )
    batcher.start()

    async def main() -> None:
        stays = asyncio.create_task(batcher.submit_labels([short], LABELS))
        leaves = asyncio.create_task(batcher.submit_labels([long, long], LABELS))
        while not hold.with_name("hold.held").exists():  # the short pass is held
            await asyncio.sleep(0.01)
        assert batcher.depth == 0  # the long rows were taken with it, for the next pass
        leaves.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaves
        assert metrics.rows_dropped == 2
        hold.unlink()
        result = await stays
        assert result.logits.shape == (1, len(LABELS))

    try:
        asyncio.run(main())
    finally:
        hold.unlink(missing_ok=True)
        batcher.stop()
    assert metrics.queries == 1  # the long pass never ran
    assert metrics.batches == 1

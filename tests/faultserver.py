"""A deterministic stand-in for our local server, and a loopback HTTP server that injects faults.

``FakeModel`` answers ``/v1/models``, ``/v1/tokenize`` and ``/v1/features`` in the real server's
shapes with values that depend only on the input text, so a run's results are known exactly.
``FaultServer`` serves it from a real ``ThreadingHTTPServer`` (real sockets, real httpx) and, at a
configurable rate, answers instead with a fault: 429 with Retry-After, 500, 503, a reply slower
than the client's timeout, a dropped connection, or truncated JSON.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

import httpx
import numpy as np

from dect_maas import CacheConfig, ResponseCache

FAULTS = ("429", "500", "503", "slow", "drop", "truncate")
# Not in FAULTS (no retry survives it): a 200 whose JSON lacks the fields the adapter reads.
BAD_SHAPE = "badshape"
DIM = 8


def _unit(*parts: object) -> float:
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


class FakeModel:
    """A causal 'model' whose every number is a hash of its input."""

    fingerprint = "sha256:fake-1"

    def __init__(self, dim: int = DIM) -> None:
        self.dim = dim

    def token_ids(self, text: str) -> list[int]:
        # one token per '-'-separated piece, so "very-good" is a two-token word
        return [int(_unit("tok", piece) * 50000) + 10 for piece in text.split("-")]

    def logit(self, text: str, token: int) -> float:
        return round(8.0 * _unit("logit", text, token) - 4.0, 4)

    def hidden(self, text: str) -> list[float]:
        if self.dim != DIM:  # big vectors (benchmarks): cheap, still a function of the text
            rng = np.random.default_rng(int(_unit("h", text) * 2**32))
            return [float(x) for x in rng.standard_normal(self.dim).astype(np.float32)]
        return [round(2.0 * _unit("h", text, i) - 1.0, 4) for i in range(DIM)]

    def answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/v1/models":
            return 200, {
                "object": "list",
                "data": [
                    {
                        "id": "fake",
                        "kind": "causal",
                        "fingerprint": self.fingerprint,
                        "mask_token": None,
                        "max_inputs_per_request": 64,
                    }
                ],
            }
        if method == "POST" and path == "/v1/tokenize":
            if "texts" in body:  # a count (estimate): as many tokens as /v1/features bills
                data = [{"ids": [7] * (len(t.split()) + 1)} for t in body["texts"]]
                return 200, {"data": data, "fingerprint": self.fingerprint}
            return 200, {"ids": self.token_ids(body["text"]), "fingerprint": self.fingerprint}
        if method == "POST" and path == "/v1/features":
            ids = body["label_token_ids"]
            data = []
            for text in body["inputs"]:
                logits = [self.logit(text, t) for t in ids]
                hidden = np.asarray(self.hidden(text), dtype="<f4")
                data.append(
                    {
                        "token_logits": logits,
                        "token_logprobs": [v - 10.0 for v in logits],
                        "hidden": base64.b64encode(hidden.tobytes()).decode()
                        if body.get("encoding_format") == "base64"
                        else hidden.tolist(),
                        "n_tokens": len(text.split()) + 1,
                        "truncated": False,
                    }
                )
            usage = sum(d["n_tokens"] for d in data)
            return 200, {
                "model": "fake",
                "fingerprint": self.fingerprint,
                "data": data,
                "usage": {"prompt_tokens": usage},
            }
        return 404, {"error": {"type": "not_found", "message": f"no route {method} {path}"}}


class MockProvider:
    """FakeModel behind httpx.MockTransport, recording every request it sees."""

    def __init__(self, model: FakeModel | None = None) -> None:
        self.model = model or FakeModel()
        self.requests: list[tuple[str, str, Any, httpx.Headers]] = []
        self.override: Any = None  # callable(request) -> Response | None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body, request.headers))
        if self.override is not None:
            answer = self.override(request)
            if answer is not None:
                return answer  # type: ignore[no-any-return]
        status, payload = self.model.answer(request.method, request.url.path, body)
        return httpx.Response(status, json=payload)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def sent(self, path: str = "/v1/features") -> list[Any]:
        return [b for m, p, b, _ in self.requests if p == path]


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that timed out or gave up closes its socket mid-reply: expected here
        pass


@contextmanager
def serve(server: ThreadingHTTPServer) -> Iterator[str]:
    """Serve ``server`` (bound to a loopback port) in a thread; yield its base URL."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class FaultServer:
    """FakeModel on a real loopback socket; ``rate`` of the requests get one of ``faults``."""

    def __init__(
        self,
        rate: float = 0.3,
        faults: tuple[str, ...] = FAULTS,
        seed: int = 0,
        slow_s: float = 1.0,
        paths: tuple[str, ...] = ("/v1/features", "/v1/tokenize", "/v1/models"),
        api_key: str | None = None,
        echo_credentials: bool = False,
        delay_s: float = 0.0,
        events: TextIO | None = None,
    ) -> None:
        self.delay_s = delay_s  # every /v1/features answer takes this long (a model at work)
        self.events = events  # "received PATH" / "answered PATH" lines (a subprocess's stdout)
        self.model = FakeModel()
        self.api_key = api_key  # when set, anything but "Bearer <api_key>" gets 401
        self.echo_credentials = echo_credentials  # a careless provider quoting the header back
        self.rate, self.faults, self.slow_s, self.paths = rate, faults, slow_s, paths
        self._rng = random.Random(seed)
        self._next_fault = itertools.cycle(faults)  # round robin: every kind occurs
        self._lock = threading.Lock()
        self.injected: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.computed_inputs: Counter[str] = Counter()

    def _event(self, what: str) -> None:
        if self.events is not None:
            with self._lock:
                print(what, file=self.events, flush=True)

    def _pick(self, path: str) -> str | None:
        with self._lock:
            if path in self.paths and self._rng.random() < self.rate:
                fault = next(self._next_fault)
                self.injected[fault] += 1
                return fault
            self.served[path] += 1
            return None

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body leave at once (no 40 ms stalls)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                auth = self.headers.get("Authorization", "")
                if server.api_key is not None and auth != f"Bearer {server.api_key}":
                    err = {"error": {"type": "auth", "message": f"invalid key in {auth!r}"}}
                    self._send(401, json.dumps(err).encode(), {})
                    return
                server._event(f"received {self.path}")
                fault = server._pick(self.path)
                if fault == "429":
                    err = {"error": {"type": "rate_limit", "message": "slow down"}}
                    self._send(429, json.dumps(err).encode(), {"retry-after-ms": "20"})
                    return
                if fault in ("500", "503"):
                    said = f"try later ({auth})" if server.echo_credentials else "try later"
                    err = {"error": {"type": "server_error", "message": said}}
                    self._send(int(fault), json.dumps(err).encode(), {})
                    return
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                status, answer = server.model.answer(method, self.path, body)
                if status == 200 and self.path == "/v1/features":
                    with server._lock:
                        server.computed_inputs.update(body["inputs"])
                payload = json.dumps(answer).encode()
                if fault == "slow":
                    time.sleep(server.slow_s)
                if fault == "truncate":
                    payload = payload[: len(payload) // 2]
                if fault == BAD_SHAPE:
                    payload = json.dumps({"model": "fake", "results": "not a list"}).encode()
                if server.delay_s and self.path == "/v1/features":
                    time.sleep(server.delay_s)
                self._send(status, payload, {})
                server._event(f"answered {self.path}")

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

        return Handler

    @contextmanager
    def run(self) -> Iterator[str]:
        httpd = _QuietServer(("127.0.0.1", 0), self.handler())
        httpd.daemon_threads = True
        with serve(httpd) as url:
            yield url


class SlowCache(ResponseCache):
    """A real cache on a slow disk: every write first waits ``delay_s`` (an fsync at a WAL
    checkpoint, a network file system); ``writes`` counts the entries of each write."""

    def __init__(self, config: CacheConfig, delay_s: float) -> None:
        super().__init__(config)
        self.delay_s = delay_s
        self.writes: list[int] = []

    def set_many(self, items: Mapping[str, Mapping[str, Any]]) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        self.writes.append(len(items))
        super().set_many(items)


def main(argv: list[str] | None = None) -> int:
    """A FakeModel server in its own process, to be killed and restarted by a test (a server
    restart as the client sees it: refused connections, connections cut mid-request)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--delay-s", type=float, default=0.0)
    # without --port: seconds every /v1/features answer waits first (a model's forward pass)
    ap.add_argument("service_s", nargs="?", type=float, default=0.0)
    args = ap.parse_args(argv)
    if args.port is None:  # a clean server on a free port: prints its URL, stops at EOF
        clean = (
            FaultServer(rate=1.0, faults=("slow",), slow_s=args.service_s, paths=("/v1/features",))
            if args.service_s
            else FaultServer(rate=0.0)
        )
        with clean.run() as base_url:
            print(base_url, flush=True)
            sys.stdin.read()
        return 0
    server = FaultServer(rate=0.0, delay_s=args.delay_s, events=sys.stdout)
    httpd = _QuietServer(("127.0.0.1", args.port), server.handler())
    httpd.daemon_threads = True
    print("listening", flush=True)
    httpd.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

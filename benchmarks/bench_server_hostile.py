"""Legitimate requests while hostile clients hit the server, with and without its defences.

``flood``: a flood of idle partial-header connections, with and without the connection guard
(``dect_maas_server/protocol.py``). ``huge_label_ids``: one ~1.8 MB request listing 360,000 label
ids for 16 inputs, with the label-id caps (default flags) and without them (caps set past it).

The server runs a tiny random masked LM under a file-descriptor limit of ``--fd-limit`` (the
issue's machine had 20,000; a small limit shows the same failure with fewer sockets). The flood
opens ``--flood`` connections that each send half a request line and wait; then ``--requests``
legitimate ``/v1/features`` requests are sent one by one, each on a fresh connection, with a
``--timeout`` second timeout. For the huge request, one client sends 1-input requests one after
another while it is answered. Prints one JSON object: per mode, the legitimate requests' success
count and latency (median, max), the server's connection counters, and the huge request's
status, response size and time.

    python benchmarks/bench_server_hostile.py [--flood 3000] [--fd-limit 1024] [--requests 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from dect_maas_server.testing import make_tiny_model

BODY = {"inputs": ["It was <mask>."], "label_token_ids": [5, 9]}

# Runs the server under a file-descriptor limit; "unguarded" swaps the guard for uvicorn's own
# protocol class (what the server used before), everything else equal.
LAUNCHER = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
if sys.argv[2] == "unguarded":
    import dect_maas_server.protocol as protocol
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    protocol.guarded_protocol = lambda limits, metrics, base=None: AutoHTTPProtocol
from dect_maas_server.cli import main
sys.exit(main(sys.argv[3:]))
"""


@contextmanager
def server(model: Path, mode: str, fd_limit: int, *flags: str) -> Iterator[str]:
    cmd = [
        sys.executable,
        "-c",
        LAUNCHER,
        str(fd_limit),
        mode,
        "--model",
        str(model),
        "--port",
        "0",
        "--threads",
        "1",
        "--max-wait-ms",
        "1",
        *flags,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
    )
    assert proc.stderr is not None
    url = None
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"listening on (http://[0-9.]+:\d+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(lines[-20:]))
    drain = threading.Thread(target=lambda: [None for _ in proc.stderr or ()], daemon=True)
    drain.start()
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def legit(url: str, n: int, timeout: float) -> dict[str, Any]:
    ok, latencies, errors = 0, [], []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            with httpx.Client(base_url=url, timeout=timeout) as client:
                resp = client.post("/v1/features", json=BODY)
            if resp.status_code == 200:
                ok += 1
            else:
                errors.append(f"HTTP {resp.status_code}")
        except httpx.HTTPError as exc:
            errors.append(type(exc).__name__)
        latencies.append(time.perf_counter() - t0)
    return {
        "ok": ok,
        "of": n,
        "median_s": round(statistics.median(latencies), 4),
        "max_s": round(max(latencies), 4),
        "errors": sorted(set(errors)),
    }


def run_mode(model: Path, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    with server(model, mode, args.fd_limit) as url:
        host, port = url.removeprefix("http://").split(":")
        before = legit(url, args.requests, args.timeout)
        flood: list[socket.socket] = []
        refused = 0
        t0 = time.perf_counter()
        try:
            for _ in range(args.flood):
                try:
                    s = socket.create_connection((host, int(port)), timeout=2)
                    s.sendall(b"POST /v1/features HTTP/1.1\r\nHost: fl")
                    flood.append(s)
                except OSError:
                    refused += 1
            flood_s = time.perf_counter() - t0
            during = legit(url, args.requests, args.timeout)
            try:
                metrics = httpx.get(f"{url}/metrics", timeout=args.timeout).json()
                counters = {
                    k: metrics.get(k)
                    for k in ("connections_open", "connections_shed_total", "header_timeouts_total")
                }
            except httpx.HTTPError as exc:
                counters = {"error": type(exc).__name__}
        finally:
            for s in flood:
                s.close()
    return {
        "before_flood": before,
        "during_flood": during,
        "flood_connect_s": round(flood_s, 2),
        "flood_connect_failures": refused,
        "server_counters": counters,
    }


def huge_label_ids(model: Path, capped: bool, args: argparse.Namespace) -> dict[str, Any]:
    ids = [100 + i % 900 for i in range(360_000)]  # all in the tiny model's vocabulary
    payload = json.dumps({"inputs": ["It was <mask>."] * 16, "label_token_ids": ids}).encode()
    flags = (
        ()
        if capped
        else ("--max-label-token-ids", "1000000", "--max-scores-per-request", "10000000")
    )
    with server(model, "guarded", args.fd_limit, *flags) as url:
        alone = legit(url, args.requests, 60.0)
        answer: dict[str, Any] = {}

        def send() -> None:
            t0 = time.perf_counter()
            resp = httpx.post(
                f"{url}/v1/features",
                content=payload,
                headers={"Content-Type": "application/json"},
                timeout=600,
            )
            answer.update(
                status=resp.status_code,
                response_bytes=len(resp.content),
                seconds=round(time.perf_counter() - t0, 3),
            )

        thread = threading.Thread(target=send)
        thread.start()
        time.sleep(0.05)
        during: list[float] = []
        with httpx.Client(base_url=url, timeout=600) as client:
            while thread.is_alive() or len(during) < 3:
                t0 = time.perf_counter()
                client.post("/v1/features", json=BODY)
                during.append(time.perf_counter() - t0)
        thread.join()
    return {
        "request_bytes": len(payload),
        "huge_request": answer,
        "legit_alone": alone,
        # one keep-alive client, one request after another while the huge one is answered
        "legit_during_median_s": round(statistics.median(during), 4),
        "legit_during_max_s": round(max(during), 4),
        "legit_during_n": len(during),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flood", type=int, default=3000)
    p.add_argument("--fd-limit", type=int, default=1024)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--modes", nargs="+", default=["guarded", "unguarded"])
    p.add_argument("--skip-huge", action="store_true", help="only the flood")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model("masked", Path(tmp) / "tiny")
        results: dict[str, Any] = {
            "flood": {mode: run_mode(model, mode, args) for mode in args.modes}
        }
        if not args.skip_huge:
            results["huge_label_ids"] = {
                "capped": huge_label_ids(model, True, args),
                "uncapped": huge_label_ids(model, False, args),
            }
    print(
        json.dumps(
            {
                "flood_connections": args.flood,
                "server_fd_limit": args.fd_limit,
                "max_connections": min(1024, args.fd_limit - 64),
                "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.system()}",
                **results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

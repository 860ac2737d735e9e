"""CPU time per request of the server's ``Guard`` middleware around an empty raw route.

    .venv/bin/python benchmarks/bench_guard.py [--requests 20000]

What the key check, the body read and the disconnect watcher add to every request, without
HTTP or a model: ``Guard`` is called as uvicorn would call it, with a ``receive`` that gives the
body and then waits (answering ``http.disconnect`` once the response is complete, as uvicorn's
does) and a ``send`` that records the response. The route yields to the event loop once, as a
real one waiting for the batcher does. Prints one JSON object: ``us_per_request``, the best of
``--repeats`` runs. To measure another checkout, put its ``providers`` first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from dect_maas_server.batcher import Metrics
from dect_maas_server.guard import Guard
from starlette.responses import Response


async def _route(body: bytes) -> Response:
    await asyncio.sleep(0)  # a real route waits for the batcher: the loop turns
    return Response(b"{}", media_type="application/json")


class _Connection:
    """uvicorn's side of one request: the body, then ``http.disconnect`` once answered."""

    def __init__(self) -> None:
        self.complete = asyncio.Event()
        self.first = True

    async def receive(self) -> dict[str, Any]:
        if self.first:
            self.first = False
            return {"type": "http.request", "body": b"0123456789", "more_body": False}
        await self.complete.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.complete.set()


async def _run(n: int) -> float:
    guard = Guard(
        _route,  # never called: the raw route answers
        api_key=None,
        max_body_bytes=1 << 20,
        metrics=Metrics(),
        raw_routes={("POST", "/v1/features"): _route},
    )
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/v1/features",
        "headers": [(b"content-length", b"10")],
    }
    started = time.process_time()
    for _ in range(n):
        conn = _Connection()
        await guard(scope, conn.receive, conn.send)
        assert conn.complete.is_set()
    return (time.process_time() - started) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    best = min(asyncio.run(_run(args.requests)) for _ in range(args.repeats))
    print(json.dumps({"us_per_request": round(best * 1e6, 2), "requests": args.requests}))


if __name__ == "__main__":
    main()

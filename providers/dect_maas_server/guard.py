"""``Guard``, the ASGI middleware in front of every route: the bearer key (constant time), the
request-body size limit, the request counter, the raw routes that bypass FastAPI, and the
disconnect watcher.

The body is read here, up to the limit, before any route sees it, so an oversized or endless body
costs at most ``max_body_bytes`` of memory (and, with the connection guard of ``protocol.py``, at
most ``body_timeout_s`` of time).

uvicorn does not cancel a handler whose client has gone: it only answers ``http.disconnect`` to
the next ``receive()``. A killed client's queued requests would then keep the model busy for
minutes. So, once the body is in, ``Guard`` alone reads the connection (the route gets the body
and then, if it asks again, the disconnect), and when the client goes before the whole response
has been sent, the handler is cancelled: the batchers then drop its rows that no forward pass
has started. Once the response is complete the watcher stops, so a keep-alive connection closed
later, or the next request on it, is never taken for a lost client.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .batcher import DroppedRows, Metrics, dropped_rows
from .state import RawRoute, error_response

__all__ = ["ASGIApp", "Guard"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("dect_maas_server")


def _uncancel(task: asyncio.Task[Any]) -> int:
    """``Task.uncancel()``, which Python 3.10 lacks: there a caught cancellation leaves no
    pending count behind (and a shutdown's cancel meeting a disconnect is taken for ours)."""
    uncancel = getattr(task, "uncancel", None)
    return int(uncancel()) if uncancel is not None else 0


class Guard:
    """ASGI middleware: key check, body limit, request counter, raw routes (see the module)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        metrics: Metrics,
        raw_routes: dict[tuple[str, str], RawRoute] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self._key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.raw_routes = raw_routes or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self._key is not None and scope.get("path") != "/health":
            given = headers.get("authorization", b"")
            scheme, _, token = given.partition(b" ")
            ok = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
            if not ok:
                msg = "missing or wrong API key (send 'Authorization: Bearer <key>')"
                resp = error_response(401, msg, {"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        with self.metrics.lock:
            self.metrics.requests += 1
        raw = self.raw_routes.get((scope.get("method", ""), scope.get("path", "")))
        await self._answer(scope, body, receive, send, raw, started)

    async def _answer(
        self,
        scope: Scope,
        body: bytes,
        receive: Receive,
        send: Send,
        raw: RawRoute | None,
        started: float,
    ) -> None:
        """Run the route in this task while a watcher task reads the connection; cancel the
        route if the client goes before the last byte of the response was handed to uvicorn."""
        task = asyncio.current_task()
        assert task is not None
        gone = asyncio.Event()
        complete = False  # the last body message went to uvicorn: nothing left to cancel
        abandoned = False  # the watcher cancelled this task
        replayed = False

        async def replay() -> Message:
            # The body once, then (only ever) the disconnect the watcher saw: the real
            # ``receive`` has a single reader, so no message is taken from the watcher.
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def tracked_send(message: Message) -> None:
            nonlocal complete
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        async def watch() -> None:
            nonlocal abandoned
            while (await receive())["type"] != "http.disconnect":
                pass  # a spurious wake-up: the body was read whole before the watcher began
            gone.set()
            if not complete:
                abandoned = True
                task.cancel()

        record = DroppedRows()
        token = dropped_rows.set(record)
        watcher = asyncio.create_task(watch())
        try:
            if raw is not None:
                response = await raw(body)
                await response(scope, replay, tracked_send)
            else:
                await self.app(scope, replay, tracked_send)
        except asyncio.CancelledError:
            if not abandoned:
                raise
            abandoned = False
            self._abandoned(scope, started, record)
            # Ours alone: the client is gone, there is no one to answer, and uvicorn must not
            # log it as a failure. Another cancel pending too (a server shutdown): let it go on.
            if _uncancel(task) > 0:
                raise
        finally:
            watcher.cancel()
            dropped_rows.reset(token)
            if abandoned:  # the route swallowed the cancellation and answered anyway
                _uncancel(task)

    def _abandoned(self, scope: Scope, started: float, record: DroppedRows) -> None:
        """Count and log a request whose client went away before its answer (no body, no
        headers, no query string: nothing a client sent can reach the log)."""
        with self.metrics.lock:
            self.metrics.requests_abandoned += 1
        path = "".join(c if c.isprintable() else "?" for c in str(scope.get("path", ""))[:200])
        logger.info(
            "client went away after %.2f s, before the answer to %s %s: %d queued rows dropped",
            time.monotonic() - started,
            scope.get("method", ""),
            path,  # one line whatever the client put in its path
            record.rows,
        )

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        msg = f"request body larger than {self.max_body_bytes} bytes"
        await error_response(413, msg)(scope, receive, send)

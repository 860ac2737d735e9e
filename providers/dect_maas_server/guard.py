"""``Guard``, the ASGI middleware in front of every route: the bearer key (constant time), the
request-body size limit, the request counter, and the raw routes that bypass FastAPI.

The body is read here, up to the limit, before any route sees it, so an oversized or endless body
costs at most ``max_body_bytes`` of memory (and, with the connection guard of ``protocol.py``, at
most ``body_timeout_s`` of time).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .batcher import Metrics
from .state import RawRoute, error_response

__all__ = ["ASGIApp", "Guard"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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
        if raw is not None:
            response = await raw(body)
            await response(scope, receive, send)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        msg = f"request body larger than {self.max_body_bytes} bytes"
        await error_response(413, msg)(scope, receive, send)

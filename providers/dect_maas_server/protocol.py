"""Connection guard: a header-read deadline, a body deadline, a header-size cap and a connection
cap, around uvicorn's own HTTP protocol (httptools or h11, whichever uvicorn picks).

uvicorn has none of these for a connection that has not sent a whole request head: its
``timeout_keep_alive`` starts only after a response and is reset by every byte received, and
``limit_concurrency`` answers 503 to *legitimate* requests once idle connections fill it (uvicorn
issue #157 lists ``--timeout-request-start`` as never implemented). So a client that opens
thousands of connections and sends half a request line holds them forever, until the process
runs out of file descriptors and stops accepting anyone.

Here every connection waiting for a request head has ``header_timeout_s`` to send it (from the
moment it connects or its previous response ended) and at most ``max_header_bytes``; once the
head is in, the body has ``body_timeout_s``. When more than ``max_connections`` are open, the one
that has waited longest for a request head is closed (an idle keep-alive or a slow client), never
one being answered; only when every connection is busy is the new one refused. Legitimate
clients send their request head at once, so under a flood of idle connections they keep being
served.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .batcher import Metrics
from .state import Limits

__all__ = ["guarded_protocol"]

_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


def _raw_response(template: bytes, kind: str, message: str) -> bytes:
    body = b'{"error":{"type":"%s","message":"%s"}}' % (kind.encode(), message.encode())
    return template % (len(body), body)


def guarded_protocol(
    limits: Limits, metrics: Metrics, base: type[asyncio.Protocol] | None = None
) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol class enforcing ``limits``; pass it as
    ``uvicorn.Config(http=...)``. ``metrics`` counts what it closed, for ``/metrics``."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    # Connections waiting for a request head, longest-waiting first (dicts keep order).
    waiting: dict[Any, None] = {}
    timeout_body = _raw_response(
        _REQUEST_TIMEOUT,
        "request_timeout",
        f"request head not received within {limits.header_timeout_s:g} s",
    )
    too_large_body = _raw_response(
        _HEADERS_TOO_LARGE,
        "request_too_large",
        f"request head larger than {limits.max_header_bytes} bytes",
    )

    class GuardedProtocol(base):  # type: ignore[misc,valid-type]
        # From uvicorn's protocol: transport, connections, cycle, loop.
        transport: asyncio.Transport
        connections: set[Any]
        cycle: Any
        loop: asyncio.AbstractEventLoop

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._timer: asyncio.TimerHandle | None = None
            self._phase = "head"  # "head": waiting for a request head; "body"; "busy"
            self._head_bytes = 0

        # -- asyncio.Protocol ---------------------------------------------------------------

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            metrics.connections_open = len(self.connections)
            self._wait_for_head()
            if len(self.connections) > limits.max_connections:
                victim = next(iter(waiting))  # self is waiting too, so there is one
                waiting.pop(victim)
                victim._cancel_timer()
                metrics.connections_shed += 1
                victim.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            waiting.pop(self, None)
            self._cancel_timer()
            super().connection_lost(exc)
            metrics.connections_open = len(self.connections)

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            super().data_received(data)
            if self.transport.is_closing():
                return
            if self.cycle is not before and self.cycle is not None:
                self._request_started()
            elif self._phase == "head":
                self._head_bytes += len(data)
                if self._head_bytes > limits.max_header_bytes:
                    metrics.headers_too_large += 1
                    self.transport.write(too_large_body)
                    self.transport.close()
            elif self._phase == "body" and not self.cycle.more_body:
                self._phase = "busy"
                self._cancel_timer()

        # -- uvicorn's hook when a response has been sent --------------------------------------

        def on_response_complete(self) -> None:
            before = self.cycle
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self.cycle is not before:  # h11 went on to a pipelined request
                self._request_started()
            elif not getattr(self, "pipeline", None):  # httptools queues pipelined ones here
                self._wait_for_head()

        # -- deadlines ----------------------------------------------------------------------

        def _wait_for_head(self) -> None:
            self._phase = "head"
            self._head_bytes = 0
            waiting.pop(self, None)
            waiting[self] = None  # now the newest
            self._arm(limits.header_timeout_s)

        def _request_started(self) -> None:
            waiting.pop(self, None)
            if self.cycle.more_body:
                self._phase = "body"
                self._arm(limits.body_timeout_s)
            else:
                self._phase = "busy"
                self._cancel_timer()

        def _arm(self, seconds: float) -> None:
            self._cancel_timer()
            self._timer = self.loop.call_later(seconds, self._expired)

        def _cancel_timer(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if self.transport.is_closing() or self._phase == "busy":
                return
            if self._phase == "head":
                metrics.header_timeouts += 1
                if self._head_bytes:  # a partial request: say why; an idle one just closes
                    self.transport.write(timeout_body)
            else:
                metrics.body_timeouts += 1
            self.transport.close()

    return GuardedProtocol

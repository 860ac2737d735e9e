"""What every route shares: the limits, the errors, and ``AppState`` (engine, batcher, metrics).

A route module reads and writes nothing else: it gets the state in ``register(app, state)``
and uses its helpers, which turn the engine's and the batcher's failures into ``ApiError``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse
from starlette.responses import Response

from .batcher import Batcher, LabelResult, Metrics, QueueFull
from .engine import Encoded, Engine, InputError, ItemOutput
from .soft_prompt import SoftPromptBatcher

__all__ = [
    "ApiError",
    "AppState",
    "Limits",
    "RawRoute",
    "error_response",
    "validation_message",
]

RawRoute = Callable[[bytes], Awaitable[Response]]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "overloaded_error",
    500: "server_error",
    503: "unavailable_error",
}


@dataclass(frozen=True)
class Limits:
    """Per-request and per-connection limits; see ``--help`` for what each guards against.

    ``max_label_token_ids`` caps the ids scored per input, and ``max_scores_per_request`` the
    inputs x ids of one request: without them one 2 MB request asked for 400 MB of JSON and
    stalled every other client for seconds. Both are advertised in ``/v1/models``.
    """

    max_body_bytes: int = 8 * 1024 * 1024
    max_inputs_per_request: int = 256
    max_logprobs: int = 20
    max_top_k: int = 100
    max_label_token_ids: int = 1024
    max_scores_per_request: int = 65536
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 1024


class ApiError(Exception):
    """An error answered as ``{"error": {"type", "message"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"type": _ERROR_TYPES.get(status, "error"), "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(errors: Sequence[Any]) -> str:
    """Pydantic's first errors as one line: ``inputs: Input should be a valid list``."""
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body"


@dataclass
class AppState:
    """The one object the routes share. ``raw_routes`` are answered by ``Guard`` directly."""

    engine: Engine
    batcher: Batcher
    metrics: Metrics
    limits: Limits
    tokenizer_pool: ThreadPoolExecutor
    soft_batcher: SoftPromptBatcher
    created: int = field(default_factory=lambda: int(time.time()))
    raw_routes: dict[tuple[str, str], RawRoute] = field(default_factory=dict)

    def check_count(self, n: int) -> None:
        if n > self.limits.max_inputs_per_request:
            raise ApiError(
                413, f"{n} inputs in one request; the limit is {self.limits.max_inputs_per_request}"
            )

    def check_ids(self, ids: list[int], what: str) -> None:
        vocab = self.engine.vocab_size
        for t in ids:
            if not 0 <= t < vocab:
                raise ApiError(422, f"{what} {t} is outside the vocabulary (size {vocab})")

    def check_label_ids(
        self, n_inputs: int, ids: list[int], field: str = "label_token_ids"
    ) -> None:
        """The label-id caps, then the vocabulary, before anything is tokenized or queued."""
        self.check_label_count(n_inputs, len(ids), field)
        self.check_ids(ids, f"{field} entry")

    def check_label_count(self, n_inputs: int, n_ids: int, field: str) -> None:
        lim = self.limits
        if n_ids > lim.max_label_token_ids:
            raise ApiError(
                413, f"{n_ids} {field} per input; the limit is {lim.max_label_token_ids}"
            )
        if n_inputs * n_ids > lim.max_scores_per_request:
            raise ApiError(
                413,
                f"{n_inputs} inputs x {n_ids} {field} = {n_inputs * n_ids} scores in one "
                f"request; the limit is {lim.max_scores_per_request}: send fewer inputs per "
                "request",
            )

    def queue_full(self, exc: QueueFull) -> ApiError:
        return ApiError(
            429,
            f"server queue is full ({self.batcher.max_queue} queries); retry later",
            headers={"Retry-After": str(exc.retry_after)},
        )

    async def run(self, items: list[Encoded], **kwargs: bool) -> list[ItemOutput]:
        """Queue already-encoded inputs for forward passes; a full queue is a 429."""
        try:
            return await self.batcher.submit(items, **kwargs)
        except QueueFull as exc:
            raise self.queue_full(exc) from None

    async def run_labels(self, items: list[Encoded], label_ids: list[int]) -> LabelResult:
        try:
            return await self.batcher.submit_labels(items, label_ids)
        except QueueFull as exc:
            raise self.queue_full(exc) from None

    async def encode_all(self, texts: list[str], *, for_embedding: bool = False) -> list[Encoded]:
        """Tokenize off the event loop: the Rust tokenizer releases the GIL, so the loop keeps
        answering requests (and, with several cores, tokenizes in parallel)."""
        engine, metrics = self.engine, self.metrics

        def encode() -> list[Encoded]:
            started = time.thread_time()
            try:
                return engine.encode_many(texts, for_embedding=for_embedding)
            finally:
                metrics.record_tokenize(time.thread_time() - started)

        try:
            return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, encode)
        except InputError as exc:
            raise ApiError(422, str(exc)) from None

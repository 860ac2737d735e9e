"""The HTTP app: one ``AppState`` (engine, batcher, limits), route modules over it, ``Guard``
in front.

Wire shapes follow issue 3 and ``docs/reference/serving_apis.md``: ``/v1/features`` and
``/v1/tokenize`` are this project's own; ``/v1/completions``, ``/v1/embeddings`` and
``/v1/models`` imitate OpenAI / vLLM; fill-mask imitates the Hugging Face Inference API.

Each module in ``routes/`` has ``register(app, state)``; ``ROUTES`` lists them. To add a route
family, write ``routes/<name>.py`` with its ``register`` and add the module to ``ROUTES``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Batcher, Metrics
from .engine import Engine
from .guard import Guard
from .routes import chat, completions, embeddings, features, fill_mask, info, tokenize
from .routes.features import features_body
from .soft_prompt import SoftPromptBatcher
from .state import ApiError, AppState, Limits, error_response, validation_message

__all__ = [
    "ROUTES",
    "ApiError",
    "AppState",
    "Guard",
    "Limits",
    "RouteModule",
    "create_app",
    "error_response",
    "features_body",
]

logger = logging.getLogger("dect_maas_server")


class RouteModule(Protocol):
    """What a module in ``routes/`` provides."""

    def register(self, app: FastAPI, state: AppState) -> None: ...


#: The route modules, registered in this order.
ROUTES: tuple[RouteModule, ...] = (
    info,
    features,
    tokenize,
    completions,
    chat,
    embeddings,
    fill_mask,
)


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_queue: int = 1024,
    max_batch_tokens: int = 16384,
    limits: Limits | None = None,
    on_startup: Callable[[], None] | None = None,
    test_hold_file: str | None = None,
) -> Guard:
    """Build the ASGI app (FastAPI wrapped in ``Guard``); the batcher lives with the app.

    ``test_hold_file`` is for tests only (see ``batcher.TEST_HOLD_ENV``)."""
    limits = limits or Limits()
    metrics = Metrics()
    state = AppState(
        engine=engine,
        batcher=Batcher(
            engine,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            max_batch_tokens=max_batch_tokens,
            metrics=metrics,
            test_hold_file=test_hold_file,
        ),
        metrics=metrics,
        limits=limits,
        tokenizer_pool=ThreadPoolExecutor(
            max_workers=max(1, min(4, os.cpu_count() or 1)),
            thread_name_prefix="dect-maas-tokenize",
        ),
        soft_batcher=SoftPromptBatcher(engine, metrics=metrics, test_hold_file=test_hold_file),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        state.batcher.start()
        if on_startup is not None:
            on_startup()
        try:
            yield
        finally:
            state.batcher.stop()
            state.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="dect-maas-server", lifespan=lifespan, docs_url=None, redoc_url=None)
    _add_error_handlers(app)
    for module in ROUTES:
        module.register(app, state)
    return Guard(
        app,
        api_key=api_key,
        max_body_bytes=limits.max_body_bytes,
        metrics=metrics,
        raw_routes=state.raw_routes,
    )


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": {"type", "message"}}``; never a traceback on the wire."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error: %s: %s", type(exc).__name__, exc)
        return error_response(500, "internal server error")

"""The HTTP surface: routes, errors as JSON, bearer auth and the body-size guard.

Wire shapes follow issue 3 and ``shared/reference/serving_apis.md``: ``/v1/features`` and
``/v1/tokenize`` are this project's own; ``/v1/completions``, ``/v1/embeddings`` and
``/v1/models`` imitate OpenAI / vLLM; fill-mask imitates the Hugging Face Inference API.

``POST /v1/features``, the DecT hot path, is answered by ``Guard`` directly, without FastAPI's
per-request machinery: the body is validated by pydantic from the raw JSON bytes, tokenized in
one call, and the response is written as JSON bytes from whole arrays (``features_body``).
Its errors have the same shapes and statuses as every other route's.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .batcher import Batcher, Metrics, QueueFull
from .chat import register_chat
from .engine import Encoded, Engine, InputError, ItemOutput
from .schemas import (
    CompletionsRequest,
    EmbeddingsRequest,
    FeaturesRequest,
    FillMaskRequest,
    TokenizeRequest,
)

logger = logging.getLogger("dect_maas_server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RawRoute = Callable[[bytes], Awaitable[Response]]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "method_not_allowed",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "overloaded_error",
    500: "server_error",
    503: "unavailable_error",
}


@dataclass(frozen=True)
class Limits:
    """Per-request limits; see ``--help`` for what each guards against."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_inputs_per_request: int = 256
    max_logprobs: int = 20
    max_top_k: int = 100


class ApiError(Exception):
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


class Guard:
    """ASGI middleware: bearer-key check (constant time), the request-body size limit, the
    request counter, and the raw routes that bypass FastAPI.

    The body is read here, up to the limit, before any route sees it, so an oversized or
    endless body costs at most ``max_body_bytes`` of memory.
    """

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


def _floats(t: torch.Tensor | npt.NDArray[Any]) -> list[Any]:
    """A (nested) list for JSON; -inf (an underflowed log-probability) and nan become null."""
    a = t.numpy() if isinstance(t, torch.Tensor) else t
    out: list[Any] = a.tolist()
    if np.isfinite(a).all():
        return out
    if a.ndim == 1:
        return [x if np.isfinite(x) else None for x in out]
    return [[x if np.isfinite(x) else None for x in row] for row in out]


def _json_rows(a: npt.NDArray[np.float32]) -> list[str]:
    """Each row of ``a`` as a JSON array. ``str`` of a list of floats writes each with
    ``float.__repr__``, as ``json.dumps`` does; non-finite values become null."""
    rows = a.tolist()
    if np.isfinite(a).all():
        return [str(r) for r in rows]
    return [
        "[" + ",".join(float.__repr__(x) if math.isfinite(x) else "null" for x in r) + "]"
        for r in rows
    ]


@functools.lru_cache(maxsize=8)
def _features_head(model: str, fingerprint: str) -> str:
    return f'{{"model":{json.dumps(model)},"fingerprint":{json.dumps(fingerprint)},"data":['


def features_body(
    model: str,
    fingerprint: str,
    logits: npt.NDArray[np.float32],
    logprobs: npt.NDArray[np.float32],
    hidden: npt.NDArray[np.float32] | None,
    n_tokens: Sequence[int],
    truncated: Sequence[bool],
    encoding_format: str,
) -> bytes:
    """The ``/v1/features`` response for ``N`` inputs, from ``[N, L]`` and ``[N, H]`` arrays.

    Written as text directly: ``json.dumps`` would scan every base64 string for characters to
    escape (there are none), which costs more than everything else here together.
    """
    n = len(n_tokens)
    hiddens: list[str]
    if hidden is None:
        hiddens = ["null"] * n
    elif encoding_format == "base64":
        packed = np.ascontiguousarray(hidden, dtype="<f4")
        hiddens = ['"' + base64.b64encode(row).decode("ascii") + '"' for row in packed]
    else:
        hiddens = _json_rows(hidden)
    items = ",".join(
        f'{{"token_logits":{a},"token_logprobs":{b},"hidden":{c},"n_tokens":{int(t)},'
        f'"truncated":{"true" if u else "false"}}}'
        for a, b, c, t, u in zip(
            _json_rows(logits), _json_rows(logprobs), hiddens, n_tokens, truncated, strict=True
        )
    )
    tail = f'],"usage":{{"prompt_tokens":{int(sum(n_tokens))}}}}}'
    return (_features_head(model, fingerprint) + items + tail).encode()


def validation_message(errors: Sequence[Any]) -> str:
    """Pydantic's first errors as one line: ``inputs: Input should be a valid list``."""
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body"


def _logprob(x: float) -> float:
    """-inf is not JSON; OpenAI reports -9999.0 for a token it has no logprob for."""
    return x if np.isfinite(x) else -9999.0


def _encode_vector(t: torch.Tensor, encoding_format: str) -> list[float | None] | str:
    if encoding_format == "base64":
        return base64.b64encode(t.numpy().astype("<f4").tobytes()).decode("ascii")
    return _floats(t)


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
) -> Guard:
    """Build the ASGI app (FastAPI wrapped in ``Guard``); the batcher lives with the app."""
    limits = limits or Limits()
    metrics = Metrics()
    batcher = Batcher(
        engine,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_batch_tokens=max_batch_tokens,
        metrics=metrics,
    )

    # Tokenizing runs here, off the event loop: the Rust tokenizer releases the GIL, so the
    # loop keeps parsing and answering requests (and, with several cores, tokenizes in parallel).
    tokenizer_pool = ThreadPoolExecutor(
        max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="dect-maas-tokenize"
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        batcher.start()
        if on_startup is not None:
            on_startup()
        try:
            yield
        finally:
            batcher.stop()
            tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="dect-maas-server", lifespan=lifespan, docs_url=None, redoc_url=None)
    created = int(time.time())
    app.state.engine = engine
    app.state.batcher = batcher
    app.state.metrics = metrics

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

    def queue_full(exc: QueueFull) -> ApiError:
        return ApiError(
            429,
            f"server queue is full ({batcher.max_queue} queries); retry later",
            headers={"Retry-After": str(exc.retry_after)},
        )

    async def run(items: list[Encoded], **kwargs: bool) -> list[ItemOutput]:
        try:
            return await batcher.submit(items, **kwargs)
        except QueueFull as exc:
            raise queue_full(exc) from None

    def check_count(n: int) -> None:
        if n > limits.max_inputs_per_request:
            raise ApiError(
                413, f"{n} inputs in one request; the limit is {limits.max_inputs_per_request}"
            )

    async def encode_all(texts: list[str], *, for_embedding: bool = False) -> list[Encoded]:
        def encode() -> list[Encoded]:
            started = time.thread_time()
            try:
                return engine.encode_many(texts, for_embedding=for_embedding)
            finally:
                metrics.record_tokenize(time.thread_time() - started)

        try:
            return await asyncio.get_running_loop().run_in_executor(tokenizer_pool, encode)
        except InputError as exc:
            raise ApiError(422, str(exc)) from None

    def check_ids(ids: list[int], what: str) -> None:
        for t in ids:
            if not 0 <= t < engine.vocab_size:
                raise ApiError(
                    422, f"{what} {t} is outside the vocabulary (size {engine.vocab_size})"
                )

    # -- routes ---------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name, "kind": engine.kind}

    @app.get("/metrics")
    async def read_metrics() -> dict[str, Any]:
        snap = metrics.snapshot(batcher.depth)
        snap.update(
            max_batch_size=batcher.max_batch_size,
            max_wait_ms=batcher.max_wait * 1000.0,
            max_queue=batcher.max_queue,
        )
        return snap

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": engine.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "dect-maas-server",
                    "kind": engine.kind,
                    "fingerprint": engine.fingerprint,
                    "vocab_size": engine.vocab_size,
                    "hidden_size": engine.hidden_size,
                    "max_input_tokens": engine.max_input_tokens,
                    "mask_token": engine.mask_token,
                    "max_inputs_per_request": limits.max_inputs_per_request,
                    "max_logprobs": limits.max_logprobs,
                }
            ],
        }

    async def features_raw(body: bytes) -> Response:
        """``POST /v1/features`` from the raw body (``Guard`` calls it; FastAPI is bypassed)."""
        try:
            try:
                req = FeaturesRequest.model_validate_json(body)
            except ValidationError as exc:
                raise ApiError(422, validation_message(exc.errors())) from None
            check_count(len(req.inputs))
            check_ids(req.label_token_ids, "label token id")
            encoded = await encode_all(req.inputs)
            try:
                result = await batcher.submit_labels(encoded, req.label_token_ids)
            except QueueFull as exc:
                raise queue_full(exc) from None
            content = features_body(
                engine.name,
                engine.fingerprint,
                result.logits,
                result.logprobs,
                result.hidden if req.return_hidden else None,
                [len(e.ids) for e in encoded],
                [e.truncated for e in encoded],
                req.encoding_format,
            )
        except ApiError as exc:
            return error_response(exc.status, exc.message, exc.headers)
        except Exception as exc:
            logger.error("internal error: %s: %s", type(exc).__name__, exc)
            return error_response(500, "internal server error")
        return Response(content, media_type="application/json")

    @app.post("/v1/features")
    async def features(request: Request) -> Response:
        # Reached only if Guard's raw route is bypassed; registered so GET gets a 405.
        return await features_raw(await request.body())

    @app.post("/v1/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        if (req.text is None) == (req.texts is None):
            raise ApiError(422, "give exactly one of 'text' or 'texts'")
        texts = [req.text] if req.text is not None else list(req.texts or [])
        check_count(len(texts))
        data = []
        for text in texts:
            encoding = engine.tokenizer(text, add_special_tokens=req.add_special_tokens)
            ids = list(encoding["input_ids"])
            data.append(
                {
                    "ids": ids,
                    "pieces": [engine.piece(i) for i in ids],
                    "tokens": list(engine.tokenizer.convert_ids_to_tokens(ids)),
                }
            )
        body: dict[str, Any] = {"model": engine.name, "fingerprint": engine.fingerprint}
        if req.text is not None:
            body.update(data[0])
        body["data"] = data
        return body

    @app.post("/v1/completions")
    async def completions(req: CompletionsRequest) -> JSONResponse:
        if engine.kind != "causal":
            raise ApiError(
                400,
                "this server runs a masked LM: /v1/completions needs a causal LM; "
                "use /v1/features or fill-mask",
            )
        max_tokens = 1 if req.max_tokens is None else req.max_tokens
        if max_tokens not in (0, 1):
            raise ApiError(
                400, "max_tokens must be 0 or 1: this server scores, it does not generate"
            )
        if req.n != 1 or req.stream:
            raise ApiError(400, "n must be 1 and stream must be false")
        if req.logprobs is not None and not 0 <= req.logprobs <= limits.max_logprobs:
            raise ApiError(400, f"logprobs must be between 0 and {limits.max_logprobs}")
        listed = list(req.logprob_token_ids or [])
        if listed:
            if req.logprobs is None:
                raise ApiError(400, "logprob_token_ids requires logprobs to be set")
            if max_tokens == 0:
                raise ApiError(400, "logprob_token_ids needs a generated position (max_tokens 1)")
            check_ids(listed, "logprob_token_ids entry")
        prompts: list[str | list[int]]
        p = req.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[arg-type]
        else:
            prompts = list(p)  # type: ignore[arg-type]
        if not prompts:
            raise ApiError(422, "prompt is empty")
        check_count(len(prompts))
        try:
            encoded = [
                engine.encode(x, i) if isinstance(x, str) else engine.encode_ids(list(x), i)
                for i, x in enumerate(prompts)
            ]
        except InputError as exc:
            raise ApiError(422, str(exc)) from None
        outs = await run(encoded, all_positions=req.echo)

        def name(token_id: int) -> str:
            if req.return_tokens_as_token_ids:
                return f"token_id:{token_id}"
            return engine.piece(token_id)

        def top_dict(lp: torch.Tensor, chosen: int | None, extra: list[int]) -> dict[str, Any]:
            if extra:
                picked = [*([chosen] if chosen is not None else []), *extra]
            else:
                k = req.logprobs or 0
                picked = [int(i) for i in torch.topk(lp, k).indices] if k else []
                if chosen is not None and chosen not in picked:
                    picked.append(chosen)
            return {name(i): _logprob(float(lp[i])) for i in picked}

        choices = []
        total_prompt = 0
        for index, (enc, out) in enumerate(zip(encoded, outs, strict=True)):
            total_prompt += len(enc.ids)
            tokens: list[str] = []
            token_lps: list[float | None] = []
            tops: list[dict[str, Any] | None] = []
            offsets: list[int] = []
            text = ""
            if req.echo:
                assert out.all_logprobs is not None
                for pos, tid in enumerate(enc.ids):
                    piece = name(tid)
                    offsets.append(len(text))
                    text += engine.piece(tid)
                    tokens.append(piece)
                    if pos == 0:
                        token_lps.append(None)
                        tops.append(None)
                    else:
                        row = out.all_logprobs[pos - 1]
                        token_lps.append(_logprob(float(row[tid])))
                        tops.append(top_dict(row, tid, []))
            if max_tokens == 1:
                chosen = int(torch.argmax(out.logprobs))
                offsets.append(len(text))
                text += engine.piece(chosen)
                tokens.append(name(chosen))
                token_lps.append(_logprob(float(out.logprobs[chosen])))
                tops.append(top_dict(out.logprobs, chosen, listed))
            logprobs_body = None
            if req.logprobs is not None:
                logprobs_body = {
                    "tokens": tokens,
                    "token_logprobs": token_lps,
                    "top_logprobs": tops,
                    "text_offset": offsets,
                }
            choices.append(
                {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs_body,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "prompt_token_ids": list(enc.ids),
                    "truncated": enc.truncated,
                }
            )
        n_gen = len(encoded) if max_tokens == 1 else 0
        return JSONResponse(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": engine.name,
                "system_fingerprint": engine.fingerprint,
                "choices": choices,
                "usage": {
                    "prompt_tokens": total_prompt,
                    "completion_tokens": n_gen,
                    "total_tokens": total_prompt + n_gen,
                },
            }
        )

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingsRequest) -> JSONResponse:
        if req.dimensions is not None and req.dimensions != engine.hidden_size:
            raise ApiError(400, f"dimensions must be {engine.hidden_size} (or left out)")
        x = req.input
        items: list[str | list[int]]
        if isinstance(x, str):
            items = [x]
        elif x and all(isinstance(v, int) for v in x):
            items = [list(x)]  # type: ignore[arg-type]
        else:
            items = list(x)  # type: ignore[arg-type]
        if not items:
            raise ApiError(422, "input is empty")
        check_count(len(items))
        try:
            encoded = [
                engine.encode(v, i, for_embedding=True)
                if isinstance(v, str)
                else engine.encode_ids(list(v), i)
                for i, v in enumerate(items)
            ]
        except InputError as exc:
            raise ApiError(422, str(exc)) from None
        outs = await run(encoded, pooled=True)
        data = []
        for i, out in enumerate(outs):
            assert out.pooled is not None
            data.append(
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": _encode_vector(out.pooled, req.encoding_format),
                }
            )
        n = sum(len(e.ids) for e in encoded)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": engine.name,
                "usage": {"prompt_tokens": n, "total_tokens": n},
            }
        )

    async def fill_mask(req: FillMaskRequest) -> JSONResponse:
        if engine.kind != "masked":
            raise ApiError(400, "fill-mask needs a masked LM; this server runs a causal LM")
        single = isinstance(req.inputs, str)
        texts = [req.inputs] if isinstance(req.inputs, str) else list(req.inputs)
        if not texts:
            raise ApiError(422, "inputs is empty")
        check_count(len(texts))
        top_k = req.parameters.top_k
        if not 1 <= top_k <= limits.max_top_k:
            raise ApiError(400, f"top_k must be between 1 and {limits.max_top_k}")
        targets = req.parameters.targets
        target_ids: list[int] | None = None
        if targets is not None:
            words = [targets] if isinstance(targets, str) else list(targets)
            target_ids = []
            for w in words:
                pieces = list(engine.tokenizer(w, add_special_tokens=False)["input_ids"])
                if not pieces:
                    raise ApiError(422, f"target {w!r} is empty after tokenization")
                if pieces[0] not in target_ids:
                    target_ids.append(pieces[0])  # first piece, as the HF pipeline does
            top_k = min(top_k, len(target_ids))
        encoded = await encode_all(texts)
        outs = await run(encoded)
        results = []
        for enc, out in zip(encoded, outs, strict=True):
            probs = torch.softmax(out.logits, dim=-1)  # [V], over the whole vocabulary
            if target_ids is not None:
                cand = torch.tensor(target_ids, dtype=torch.long)
                scores = probs[cand]
                order = torch.argsort(scores, descending=True)[:top_k]
                picks = [(int(cand[i]), float(scores[i])) for i in order]
            else:
                top = torch.topk(probs, top_k)
                picks = [(int(i), float(s)) for s, i in zip(top.values, top.indices, strict=True)]
            rows = []
            for tid, score in picks:
                ids = list(enc.ids)
                ids[enc.score_pos] = tid
                rows.append(
                    {
                        "score": score,
                        "token": tid,
                        "token_str": engine.piece(tid),
                        "sequence": engine.tokenizer.decode(ids, skip_special_tokens=True),
                    }
                )
            results.append(rows)
        return JSONResponse(results[0] if single else results)

    for path in ("/fill-mask", "/pipeline/fill-mask", "/models/{model_id:path}"):
        app.add_api_route(path, fill_mask, methods=["POST"])

    register_chat(app, engine, submit=run, max_logprobs=limits.max_logprobs, error=ApiError)

    return Guard(
        app,
        api_key=api_key,
        max_body_bytes=limits.max_body_bytes,
        metrics=metrics,
        raw_routes={("POST", "/v1/features"): features_raw},
    )

"""``POST /v1/features``, the DecT hot path: label-word scores and the hidden state per input.

It is answered by ``Guard`` directly (a raw route), without FastAPI's per-request machinery: the
body is validated by pydantic from the raw JSON bytes, tokenized in one call, and the response
is written as JSON bytes from whole arrays (``features_body``). Its errors have the same shapes
and statuses as every other route's.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.responses import Response

from dect_maas_server.schemas import FeaturesRequest
from dect_maas_server.soft_prompt import SoftPromptError, soft_prompt_labels
from dect_maas_server.state import ApiError, AppState, error_response, validation_message

__all__ = ["features_body", "register"]

logger = logging.getLogger("dect_maas_server")


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


def register(app: FastAPI, state: AppState) -> None:
    engine = state.engine
    soft_batcher = state.soft_batcher

    async def features_raw(body: bytes) -> Response:
        """``POST /v1/features`` from the raw body (``Guard`` calls it; FastAPI is bypassed)."""
        try:
            try:
                req = FeaturesRequest.model_validate_json(body)
            except ValidationError as exc:
                raise ApiError(422, validation_message(exc.errors())) from None
            state.check_count(len(req.inputs))
            state.check_label_ids(len(req.inputs), req.label_token_ids)
            encoded = await state.encode_all(req.inputs)
            n_soft = 0
            if req.prompt_embeds is not None:
                try:
                    result, n_soft = await soft_prompt_labels(engine, encoded, req, soft_batcher)
                except SoftPromptError as exc:
                    raise ApiError(422, str(exc)) from None
            else:
                result = await state.run_labels(encoded, req.label_token_ids)
            content = features_body(
                engine.name,
                engine.fingerprint,
                result.logits,
                result.logprobs,
                result.hidden if req.return_hidden else None,
                [len(e.ids) + n_soft for e in encoded],
                [e.truncated for e in encoded],
                req.encoding_format,
            )
        except ApiError as exc:
            return error_response(exc.status, exc.message, exc.headers)
        except Exception as exc:
            logger.error("internal error: %s: %s", type(exc).__name__, exc)
            return error_response(500, "internal server error")
        return Response(content, media_type="application/json")

    state.raw_routes[("POST", "/v1/features")] = features_raw

    @app.post("/v1/features")
    async def features(request: Request) -> Response:
        # Reached only if Guard's raw route is bypassed; registered so GET gets a 405.
        return await features_raw(await request.body())

"""``POST /v1/embeddings``: OpenAI-shaped mean-pooled last-layer vectors."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from dect_maas_server.engine import InputError
from dect_maas_server.schemas import EmbeddingsRequest
from dect_maas_server.state import ApiError, AppState


def _floats(t: torch.Tensor | npt.NDArray[Any]) -> list[Any]:
    """A (nested) list for JSON; -inf (an underflowed log-probability) and nan become null."""
    a = t.numpy() if isinstance(t, torch.Tensor) else t
    out: list[Any] = a.tolist()
    if np.isfinite(a).all():
        return out
    if a.ndim == 1:
        return [x if np.isfinite(x) else None for x in out]
    return [[x if np.isfinite(x) else None for x in row] for row in out]


def _encode_vector(t: torch.Tensor, encoding_format: str) -> list[float | None] | str:
    if encoding_format == "base64":
        return base64.b64encode(t.numpy().astype("<f4").tobytes()).decode("ascii")
    return _floats(t)


def register(app: FastAPI, state: AppState) -> None:
    engine = state.engine

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
        state.check_count(len(items))
        try:
            encoded = [
                engine.encode(v, i, for_embedding=True)
                if isinstance(v, str)
                else engine.encode_ids(list(v), i)
                for i, v in enumerate(items)
            ]
        except InputError as exc:
            raise ApiError(422, str(exc)) from None
        outs = await state.run(encoded, pooled=True)
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

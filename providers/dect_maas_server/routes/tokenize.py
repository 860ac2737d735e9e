"""``POST /v1/tokenize``: token ids, pieces and vocabulary entries, to resolve label words."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from dect_maas_server.schemas import TokenizeRequest
from dect_maas_server.state import ApiError, AppState


def register(app: FastAPI, state: AppState) -> None:
    engine = state.engine

    @app.post("/v1/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        if (req.text is None) == (req.texts is None):
            raise ApiError(422, "give exactly one of 'text' or 'texts'")
        texts = [req.text] if req.text is not None else list(req.texts or [])
        state.check_count(len(texts))
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

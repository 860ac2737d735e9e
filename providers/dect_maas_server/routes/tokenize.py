"""``POST /v1/tokenize``: token ids, pieces and vocabulary entries, to resolve label words and
to count what a request would bill (the client's ``estimate``).

``text`` or ``texts`` (``add_special_tokens``: the special tokens every input of ``/v1/features``,
``/v1/completions`` and ``/v1/embeddings`` gets), or ``messages`` (vLLM's form: one conversation,
rendered with the model's chat template as ``/v1/chat/completions`` renders it). Every answer
states ``max_input_tokens``: longer inputs are truncated to it where they are scored.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import TypeAdapter, ValidationError

from dect_maas_server.routes.chat import ChatError, ChatMessage, chat_ids, check_template
from dect_maas_server.schemas import TokenizeRequest
from dect_maas_server.state import ApiError, AppState

_MESSAGES = TypeAdapter(list[ChatMessage])


def register(app: FastAPI, state: AppState) -> None:
    engine = state.engine

    def entry(ids: list[int]) -> dict[str, Any]:
        return {
            "ids": ids,
            "pieces": [engine.piece(i) for i in ids],
            "tokens": list(engine.tokenizer.convert_ids_to_tokens(ids)),
        }

    @app.post("/v1/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        given = [x is not None for x in (req.text, req.texts, req.messages)]
        if sum(given) != 1:
            raise ApiError(422, "give exactly one of 'text', 'texts' or 'messages'")
        body: dict[str, Any] = {
            "model": engine.name,
            "fingerprint": engine.fingerprint,
            "max_input_tokens": engine.max_input_tokens,
        }
        if req.messages is not None:
            try:
                messages = _MESSAGES.validate_python(req.messages)
            except ValidationError as exc:
                raise ApiError(422, f"messages: {exc.errors()[0]['msg']}") from None
            if not messages:
                raise ApiError(422, "messages is empty")
            try:
                check_template(engine)
            except ChatError as exc:
                raise ApiError(exc.status, exc.message) from None
            ids = chat_ids(engine, messages, req.add_generation_prompt)
            one = entry(ids)
            body.update(one, count=len(ids))
            body["data"] = [one]
            return body
        texts = [req.text] if req.text is not None else list(req.texts or [])
        state.check_count(len(texts))
        data = []
        for text in texts:
            encoding = engine.tokenizer(text, add_special_tokens=req.add_special_tokens)
            data.append(entry(list(encoding["input_ids"])))
        if req.text is not None:
            body.update(data[0])
        body["data"] = data
        return body

"""``POST /v1/chat/completions``: OpenAI's chat shape, scored like ``/v1/completions``.

Most hosted models are reached only through chat completions, so the client's chat adapter needs
a real server to be tested against. The messages are rendered with the model's own chat template
(``add_generation_prompt``), and the answer is the first assistant token: ``max_tokens`` must be 1
(this server scores, it does not generate). ``logprobs: true`` with ``top_logprobs: k`` gives the
top-k next tokens in OpenAI's ``choices[i].logprobs.content[0].top_logprobs`` list; vLLM's
``logprob_token_ids`` lists the ids to report exactly (with ``return_tokens_as_token_ids`` their
names are ``token_id:<id>``), as on ``/v1/completions``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from dect_maas_server.engine import Encoded, Engine, InputError, ItemOutput
from dect_maas_server.state import ApiError, AppState

__all__ = ["ChatRequest", "register"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatPart(_Body):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ChatPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    logprob_token_ids: list[int] | None = None
    return_tokens_as_token_ids: bool = False
    n: int = 1
    stream: bool = False
    temperature: float | None = None


class ChatError(Exception):
    """A request the route refuses; ``register`` turns it into the app's JSON error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _logprob(x: float) -> float:
    """OpenAI reports -9999.0 for a token with no finite logprob (JSON has no -inf)."""
    return x if np.isfinite(x) else -9999.0


def check_chat(req: ChatRequest, engine: Engine, max_logprobs: int) -> list[int]:
    """Refuse what the route cannot answer; return the ``logprob_token_ids`` to report."""
    check_template(engine)
    max_tokens = req.max_completion_tokens or req.max_tokens or 1
    if max_tokens != 1:
        raise ChatError(400, "max_tokens must be 1: this server scores, it does not generate")
    if req.n != 1 or req.stream:
        raise ChatError(400, "n must be 1 and stream must be false")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise ChatError(400, "top_logprobs requires logprobs to be true")
        if not 0 <= req.top_logprobs <= max_logprobs:
            raise ChatError(400, f"top_logprobs must be between 0 and {max_logprobs}")
    listed = list(req.logprob_token_ids or [])
    if listed and not req.logprobs:
        raise ChatError(400, "logprob_token_ids requires logprobs to be true")
    for t in listed:
        if not 0 <= t < engine.vocab_size:
            raise ChatError(
                422, f"logprob_token_ids entry {t} is outside the vocabulary ({engine.vocab_size})"
            )
    return listed


def check_template(engine: Engine) -> None:
    """Refuse a model that cannot render a conversation."""
    if engine.kind != "causal":
        raise ChatError(400, "this server runs a masked LM: chat completions need a causal LM")
    if getattr(engine.tokenizer, "chat_template", None) is None:
        raise ChatError(
            400,
            f"model {engine.name!r} has no chat template; use /v1/completions with a plain prompt",
        )


def chat_ids(
    engine: Engine, messages: list[ChatMessage], add_generation_prompt: bool = True
) -> list[int]:
    """The messages through the model's chat template, tokenized as the template wrote them
    (before truncation): what ``/v1/chat/completions`` scores and ``/v1/tokenize`` counts."""
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    text = engine.tokenizer.apply_chat_template(
        plain, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])


def render_chat(engine: Engine, req: ChatRequest) -> Encoded:
    """The messages through the model's chat template, tokenized and truncated."""
    ids = chat_ids(engine, req.messages)
    try:
        return engine.encode_ids(ids)
    except InputError as exc:
        raise ChatError(422, str(exc)) from None


def chat_body(
    engine: Engine, req: ChatRequest, enc: Encoded, out: ItemOutput, listed: list[int]
) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` object for one scored prompt."""
    lp = out.logprobs  # [V] next-token log-probabilities
    chosen = int(torch.argmax(lp))

    def name(token_id: int) -> str:
        return f"token_id:{token_id}" if req.return_tokens_as_token_ids else engine.piece(token_id)

    def entry(token_id: int) -> dict[str, Any]:
        token = name(token_id)
        return {
            "token": token,
            "logprob": _logprob(float(lp[token_id])),
            "bytes": list(token.encode("utf-8")),
        }

    logprobs = None
    if req.logprobs:
        k = req.top_logprobs or 0
        picked = [int(i) for i in torch.topk(lp, k).indices] if k else []
        picked += [t for t in listed if t not in picked]
        logprobs = {"content": [{**entry(chosen), "top_logprobs": [entry(t) for t in picked]}]}
    n_prompt = len(enc.ids)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": engine.name,
        "system_fingerprint": engine.fingerprint,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": engine.piece(chosen)},
                "logprobs": logprobs,
                "finish_reason": "length",
                "truncated": enc.truncated,
            }
        ],
        "usage": {
            "prompt_tokens": n_prompt,
            "completion_tokens": 1,
            "total_tokens": n_prompt + 1,
        },
    }


def register(app: FastAPI, state: AppState) -> None:
    """Add ``POST /v1/chat/completions``; refusals take the app's JSON error shape."""
    engine = state.engine

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> JSONResponse:
        try:
            listed = check_chat(req, engine, state.limits.max_logprobs)
            if listed:
                state.check_label_count(1, len(listed), "logprob_token_ids")
            enc = render_chat(engine, req)
        except ChatError as exc:
            raise ApiError(exc.status, exc.message) from None
        (out,) = await state.run([enc])
        return JSONResponse(chat_body(engine, req, enc, out, listed))

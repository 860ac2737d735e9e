"""``POST /v1/completions`` (causal LMs): OpenAI/vLLM-compatible scoring, not generation.

``max_tokens`` 0 or 1 (greedy), top-k ``logprobs`` per position, ``echo`` for the prompt's own
logprobs, and vLLM's ``logprob_token_ids`` to ask for exactly the label words' logprobs.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from dect_maas_server.engine import InputError
from dect_maas_server.schemas import CompletionsRequest
from dect_maas_server.state import ApiError, AppState


def _logprob(x: float) -> float:
    """-inf is not JSON; OpenAI reports -9999.0 for a token it has no logprob for."""
    return x if np.isfinite(x) else -9999.0


def register(app: FastAPI, state: AppState) -> None:
    engine = state.engine

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
        if req.logprobs is not None and not 0 <= req.logprobs <= state.limits.max_logprobs:
            raise ApiError(400, f"logprobs must be between 0 and {state.limits.max_logprobs}")
        listed = list(req.logprob_token_ids or [])
        if listed:
            if req.logprobs is None:
                raise ApiError(400, "logprob_token_ids requires logprobs to be set")
            if max_tokens == 0:
                raise ApiError(400, "logprob_token_ids needs a generated position (max_tokens 1)")
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
        state.check_count(len(prompts))
        if listed:
            state.check_label_ids(len(prompts), listed, "logprob_token_ids")
        try:
            encoded = [
                engine.encode(x, i) if isinstance(x, str) else engine.encode_ids(list(x), i)
                for i, x in enumerate(prompts)
            ]
        except InputError as exc:
            raise ApiError(422, str(exc)) from None
        outs = await state.run(encoded, all_positions=req.echo)

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

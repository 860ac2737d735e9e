"""Fill-mask (masked LMs) as the Hugging Face Inference API serves it, at ``/fill-mask``,
``/pipeline/fill-mask`` and ``/models/{model_id}``."""

from __future__ import annotations

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from dect_maas_server.schemas import FillMaskRequest
from dect_maas_server.state import ApiError, AppState


def register(app: FastAPI, state: AppState) -> None:
    engine = state.engine

    async def fill_mask(req: FillMaskRequest) -> JSONResponse:
        if engine.kind != "masked":
            raise ApiError(400, "fill-mask needs a masked LM; this server runs a causal LM")
        single = isinstance(req.inputs, str)
        texts = [req.inputs] if isinstance(req.inputs, str) else list(req.inputs)
        if not texts:
            raise ApiError(422, "inputs is empty")
        state.check_count(len(texts))
        top_k = req.parameters.top_k
        if not 1 <= top_k <= state.limits.max_top_k:
            raise ApiError(400, f"top_k must be between 1 and {state.limits.max_top_k}")
        targets = req.parameters.targets
        target_ids: list[int] | None = None
        if targets is not None:
            words = [targets] if isinstance(targets, str) else list(targets)
            state.check_label_count(len(texts), len(words), "targets")
            target_ids = []
            for w in words:
                pieces = list(engine.tokenizer(w, add_special_tokens=False)["input_ids"])
                if not pieces:
                    raise ApiError(422, f"target {w!r} is empty after tokenization")
                if pieces[0] not in target_ids:
                    target_ids.append(pieces[0])  # first piece, as the HF pipeline does
            top_k = min(top_k, len(target_ids))
        encoded = await state.encode_all(texts)
        outs = await state.run(encoded)
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

"""``GET /health``, ``/metrics`` and ``/v1/models``: what the server runs and how it is doing."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from dect_maas_server.soft_prompt import soft_prompt_info
from dect_maas_server.state import AppState


def register(app: FastAPI, state: AppState) -> None:
    engine, batcher, limits = state.engine, state.batcher, state.limits

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name, "kind": engine.kind}

    @app.get("/metrics")
    async def read_metrics() -> dict[str, Any]:
        # Rows waiting for a forward pass, in either queue (soft prompts have their own).
        snap = state.metrics.snapshot(batcher.depth + state.soft_batcher.depth)
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
                    "created": state.created,
                    "owned_by": "dect-maas-server",
                    "kind": engine.kind,
                    "fingerprint": engine.fingerprint,
                    "vocab_size": engine.vocab_size,
                    "hidden_size": engine.hidden_size,
                    "max_input_tokens": engine.max_input_tokens,
                    "mask_token": engine.mask_token,
                    "max_inputs_per_request": limits.max_inputs_per_request,
                    "max_label_token_ids": limits.max_label_token_ids,
                    "max_scores_per_request": limits.max_scores_per_request,
                    "max_logprobs": limits.max_logprobs,
                    "soft_prompt": soft_prompt_info(engine),
                }
            ],
        }

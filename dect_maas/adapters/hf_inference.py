"""Hugging Face Inference (``hf-inference`` provider): fill-mask with ``targets`` plus
feature-extraction.

Fill-mask computes the softmax over the whole vocabulary at the mask and returns the probability of
each target; we take its log (``score_kind="logprobs"``), so scores are exact but not renormalised
over the label set. Targets are sent as strings: the pipeline scores the first token of a
multi-token target (with a warning on its side), which is DecT's first-token rule too. One input
per request. Vectors come from ``feature-extraction`` (pooled; per-token answers are pooled here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from dect_maas._task import Task

from ._base import (
    JSON,
    Capabilities,
    Label,
    NoDiscovery,
    Prices,
    Prompt,
    RequestSpec,
    Role,
    check_urls,
    chunks,
    encode_vector,
    estimate_tokens,
    get,
    malformed,
    number,
    pool,
    refuse,
)

__all__ = ["HFInferenceAdapter"]

ROUTER = "https://router.huggingface.co/hf-inference/models"


@dataclass(frozen=True)
class HFInferenceAdapter(NoDiscovery):
    """``model`` is a fill-mask model (e.g. ``FacebookAI/roberta-large``) whose mask literal is
    ``mask_token``; ``embeddings_model`` (optional) a feature-extraction model for vectors."""

    model: str
    mask_token: str = "<mask>"
    base_url: str | None = None  # default: the router URL of `model`
    scores: bool = True
    embeddings_model: str | None = None
    embeddings_base_url: str | None = None
    max_embedding_inputs: int = 32
    pooling: Literal["mean", "last"] = "mean"
    revision: str | None = None
    prices: Prices = field(default_factory=Prices)

    name: ClassVar[str] = "hf-inference"
    version: ClassVar[str] = "1"
    provider: ClassVar[str] = "hf-inference"

    def __post_init__(self) -> None:
        check_urls(self)

    @property
    def scores_url(self) -> str:
        return self.base_url or f"{ROUTER}/{self.model}"

    @property
    def vectors_url(self) -> str | None:
        if self.embeddings_base_url:
            return self.embeddings_base_url
        if self.embeddings_model:
            return f"{ROUTER}/{self.embeddings_model}/pipeline/feature-extraction"
        return None

    def capabilities(self, role: Role) -> Capabilities:
        if role == "vectors":
            return Capabilities(
                scores="none",
                vectors="pooled" if self.vectors_url else "none",
                max_inputs_per_request=self.max_embedding_inputs,
                score_kind="none",
            )
        return Capabilities(
            scores="exact" if self.scores else "none",
            vectors="none",
            max_inputs_per_request=1,
            score_kind="logprobs",
            masked_lm=True,
        )

    def roles(self, task: Task) -> tuple[Role, ...]:
        roles: list[Role] = []
        if self.scores:
            if not task.has_mask:
                raise refuse(
                    self.name, f"fill-mask needs a {{mask}} in the template {task.template!r}"
                )
            roles.append("scores")
        if self.vectors_url:
            roles.append("vectors")
        if not roles:
            raise refuse(self.name, "neither scores nor vectors are enabled")
        return tuple(roles)

    def endpoint(self, role: Role) -> tuple[str, str]:
        if role == "vectors":
            return self.vectors_url or "", ""
        return self.scores_url, ""

    def prompt(self, role: Role, task: Task, text: str, text_b: str | None) -> str:
        if role == "vectors":
            return text if text_b is None else f"{text}\n{text_b}"
        return task.render(text, text_b, mask_token=self.mask_token)

    def example_body(self, role: Role, prompt: str, labels: Sequence[Label]) -> dict[str, JSON]:
        if role == "vectors":
            return {"inputs": [prompt]}
        return self._fill_mask(prompt, labels)

    @staticmethod
    def _fill_mask(prompt: str, labels: Sequence[Label]) -> dict[str, JSON]:
        targets = [lab.text for lab in labels]
        return {"inputs": prompt, "parameters": {"targets": targets, "top_k": len(targets)}}

    def build_requests(
        self, role: Role, prompts: Sequence[Prompt], labels: Sequence[Label]
    ) -> list[RequestSpec]:
        base, path = self.endpoint(role)
        size = self.max_embedding_inputs if role == "vectors" else 1
        return [
            RequestSpec(
                role=role,
                method="POST",
                base_url=base,
                path=path,
                body=(
                    {"inputs": [p.text for p in part]}
                    if role == "vectors"
                    else self._fill_mask(part[0].text, labels)
                ),
                indices=tuple(p.index for p in part),
                input_tokens=sum(estimate_tokens(p.text) for p in part),
                labels=tuple(labels),
            )
            for part in chunks(prompts, size)
        ]

    def parse_response(
        self, spec: RequestSpec, status: int, headers: Mapping[str, str], body: JSON
    ) -> list[dict[str, JSON]]:
        if spec.role == "vectors":
            if not isinstance(body, list) or len(body) != len(spec.indices):
                raise malformed(spec, f"expected a list of {len(spec.indices)} vector(s)")
            return [
                {
                    "s": None,
                    "c": None,
                    "h": encode_vector(pool(spec, v, self.pooling, f"[{i}]")),
                    "t": None,
                    "fp": None,
                }
                for i, v in enumerate(body)
            ]
        if not isinstance(body, list) or not body:
            raise malformed(spec, "fill-mask answer is not a non-empty list")
        found: dict[str, float] = {}
        for i, item in enumerate(body):
            token = get(spec, item, "token_str")
            score = number(spec, get(spec, item, "score"), f"[{i}].score")
            if not isinstance(token, str) or not 0.0 <= score <= 1.0:
                raise malformed(spec, f"[{i}] has no token_str or a score outside [0, 1]")
            found[token.strip()] = score
        scores = []
        for lab in spec.labels:
            p = found.get(lab.text.strip())
            if p is None:
                raise malformed(spec, f"target {lab.text!r} missing from the fill-mask answer")
            scores.append(math.log(p) if p > 0 else -1e30)
        return [{"s": scores, "c": None, "h": None, "t": None, "fp": None}]

    def parse_tokenize(self, spec: RequestSpec, body: JSON) -> list[int]:
        raise malformed(spec, "hf-inference has no tokenize endpoint")

    def model_for(self, role: Role) -> str:
        return (self.embeddings_model or self.model) if role == "vectors" else self.model

    def hidden_kind(self, role: Role) -> str:
        return f"pooled_{self.pooling}" if self.vectors_url else ""

    def extra_meta(self) -> dict[str, JSON]:
        return {
            "scores": "fill-mask targets",
            "pooling": self.pooling if self.vectors_url else None,
        }

"""text-embeddings-inference ``/embed``: pooled vectors only.

TEI has no LM head, so features carry no label scores (``score_kind="none"``) and the decoder runs
with
λ = 0. Its default ``--max-client-batch-size`` is 32 (413 beyond it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

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
    malformed,
    numbers,
)

__all__ = ["TEIAdapter"]


@dataclass(frozen=True)
class TEIAdapter(NoDiscovery):
    base_url: str
    model: str = "tei"
    max_inputs_per_request: int = 32
    normalize: bool = True
    truncate: bool = True
    embed_prompt: bool = False  # embed the rendered template instead of the raw input
    revision: str | None = None
    prices: Prices = field(default_factory=Prices)

    name: ClassVar[str] = "tei"
    version: ClassVar[str] = "1"
    provider: ClassVar[str] = "tei"

    def __post_init__(self) -> None:
        check_urls(self)

    def capabilities(self, role: Role) -> Capabilities:
        return Capabilities(
            scores="none",
            vectors="pooled",
            max_inputs_per_request=self.max_inputs_per_request,
            score_kind="none",
        )

    def roles(self, task: Task) -> tuple[Role, ...]:
        return ("vectors",)

    def endpoint(self, role: Role) -> tuple[str, str]:
        return self.base_url, "/embed"

    def prompt(self, role: Role, task: Task, text: str, text_b: str | None) -> str:
        if self.embed_prompt:
            return task.render(text, text_b)
        return text if text_b is None else f"{text}\n{text_b}"

    def _body(self, inputs: list[str]) -> dict[str, JSON]:
        return {"inputs": inputs, "normalize": self.normalize, "truncate": self.truncate}

    def example_body(self, role: Role, prompt: str, labels: Sequence[Label]) -> dict[str, JSON]:
        return self._body([prompt])

    def build_requests(
        self, role: Role, prompts: Sequence[Prompt], labels: Sequence[Label]
    ) -> list[RequestSpec]:
        return [
            RequestSpec(
                role=role,
                method="POST",
                base_url=self.base_url,
                path="/embed",
                body=self._body([p.text for p in part]),
                indices=tuple(p.index for p in part),
                input_tokens=sum(estimate_tokens(p.text) for p in part),
            )
            for part in chunks(prompts, self.max_inputs_per_request)
        ]

    def parse_response(
        self, spec: RequestSpec, status: int, headers: Mapping[str, str], body: JSON
    ) -> list[dict[str, JSON]]:
        if not isinstance(body, list) or len(body) != len(spec.indices):
            raise malformed(spec, f"expected a list of {len(spec.indices)} vector(s)")
        return [
            {
                "s": None,
                "c": None,
                "h": encode_vector(numbers(spec, v, f"[{i}]")),
                "t": None,
                "fp": None,
            }
            for i, v in enumerate(body)
        ]

    def parse_tokenize(self, spec: RequestSpec, body: JSON) -> list[int]:
        raise malformed(spec, "label words are not used by an embeddings-only adapter")

    def model_for(self, role: Role) -> str:
        return self.model

    def hidden_kind(self, role: Role) -> str:
        return "pooled"

    def extra_meta(self) -> dict[str, JSON]:
        return {"normalize": self.normalize, "embed_prompt": self.embed_prompt}

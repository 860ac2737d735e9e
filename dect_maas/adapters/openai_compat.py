"""OpenAI-compatible servers (OpenAI, vLLM, llama.cpp, Together, Ollama's compatible API).

Scores come from ``/v1/completions`` with ``max_tokens: 1, temperature: 0, logprobs: k``: the top-k
next-token log-probabilities (``score_kind="logprobs"``). A label word outside the top k is
*censored*: its value is the smallest returned log-probability (an upper bound) and it is marked as
such. With ``exact_token_ids=True`` the vLLM extension ``logprob_token_ids`` asks for the label ids
themselves, with ``return_tokens_as_token_ids`` so that answers are matched by id, not by string.

Vectors come from ``/v1/embeddings``, possibly at another base URL and model (a llama.cpp server
needs a second instance started in embedding mode). llama.cpp returns per-token vectors: they are
pooled (``pooling="mean"`` or ``"last"``) and the choice is recorded in ``FeatureMeta.extra``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal
from urllib.parse import urlsplit

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
    check_causal,
    check_urls,
    chunks,
    count_of,
    count_texts_requests,
    encode_vector,
    estimate_tokens,
    get,
    in_order,
    malformed,
    number,
    one_per_input,
    pool,
    refuse,
    split_tokens,
)
from .local import parse_token_ids

__all__ = ["OpenAICompatibleAdapter", "openai_path", "server_root"]

TokenizeAPI = Literal["auto", "llama-cpp-python", "vllm", "llama.cpp", "dect-maas", "none"]
_TOKENIZE: dict[str, tuple[str, str]] = {
    # api -> (path, field holding the text)
    "auto": ("/extras/tokenize", "input"),  # llama-cpp-python's; string matching where it 404s
    "llama-cpp-python": ("/extras/tokenize", "input"),
    "vllm": ("/tokenize", "prompt"),
    "llama.cpp": ("/tokenize", "content"),
    "dect-maas": ("/v1/tokenize", "text"),  # our local server's OpenAI-compatible side
}


@dataclass(frozen=True)
class OpenAICompatibleAdapter(NoDiscovery):
    """Adapter for ``/v1/completions`` logprobs (+ ``/v1/embeddings``).

    ``max_prompts_per_request``: 1 for llama.cpp (it refuses a list of prompts with a 500); OpenAI
    and vLLM take many. ``embeddings_model`` / ``embeddings_base_url``: set either to query
    vectors. ``prices`` bill the scores endpoint (its output-token price for the one token each
    request generates), ``embeddings_prices`` (default ``prices``) the vectors endpoint.
    ``max_embedding_inputs``: texts per embeddings request (1 for llama-cpp-python, which answers
    only the first text of a batch correctly). Label ids: ``label_token_ids`` (label string ->
    ids), else ``tokenizer`` (a callable, e.g. tiktoken's ``encode``), else the server's tokenize
    endpoint (``tokenize_api``; ``"auto"`` tries llama-cpp-python's and matches candidates by
    string where the server has none).
    """

    base_url: str
    model: str
    top_logprobs: int = 20
    exact_token_ids: bool = False
    max_prompts_per_request: int = 1
    scores: bool = True
    embeddings_model: str | None = None
    embeddings_base_url: str | None = None
    max_embedding_inputs: int = 64
    pooling: Literal["mean", "last"] = "mean"
    tokenize_api: TokenizeAPI = "auto"
    label_token_ids: Mapping[str, Sequence[int]] | None = None
    tokenizer: Callable[[str], Sequence[int]] | None = field(default=None, compare=False)
    extra_body: Mapping[str, JSON] = field(default_factory=dict)
    revision: str | None = None
    prices: Prices = field(default_factory=Prices)
    embeddings_prices: Prices | None = None
    provider: str = "openai-compatible"

    name: ClassVar[str] = "openai-compatible"
    version: ClassVar[str] = "1"

    def __post_init__(self) -> None:
        check_urls(self)

    def role_prices(self, role: Role) -> Prices:
        """Scores requests generate one token (``max_tokens: 1``); vectors may be billed apart."""
        if role == "vectors":
            return self.embeddings_prices or self.prices
        return self.prices.generating(1)

    @property
    def vectors(self) -> bool:
        return self.embeddings_model is not None or self.embeddings_base_url is not None

    def capabilities(self, role: Role) -> Capabilities:
        if role == "vectors":
            return Capabilities(
                scores="none",
                vectors="pooled" if self.vectors else "none",
                max_inputs_per_request=self.max_embedding_inputs,
                score_kind="none",
            )
        return Capabilities(
            scores=("exact" if self.exact_token_ids else "top-k") if self.scores else "none",
            vectors="none",
            max_inputs_per_request=self.max_prompts_per_request,
            score_kind="logprobs",
            top_k=None if self.exact_token_ids else self.top_logprobs,
            masked_lm=False,
        )

    def roles(self, task: Task) -> tuple[Role, ...]:
        roles: list[Role] = []
        if self.scores:
            check_causal(self.name, task)
            if (
                self.exact_token_ids
                and self.tokenize_api == "none"
                and self.tokenizer is None
                and self.label_token_ids is None
            ):
                raise refuse(self.name, "exact_token_ids needs label token ids or a tokenizer")
            roles.append("scores")
        if self.vectors:
            roles.append("vectors")
        if not roles:
            raise refuse(self.name, "neither scores nor vectors are enabled")
        return tuple(roles)

    def endpoint(self, role: Role) -> tuple[str, str]:
        if role == "vectors":
            base = self.embeddings_base_url or self.base_url
            return base, openai_path(base, "embeddings")
        return self.base_url, self._route("completions")

    def _route(self, route: str) -> str:
        return openai_path(self.base_url, route)

    def prompt(self, role: Role, task: Task, text: str, text_b: str | None) -> str:
        if role == "vectors":
            return text if text_b is None else f"{text}\n{text_b}"
        return task.render(text, text_b)

    def _scores_body(self, prompt: str | list[str], labels: Sequence[Label]) -> dict[str, JSON]:
        body: dict[str, JSON] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": self.top_logprobs,
        }
        if self.exact_token_ids:
            body["logprob_token_ids"] = [lab.first for lab in labels]
            body["return_tokens_as_token_ids"] = True
        body.update(self.extra_body)
        return body

    def _vectors_body(self, inputs: str | list[str]) -> dict[str, JSON]:
        return {"model": self.embeddings_model or self.model, "input": inputs}

    def example_body(self, role: Role, prompt: str, labels: Sequence[Label]) -> dict[str, JSON]:
        if role == "vectors":
            return self._vectors_body([prompt])
        return self._scores_body(prompt, labels)

    def build_requests(
        self, role: Role, prompts: Sequence[Prompt], labels: Sequence[Label]
    ) -> list[RequestSpec]:
        base, path = self.endpoint(role)
        size = self.max_embedding_inputs if role == "vectors" else self.max_prompts_per_request
        specs = []
        for part in chunks(prompts, size):
            texts = [p.text for p in part]
            if role == "vectors":
                body = self._vectors_body(texts)
            else:
                body = self._scores_body(texts[0] if len(texts) == 1 else texts, labels)
            specs.append(
                RequestSpec(
                    role=role,
                    method="POST",
                    base_url=base,
                    path=path,
                    body=body,
                    indices=tuple(p.index for p in part),
                    input_tokens=sum(estimate_tokens(t) for t in texts),
                    labels=tuple(labels),
                )
            )
        return specs

    def parse_response(
        self, spec: RequestSpec, status: int, headers: Mapping[str, str], body: JSON
    ) -> list[dict[str, JSON]]:
        if spec.role == "vectors":
            return self._parse_embeddings(spec, body)
        choices = one_per_input(spec, body, "choices", "prompt")
        tokens = _prompt_tokens(body, len(choices))
        by_index = in_order(spec, choices, "choices")
        out = []
        for i, choice in enumerate(by_index):
            top = get(spec, choice, "logprobs", "top_logprobs")
            if not isinstance(top, list) or not top or not isinstance(top[0], dict) or not top[0]:
                raise malformed(
                    spec, f"choices[{i}].logprobs.top_logprobs[0] is not a non-empty dict"
                )
            table = {
                str(k): number(spec, v, f"choices[{i}] top logprob") for k, v in top[0].items()
            }
            floor = min(table.values())
            scores, censored = [], []
            for lab in spec.labels:
                value = self._lookup(table, lab)
                scores.append(floor if value is None else value)
                censored.append(value is None)
            out.append({"s": scores, "c": censored, "h": None, "t": tokens[i], "fp": None})
        return out

    def _lookup(self, table: Mapping[str, float], label: Label) -> float | None:
        if self.exact_token_ids:
            return table.get(f"token_id:{label.first}")
        if not label.multi_token:
            return table.get(label.text)
        # first token of a multi-token word: the longest returned piece that starts the word
        pieces = [k for k in table if k and label.text.startswith(k)]
        return table[max(pieces, key=len)] if pieces else None

    def _parse_embeddings(self, spec: RequestSpec, body: JSON) -> list[dict[str, JSON]]:
        data = one_per_input(spec, body, "data")
        tokens = _prompt_tokens(body, len(data))
        ordered = in_order(spec, data, "data")
        out = []
        for i, item in enumerate(ordered):
            vec = pool(spec, get(spec, item, "embedding"), self.pooling, f"data[{i}].embedding")
            out.append({"s": None, "c": None, "h": encode_vector(vec), "t": tokens[i], "fp": None})
        return out

    @property
    def tokenize_optional(self) -> bool:
        """With ``tokenize_api="auto"`` a server with no tokenize route (OpenAI, Together, vLLM,
        llama.cpp's own server answer 404) is fine: top-k candidates are matched by string."""
        return self.tokenize_api == "auto" and not self.exact_token_ids

    def tokenize_request(self, text: str) -> RequestSpec | None:
        if self.known_label_ids(text) is not None or self.tokenize_api == "none":
            return None
        path, key = _TOKENIZE[self.tokenize_api]
        body: dict[str, JSON] = {key: text}
        if self.tokenize_api == "vllm":
            body.update(model=self.model, add_special_tokens=False)
        return RequestSpec(
            role="scores", method="POST", base_url=server_root(self.base_url), path=path, body=body
        )

    def parse_tokenize(self, spec: RequestSpec, body: JSON) -> list[int]:
        return parse_token_ids(spec, body)

    def count_requests(self, role: Role, texts: Sequence[str]) -> list[RequestSpec]:
        """The ``tokenize_api`` route at the role's server, asked for each prompt with the special
        tokens the server adds (BOS where the model wants one); dect-maas-server takes many
        texts per request, the others one. [] with ``tokenize_api="none"``."""
        if self.tokenize_api == "none":
            return []
        base = server_root(self.endpoint(role)[0])
        path, key = _TOKENIZE[self.tokenize_api]
        model = self.model_for(role)

        def spec(body: dict[str, JSON], indices: tuple[int, ...]) -> RequestSpec:
            return RequestSpec(
                role=role, method="POST", base_url=base, path=path, body=body, indices=indices
            )

        if self.tokenize_api == "dect-maas":
            return count_texts_requests(role, base, model, texts, 64)
        return [spec(self._count_body(key, model, t), (i,)) for i, t in enumerate(texts)]

    def _count_body(self, key: str, model: str, text: str) -> dict[str, JSON]:
        if self.tokenize_api == "vllm":
            return {"model": model, key: text, "add_special_tokens": True}
        if self.tokenize_api == "llama.cpp":
            return {key: text, "add_special": True}
        return {key: text}  # llama-cpp-python adds BOS where the model does, as its completions

    def parse_count(self, spec: RequestSpec, body: JSON) -> list[int]:
        return count_of(spec, body)

    def uncounted(self, role: Role) -> int:
        return 0

    def known_label_ids(self, word: str) -> list[int] | None:
        if self.label_token_ids is not None and word in self.label_token_ids:
            return [int(t) for t in self.label_token_ids[word]]
        if self.tokenizer is not None:
            return [int(t) for t in self.tokenizer(word)]
        return None

    def needs_label_ids(self, role: Role) -> bool:
        # top-k answers are matched by string; ids are still resolved (to detect multi-token words)
        # when the server can tokenize, and required for exact scores.
        return role == "scores" and (self.exact_token_ids or self.tokenize_api != "none")

    def model_for(self, role: Role) -> str:
        return (self.embeddings_model or self.model) if role == "vectors" else self.model

    def hidden_kind(self, role: Role) -> str:
        return f"pooled_{self.pooling}" if self.vectors else ""

    def extra_meta(self) -> dict[str, JSON]:
        extra: dict[str, JSON] = {
            "scores": "exact" if self.exact_token_ids else f"top-{self.top_logprobs}",
            "pooling": self.pooling if self.vectors else None,
        }
        if self.vectors:
            extra["embeddings_model"] = self.embeddings_model or self.model
            extra["embeddings_base_url"] = self.embeddings_base_url or self.base_url
        return extra


def openai_path(base_url: str, route: str) -> str:
    """The path of ``route`` under ``base_url``: ``/v1/<route>`` under a bare host
    (``http://host:8000``), ``/<route>`` under a base with a path, which is openai-python's form
    (``https://api.openai.com/v1``, ``https://api.deepinfra.com/v1/openai``)."""
    return f"/{route}" if urlsplit(base_url).path.strip("/") else f"/v1/{route}"


def server_root(base_url: str) -> str:
    """The server's root for its own (non-OpenAI) routes such as ``/tokenize``: ``base_url``
    without a trailing ``/v1``."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _prompt_tokens(body: JSON, n: int) -> list[int | None]:
    usage = body.get("usage") if isinstance(body, dict) else None
    return split_tokens(usage.get("prompt_tokens") if isinstance(usage, dict) else None, n)

"""What every adapter is: capabilities, prices, request specs and per-example records.

An adapter does no I/O (no socket, clock or cache). It turns prompts into small frozen request
specs and turns ``(status, headers, body)`` back into one JSON-able record per example, so that
every adapter can be tested on recorded bodies alone. The client owns everything else.

Roles. An adapter serves up to two *roles*, each one endpoint: ``"scores"`` (label-word scores at
the scoring position), ``"vectors"`` (a representation of the input), or ``"features"`` (both from
one forward pass, our local server). A query is one example on one role: when scores and vectors
come from two endpoints an example costs two queries.

Records (what the cache stores per example and role) are plain dicts:
``{"s": [score per flat label id] | None, "c": [censored per flat label id] | None,
"h": float32 array | None, "t": input tokens | None, "fp": model fingerprint | None}``.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np

from dect_maas._exceptions import MalformedResponse, TaskError, UnsupportedCapability
from dect_maas._task import Task
from dect_maas._urls import check_base_url

__all__ = [
    "Adapter",
    "Capabilities",
    "Label",
    "Prices",
    "Prompt",
    "RequestSpec",
    "Role",
    "TokenCounter",
    "check_urls",
    "count_of",
    "count_texts_requests",
    "decode_vector",
    "encode_vector",
    "estimate_tokens",
    "price_for",
    "split_tokens",
]

Role = Literal["scores", "vectors", "features"]
ScoreAccess = Literal["exact", "top-k", "none"]
VectorAccess = Literal["mask_hidden", "last_hidden", "pooled", "none"]
JSON = Any


@dataclass(frozen=True)
class Prices:
    """What an endpoint bills: USD per million input and output tokens and per request."""

    per_million_input_tokens: float = 0.0
    per_request: float = 0.0
    per_million_output_tokens: float = 0.0

    def cost(self, *, requests: int, input_tokens: int) -> float:
        return self.per_request * requests + self.per_million_input_tokens * input_tokens / 1e6

    def generating(self, tokens_per_request: int) -> Prices:
        """These prices for requests that each generate ``tokens_per_request`` tokens (scoring
        asks for ``max_tokens: 1``): the output tokens' price folded into the per-request one."""
        out = self.per_million_output_tokens * tokens_per_request / 1e6
        return Prices(self.per_million_input_tokens, self.per_request + out)


def price_for(adapter: Any, role: Role) -> Prices:
    """What one request of ``role`` costs at ``adapter``: its ``role_prices(role)`` where it has
    one (scores and vectors may be billed by different vendors), else its one ``prices``."""
    per_role = getattr(adapter, "role_prices", None)
    prices = per_role(role) if callable(per_role) else adapter.prices
    assert isinstance(prices, Prices)
    return prices


@dataclass(frozen=True)
class Capabilities:
    """What the API can give; checked against the task before anything is sent."""

    scores: ScoreAccess
    vectors: VectorAccess
    max_inputs_per_request: int
    score_kind: Literal["logits", "logprobs", "none"]
    top_k: int | None = None
    masked_lm: bool | None = None  # None: unknown until the server says

    def describe(self) -> str:
        k = f" (k={self.top_k})" if self.scores == "top-k" else ""
        return (
            f"scores: {self.scores}{k}, vectors: {self.vectors}, "
            f"up to {self.max_inputs_per_request} input(s) per request"
        )


@dataclass(frozen=True)
class Prompt:
    """One example's input for one role: its position in the batch and the text sent."""

    index: int  # -1 is the content-free prompt
    text: str


@dataclass(frozen=True)
class Label:
    """One label word as scored: its string (prefix applied), its token ids, and what is matched.

    ``ids`` is empty when the provider takes label words as strings (HF fill-mask ``targets``).
    Only the first token is scored (DecT §2.2); ``multi_token`` says the word had more.
    """

    text: str
    ids: tuple[int, ...] = ()

    @property
    def first(self) -> int | None:
        return self.ids[0] if self.ids else None

    @property
    def multi_token(self) -> bool:
        return len(self.ids) > 1


@dataclass(frozen=True)
class RequestSpec:
    """One HTTP request, as plain values: what the client sends and what the cache key covers."""

    role: Role
    method: str
    base_url: str
    path: str
    body: Mapping[str, JSON] | None
    indices: tuple[int, ...] = ()  # the examples it carries, in body order
    input_tokens: int = 0  # worst-case estimate, for budget reservation
    labels: tuple[Label, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The last gate before a URL is sent: every adapter's requests pass here.
        check_base_url(self.base_url, f"{self.role} endpoint base_url")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.path

    def describe(self) -> str:
        """For logs and errors: the full URL sent (specs carry no credential)."""
        if not self.indices:
            return f"{self.method} {self.url}"
        shown = ", ".join("content-free" if i < 0 else str(i) for i in self.indices[:8])
        more = f" and {len(self.indices) - 8} more" if len(self.indices) > 8 else ""
        return f"{self.method} {self.url} for example(s) {shown}{more}"

    def to_json(self) -> str:
        return json.dumps(
            {"method": self.method, "url": self.url, "body": self.body},
            sort_keys=True,
            separators=(",", ":"),
        )


_A = TypeVar("_A")


def check_urls(adapter: object) -> None:
    """Refuse an adapter whose endpoint URLs carry credentials (see ``dect_maas._urls``)."""
    for name in ("base_url", "embeddings_base_url"):
        value = getattr(adapter, name, None)
        if value is not None:
            check_base_url(value, f"{type(adapter).__name__}.{name}")


class NoDiscovery:
    """Defaults for an adapter with no free discovery call and no label-word token ids to
    resolve; an adapter that has them overrides these."""

    def tokenize_request(self, text: str) -> RequestSpec | None:
        return None

    def known_label_ids(self, word: str) -> list[int] | None:
        return None

    def needs_label_ids(self, role: Role) -> bool:
        return False

    def info_request(self) -> RequestSpec | None:
        return None

    def with_info(self: _A, body: JSON) -> _A:
        return self


@runtime_checkable
class Adapter(Protocol):
    """The adapter protocol. Every method is pure."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def provider(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def prices(self) -> Prices: ...

    def capabilities(self, role: Role) -> Capabilities: ...

    def roles(self, task: Task) -> tuple[Role, ...]:
        """The roles this adapter queries for the task (raises UnsupportedCapability)."""
        ...

    def endpoint(self, role: Role) -> tuple[str, str]:
        """(base URL, path) of a role, for cache keys and the ledger."""
        ...

    def prompt(self, role: Role, task: Task, text: str, text_b: str | None) -> str: ...

    def example_body(self, role: Role, prompt: str, labels: Sequence[Label]) -> dict[str, JSON]:
        """The full request body for this one example: everything that changes its answer."""
        ...

    def build_requests(
        self, role: Role, prompts: Sequence[Prompt], labels: Sequence[Label]
    ) -> list[RequestSpec]: ...

    def parse_response(
        self, spec: RequestSpec, status: int, headers: Mapping[str, str], body: JSON
    ) -> list[dict[str, JSON]]:
        """One record per example of ``spec``, in order; MalformedResponse on a bad body."""
        ...

    def tokenize_request(self, text: str) -> RequestSpec | None:
        """The request that resolves a label word to token ids, or None when ids are known."""
        ...

    def parse_tokenize(self, spec: RequestSpec, body: JSON) -> list[int]: ...

    def known_label_ids(self, word: str) -> list[int] | None:
        """Token ids the user gave (explicitly or through a tokenizer), else None."""
        ...

    def needs_label_ids(self, role: Role) -> bool: ...

    def hidden_kind(self, role: Role) -> str: ...

    def model_for(self, role: Role) -> str:
        """The model a role queries (embeddings may come from another model)."""
        ...

    def info_request(self) -> RequestSpec | None:
        """A free metadata request (model kind, fingerprint) the client sends first, or None."""
        ...

    def with_info(self, body: JSON) -> Adapter:
        """This adapter completed from the answer to ``info_request`` (a new value)."""
        ...

    def extra_meta(self) -> dict[str, JSON]: ...


@runtime_checkable
class TokenCounter(Protocol):
    """What an adapter whose server has a tokenizer route adds, so that ``estimate`` counts the
    prompts it would send instead of bounding them (free requests, sent by the client)."""

    def count_requests(self, role: Role, texts: Sequence[str]) -> list[RequestSpec]:
        """Requests that count the tokens ``role``'s endpoint bills for each of ``texts`` (its
        prompts; a spec's ``indices`` are positions in ``texts``), or [] when none is known."""
        ...

    def parse_count(self, spec: RequestSpec, body: JSON) -> list[int]:
        """Tokens per text of ``spec``, in order; MalformedResponse on a bad body."""
        ...

    def uncounted(self, role: Role) -> int:
        """Tokens per request that the count of its prompt does not include, at most (a chat
        template's markers where the route counts text only); 0 when the count is complete."""
        ...


# -- helpers shared by the adapters -------------------------------------------------------------


def count_of(spec: RequestSpec, body: JSON) -> list[int]:
    """Token counts from a tokenize answer, one per text of ``spec``: ``{"data": [{"ids"}]}``
    (dect-maas-server, several texts), ``{"count": n}`` (vLLM), ``{"tokens"|"ids": [...]}``.
    dect-maas-server states its truncation (``max_input_tokens``): no input bills more."""
    counts = _counts(spec, body)
    limit = body.get("max_input_tokens") if isinstance(body, dict) else None
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return [min(n, limit) for n in counts]
    return counts


def _counts(spec: RequestSpec, body: JSON) -> list[int]:
    n = len(spec.indices)
    if isinstance(body, dict):
        data = body.get("data")
        if isinstance(data, list) and len(data) == n:
            ids = [d.get("ids") if isinstance(d, dict) else None for d in data]
            lengths = [len(i) for i in ids if isinstance(i, list)]
            if len(lengths) == n:
                return lengths
        if n == 1:
            count = body.get("count")
            if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
                return [count]
            for key in ("tokens", "ids", "token_ids", "input_ids"):
                found = body.get(key)
                if isinstance(found, list):
                    return [len(found)]
    raise malformed(spec, f"tokenize answer has no token count for {n} text(s)")


def count_texts_requests(
    role: Role, base_url: str, model: str, texts: Sequence[str], per_request: int
) -> list[RequestSpec]:
    """dect-maas-server's ``/v1/tokenize`` asked for the tokens of ``texts``, ``per_request``
    at a time, with the special tokens the server adds to every input (free)."""
    prompts = [Prompt(i, t) for i, t in enumerate(texts)]
    return [
        RequestSpec(
            role=role,
            method="POST",
            base_url=base_url,
            path="/v1/tokenize",
            body={"model": model, "texts": [p.text for p in part], "add_special_tokens": True},
            indices=tuple(p.index for p in part),
        )
        for part in chunks(prompts, per_request)
    ]


def estimate_tokens(text: str) -> int:
    """A worst-case token count: every UTF-8 byte one token, plus a few special tokens.

    Byte-level BPE never makes more tokens than bytes, so this bounds what a provider bills; it is
    what the budget reserves before a request leaves (settled to the provider's count after).
    """
    return len(text.encode("utf-8")) + 4


Vector = np.ndarray[Any, np.dtype[np.float32]]


def encode_vector(values: Any) -> Vector:
    """A vector as a float32 array: the cache stores it as raw bytes, read back as a slice."""
    return np.ascontiguousarray(values, dtype="<f4")


def decode_vector(data: str) -> Vector:
    """Little-endian float32 base64 (OpenAI's ``encoding_format="base64"``) to an array."""
    return np.frombuffer(base64.b64decode(data, validate=True), dtype="<f4").copy()


def split_tokens(total: object, n: int) -> list[int | None]:
    """A request's prompt-token count spread over its examples (the first take the remainder)."""
    if not isinstance(total, int) or isinstance(total, bool) or n <= 0:
        return [None] * n
    q, r = divmod(total, n)
    return [q + (1 if i < r else 0) for i in range(n)]


def malformed(spec: RequestSpec, what: str) -> MalformedResponse:
    return MalformedResponse(f"unexpected response body: {what}", request=spec.describe())


def get(spec: RequestSpec, obj: JSON, *path: str | int) -> JSON:
    """obj[path...] or MalformedResponse naming where the shape broke (never KeyError)."""
    cur = obj
    trail = "body"
    for p in path:
        try:
            cur = cur[p]
        except (KeyError, IndexError, TypeError):
            raise malformed(spec, f"{trail} has no {p!r}") from None
        trail += f"[{p!r}]"
    return cur


def number(spec: RequestSpec, value: JSON, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise malformed(spec, f"{where} is not a finite number ({type(value).__name__})")
    return float(value)


def numbers(spec: RequestSpec, value: JSON, where: str) -> list[float]:
    if not isinstance(value, list):
        raise malformed(spec, f"{where} is not a list")
    return [number(spec, v, where) for v in value]


def one_per_input(spec: RequestSpec, body: JSON, key: str, noun: str = "input") -> list[JSON]:
    """``body[key]``, a list with one item per input of ``spec``, or MalformedResponse."""
    items = get(spec, body, key)
    if not isinstance(items, list) or len(items) != len(spec.indices):
        n = len(items) if isinstance(items, list) else "no list"
        raise malformed(spec, f"{key!r} has {n} item(s) for {len(spec.indices)} {noun}(s)")
    return items


def in_order(spec: RequestSpec, items: list[JSON], where: str) -> list[JSON]:
    """Items sorted by their ``index`` field, which must number them 0..n-1 (or be absent)."""
    if not all(isinstance(it, dict) for it in items):
        raise malformed(spec, f"{where} holds a non-object item")
    if all("index" not in it for it in items):
        return items
    idx = [it.get("index") for it in items]
    if sorted(i for i in idx if type(i) is int) != list(range(len(items))):
        raise malformed(spec, f"{where}[*].index does not number the items 0..{len(items) - 1}")
    return sorted(items, key=lambda it: int(it["index"]))


def chunks(prompts: Sequence[Prompt], size: int) -> list[Sequence[Prompt]]:
    return [prompts[i : i + size] for i in range(0, len(prompts), max(1, size))]


def refuse(adapter: str, what: str) -> UnsupportedCapability:
    return UnsupportedCapability(f"{adapter}: {what}. Nothing was sent.")


def check_causal(adapter: str, task: Task) -> None:
    """Refuse (before any I/O) a template a causal LM cannot score: text after ``{mask}``."""
    try:
        task.check_causal()
    except TaskError as exc:
        raise refuse(adapter, f"this API scores a causal LM and {exc}") from exc


def pool(spec: RequestSpec, vectors: JSON, how: str, where: str) -> list[float]:
    """Pool per-token vectors (llama.cpp with pooling none) to one; a flat vector passes through."""
    if not isinstance(vectors, list) or not vectors:
        raise malformed(spec, f"{where} is not a non-empty list")
    if not isinstance(vectors[0], list):
        return numbers(spec, vectors, where)
    try:
        arr = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError):
        raise malformed(spec, f"{where} is not a list of equal-length vectors") from None
    if arr.ndim != 2 or not np.isfinite(arr).all():
        raise malformed(spec, f"{where} is not a finite (tokens, dim) array")
    out = arr[-1] if how == "last" else arr.mean(axis=0)
    return [float(x) for x in out]

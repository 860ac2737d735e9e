"""What a ``features`` call must send, and what it would cost: pure, no I/O.

For each endpoint role a ``Plan`` holds every prompt, its cache key, what the cache already
holds (filled in by the client, which does the reading) and the requests left to send. The same
plans give the estimate (``estimate_of``) and each request's worst case, which the budget
reserves before it leaves (``worst``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dect_maas._exceptions import ConfigError
from dect_maas._task import Task
from dect_maas.adapters._base import Adapter, Label, Prompt, RequestSpec, Role, price_for

from .budget import Usage
from .cache import cache_key

__all__ = [
    "CONTENT_FREE",
    "KEY_SCHEMA",
    "SCALE_MARGIN",
    "Estimate",
    "Plan",
    "Record",
    "estimate_of",
    "example_keys",
    "label_key",
    "meta_key",
    "pairs_of",
    "plan_role",
    "split",
    "token_factor",
    "worst",
]

Record = dict[str, Any]
KEY_SCHEMA = "dect-maas/example/1"
CONTENT_FREE = -1  # the prompt index of the content-free prompt (scores' calibration)

#: Added to a token count scaled from cached answers, so that an estimate errs high.
SCALE_MARGIN = 0.05


@dataclass(frozen=True)
class Estimate:
    """What ``features`` would send for these texts now, given what is already cached.

    ``queries``/``requests`` are exact. ``input_tokens`` and ``cost_usd`` are the worst case the
    budget would reserve (a byte count bounds the token count); the provider's own count, settled
    after each request, is at most this. ``assumptions`` lists what could not be known without
    sending (e.g. label token ids never resolved yet: then nothing is counted as cached for scores).
    """

    queries: int
    requests: int
    input_tokens: int
    cost_usd: float
    cached_queries: int
    total_queries: int
    assumptions: tuple[str, ...] = ()
    by_role: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    # per role: tokens scaled from the provider's counts in cached answers, or the byte bound
    tokens_basis: tuple[str, ...] = ()
    # provider tokens over the byte bound in cached answers of these prompts (the first role's
    # with any; margin not included), None where none is cached: a caller estimating prompts
    # of the same kind that were never answered (ICL's) can scale its bound by it
    token_ratio: float | None = None


@dataclass
class Plan:
    """One role's work: the key of every prompt, what the cache holds, what must be sent."""

    role: Role
    prompts: list[Prompt]
    keys: list[str]
    found: dict[str, Record]
    misses: list[Prompt]  # one per distinct key, first occurrence
    specs: list[RequestSpec]


def pairs_of(
    task: Task, texts: Sequence[str], texts_b: Sequence[str] | None
) -> list[tuple[str, str | None]]:
    """The (text, text_b) pairs to query, or a ConfigError saying what is wrong with the input."""
    if isinstance(texts, str):
        raise ConfigError("texts must be a sequence of strings, not one string")
    a = list(texts)
    if not a:
        raise ConfigError("texts is empty: give at least one text to query")
    if texts_b is None:
        if task.is_pair:
            raise ConfigError("the template has a {text_b} slot: give texts_b as well")
        b: list[str | None] = [None] * len(a)
    else:
        b = list(texts_b)
        if len(b) != len(a):
            raise ConfigError(f"texts has {len(a)} items but texts_b has {len(b)}")
    for i, t in enumerate(a):
        if not isinstance(t, str):
            raise ConfigError(f"texts[{i}] is a {type(t).__name__}, not a string")
    return list(zip(a, b, strict=True))


def plan_role(
    adapter: Adapter,
    role: Role,
    task: Task,
    pairs: list[tuple[str, str | None]],
    labels: Sequence[Label],
) -> Plan:
    """Every prompt of ``role`` and its cache key; nothing found, nothing to send yet."""
    prompts = [Prompt(i, adapter.prompt(role, task, a, b)) for i, (a, b) in enumerate(pairs)]
    if role != "vectors":  # scores need the content-free prompt, once per task
        empty_b = "" if task.is_pair else None
        prompts.append(Prompt(CONTENT_FREE, adapter.prompt(role, task, "", empty_b)))
    base, path = adapter.endpoint(role)
    fixed = {
        "schema": KEY_SCHEMA,
        "adapter": f"{adapter.name}/{adapter.version}",
        "role": role,
        "url": base.rstrip("/") + path,
        "revision": getattr(adapter, "revision", None),
        "label_token_ids": [list(lab.ids) for lab in labels] if role != "vectors" else [],
    }
    keys = example_keys(
        cache_key(fixed),
        lambda text: adapter.example_body(role, text, labels),
        [p.text for p in prompts],
    )
    return Plan(role, prompts, keys, {}, [], [])


def split(adapter: Adapter, plan: Plan, labels: Sequence[Label]) -> None:
    """Given ``plan.found``, set the misses (each distinct key once) and their requests."""
    seen: set[str] = set()
    misses = []
    for p, k in zip(plan.prompts, plan.keys, strict=True):
        if k not in plan.found and k not in seen:
            seen.add(k)
            misses.append(p)
    plan.misses = misses
    plan.specs = adapter.build_requests(plan.role, misses, labels) if misses else []


def example_keys(
    prefix: str, body_of: Callable[[str], Mapping[str, Any]], texts: Sequence[str]
) -> list[str]:
    """``cache_key({"body": body_of(text), "prefix": prefix})`` for each text, computed fast.

    Every example's body differs only by its prompt, so the canonical JSON of a body with a
    sentinel prompt is split around it once and each key is one string join and one sha256. A few
    examples (first, middle, last) are checked against ``cache_key`` itself, which also validates
    the parts and refuses credential-like names; on any difference every key takes the slow path.
    The cache-hit path is bound by this (10,000 examples: ~0.05 s instead of ~1.5 s).
    """
    if not texts:
        return []

    def slow(text: str) -> str:
        return cache_key({"body": body_of(text), "prefix": prefix})

    sentinel = "\x00dect-maas-prompt\x00"
    template = json.dumps(
        body_of(sentinel), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    marker = json.dumps(sentinel)
    if template.count(marker) != 1:
        return [slow(t) for t in texts]
    head, tail = template.split(marker)
    suffix = f'{tail},"prefix":"{prefix}"}}'
    head = '{"body":' + head
    sha256 = hashlib.sha256

    def fast(text: str) -> str:
        return sha256((head + json.dumps(text) + suffix).encode("ascii")).hexdigest()

    checks = {0, len(texts) // 2, len(texts) - 1}
    if any(fast(texts[i]) != slow(texts[i]) for i in checks):
        return [slow(t) for t in texts]
    return [fast(t) for t in texts]


def meta_key(spec: RequestSpec) -> str:
    """The cache key of a server's answer to its discovery request (what it serves)."""
    return cache_key({"schema": "dect-maas/meta/1", "request": json.loads(spec.to_json())})


def label_key(spec: RequestSpec, adapter: Adapter) -> str:
    """The cache key of a label word's token ids (its tokenize request, per model revision)."""
    return cache_key(
        {
            "schema": "dect-maas/tokenize/1",
            "request": json.loads(spec.to_json()),
            "revision": getattr(adapter, "revision", None),
        }
    )


def worst(adapter: Adapter, spec: RequestSpec) -> Usage:
    """What a request may cost at most: the budget reserves this before it leaves."""
    return Usage(
        queries=len(spec.indices),
        requests=1,
        input_tokens=spec.input_tokens,
        cost_usd=price_for(adapter, spec.role).cost(requests=1, input_tokens=spec.input_tokens),
    )


def actual(adapter: Adapter, spec: RequestSpec, records: Sequence[Record]) -> Usage:
    """What an answered request used: the provider's token counts where every record has one,
    else the request's byte bound."""
    tokens = [t for r in records if isinstance(t := r.get("t"), int)]
    n_tokens = sum(tokens) if len(tokens) == len(records) else spec.input_tokens
    return Usage(
        queries=len(spec.indices),
        requests=1,
        input_tokens=n_tokens,
        cost_usd=price_for(adapter, spec.role).cost(requests=1, input_tokens=n_tokens),
    )


def token_factor(
    adapter: Adapter, plan: Plan, labels: Sequence[Label], sample: int = 200
) -> tuple[float, int] | None:
    """(provider tokens / byte bound, answers used) over up to ``sample`` cached answers of this
    plan that carry the provider's token count, or None when none does."""
    seen = [
        (p, r["t"])
        for p, k in zip(plan.prompts, plan.keys, strict=True)
        if (r := plan.found.get(k)) is not None and isinstance(r.get("t"), int)
    ][:sample]
    if not seen:
        return None
    bound = sum(adapter.build_requests(plan.role, [p], labels)[0].input_tokens for p, _ in seen)
    return (sum(t for _, t in seen) / bound if bound else 1.0), len(seen)


def estimate_of(
    adapter: Adapter, plans: Sequence[Plan], labels: Sequence[Label], assumptions: Sequence[str]
) -> Estimate:
    """The estimate for plans whose ``found`` and requests are set (``split``)."""
    out = dict(queries=0, requests=0, input_tokens=0, cached=0, total=0)
    basis: list[str] = []  # how each role's tokens were counted
    cost = 0.0
    by_role: dict[str, dict[str, int]] = {}
    ratio: float | None = None
    soft = int(getattr(adapter, "soft_rows", 0))  # soft-prompt rows per input, never scaled
    for plan in plans:
        role = plan.role
        factor = token_factor(adapter, plan, labels)
        if factor is not None and ratio is None:
            ratio = factor[0]
        if factor is not None and plan.specs:
            basis.append(
                f"{role}: input tokens scaled from {factor[1]} cached answer(s) of the "
                f"provider (x{factor[0]:.3f} of the byte bound, +{SCALE_MARGIN:.0%} margin)"
            )
        elif plan.specs:
            basis.append(
                f"{role}: input tokens are the byte bound (no cached answer to scale from); "
                "the provider will count fewer, often 3-4x fewer"
            )
        scale = factor[0] * (1 + SCALE_MARGIN) if factor is not None else 1.0
        sizes = [
            min(s.input_tokens, n + math.ceil((s.input_tokens - n) * scale))
            for s in plan.specs
            for n in [soft * len(s.indices)]
        ]
        tokens = sum(sizes)
        row = {
            "queries": len(plan.misses),
            "requests": len(plan.specs),
            "input_tokens": tokens,
            "cached_queries": len(plan.prompts) - len(plan.misses),
        }
        by_role[role] = row
        out["queries"] += row["queries"]
        out["requests"] += row["requests"]
        out["input_tokens"] += tokens
        out["cached"] += row["cached_queries"]
        out["total"] += len(plan.prompts)
        price = price_for(adapter, role)
        cost += sum(price.cost(requests=1, input_tokens=n) for n in sizes)
    return Estimate(
        queries=out["queries"],
        requests=out["requests"],
        input_tokens=out["input_tokens"],
        cost_usd=cost,
        cached_queries=out["cached"],
        total_queries=out["total"],
        assumptions=tuple(assumptions),
        by_role=by_role,
        tokens_basis=tuple(basis),
        token_ratio=ratio,
    )

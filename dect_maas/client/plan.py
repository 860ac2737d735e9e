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
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dect_maas._exceptions import ConfigError
from dect_maas._task import Task
from dect_maas.adapters._base import (
    Adapter,
    Label,
    Prompt,
    RequestSpec,
    Role,
    estimate_tokens,
    price_for,
)

from .budget import Usage
from .cache import cache_key

__all__ = [
    "CONTENT_FREE",
    "COUNT_SAMPLE",
    "KEY_SCHEMA",
    "SCALE_MARGIN",
    "Counted",
    "Estimate",
    "Plan",
    "Record",
    "count_key",
    "count_sample",
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

#: At most this many prompts of a role are counted by the server's tokenizer per estimate; beyond
#: it a seeded sample of them is, and the rest scaled by bytes (sampling error added as margin).
COUNT_SAMPLE = 512


@dataclass(frozen=True)
class Estimate:
    """What ``features`` would send for these texts now, given what is already cached.

    ``queries``/``requests`` are exact. ``input_tokens`` and ``cost_usd`` are counted, per role,
    by the best method available (``tokens_method``): ``"tokenizer"`` (the server's own tokenizer
    route counted the prompts, free), ``"scaled from N cached answers"`` (the byte bound scaled
    by the provider's counts in the cache, +5%), or ``"byte bound"`` (every UTF-8 byte one token:
    the worst case the budget reserves, often 3-4x what is billed). ``assumptions`` lists what
    could not be known without sending (e.g. label token ids never resolved: then nothing is
    counted as cached for scores); ``tokens_basis`` says in words how each role was counted.
    """

    queries: int
    requests: int
    input_tokens: int
    cost_usd: float
    cached_queries: int
    total_queries: int
    assumptions: tuple[str, ...] = ()
    # per role: queries, requests, input_tokens, cached_queries, cost_usd, tokens_method
    by_role: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # per role, in words: how its input tokens were counted
    tokens_basis: tuple[str, ...] = ()
    # provider tokens over the byte bound for these prompts, as counted (tokenizer) or found in
    # cached answers (the first role's with any; margin not included), None where neither: a
    # caller estimating prompts of the same kind that were never counted (ICL's) can scale by it
    token_ratio: float | None = None
    # per role: "tokenizer", "tokenizer (sample of N of M prompts)", "scaled from N cached
    # answers" or "byte bound"
    tokens_method: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Counted:
    """A role's prompts as the server's tokenizer counted them (free requests the client sent).

    ``tokens``: prompt index -> tokens the server bills for it (every miss, or a seeded sample);
    ``overhead``: tokens per request the count does not include (a chat template's role markers
    and default system message where the tokenizer counts text only), learned from a cached
    answer or bounded; ``how``: that overhead's origin, in words (empty when there is none).
    """

    tokens: Mapping[int, int]
    overhead: int = 0
    how: str = ""


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


def count_key(spec: RequestSpec, adapter: Adapter) -> str:
    """The cache key of one prompt's token count (its one-prompt count request, per revision)."""
    return cache_key(
        {
            "schema": "dect-maas/count/1",
            "request": json.loads(spec.to_json()),
            "revision": getattr(adapter, "revision", None),
        }
    )


def count_sample(misses: Sequence[Prompt], limit: int | None = None) -> list[Prompt]:
    """The prompts to count with the tokenizer: all of them, or a sample of ``limit`` (default
    ``COUNT_SAMPLE``) drawn with a fixed seed (the same prompts every time, so a repeated estimate
    finds its counts cached)."""
    limit = COUNT_SAMPLE if limit is None else limit
    if len(misses) <= limit:
        return list(misses)
    picked = sorted(random.Random(0).sample(range(len(misses)), limit))
    return [misses[i] for i in picked]


def _fit(pairs: Sequence[tuple[int, int]], population: int) -> tuple[float, float, float]:
    """Tokens as ``a + b * bytes``, fitted by least squares on a sample of ``pairs`` (bytes,
    tokens) from ``population`` prompts (a constant part, such as a chat template's, is then
    not scaled with the text), and two standard errors of the predicted mean, relative to it:
    (a, b, margin). Fewer than 3 pairs or equal byte counts: the ratio, no intercept."""
    n = len(pairs)
    xs = [float(x) for x, _ in pairs]
    ys = [float(y) for _, y in pairs]
    mean_x, mean_y = (sum(xs) / n, sum(ys) / n) if n else (1.0, 1.0)
    var_x = sum((x - mean_x) ** 2 for x in xs)
    if n < 3 or var_x == 0 or mean_y <= 0:
        return 0.0, (mean_y / mean_x if mean_x else 1.0), 0.0
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var_x
    base = mean_y - slope * mean_x
    if n >= population:
        return base, slope, 0.0
    resid = sum((y - base - slope * x) ** 2 for x, y in zip(xs, ys, strict=True)) / (n - 2)
    return base, slope, 2 * math.sqrt((1 - n / population) * resid / n) / mean_y


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
    adapter: Adapter,
    plans: Sequence[Plan],
    labels: Sequence[Label],
    assumptions: Sequence[str],
    counts: Mapping[str, Counted] | None = None,
    checks: Sequence[RequestSpec] = (),
) -> Estimate:
    """The estimate for plans whose ``found`` and requests are set (``split``); ``counts``: the
    roles whose prompts the server's tokenizer counted (the client asks it, free); ``checks``:
    the embeddings batching check's paid requests, sent before the vectors (tokens scaled as
    the vectors role's)."""
    out = dict(queries=0, requests=0, input_tokens=0, cached=0, total=0)
    basis: list[str] = []  # how each role's tokens were counted
    methods: dict[str, str] = {}
    cost = 0.0
    by_role: dict[str, dict[str, Any]] = {}
    ratio: float | None = None
    soft = int(getattr(adapter, "soft_rows", 0))  # soft-prompt rows per input, never scaled
    for plan in plans:
        role = plan.role
        counted = (counts or {}).get(role)
        factor = token_factor(adapter, plan, labels)
        unscaled = [soft * len(s.indices) for s in plan.specs]
        bound = sum(s.input_tokens for s in plan.specs) - sum(unscaled)  # the text's byte bound
        if counted is not None and plan.specs:
            sizes, method, words = _counted(plan, counted, unscaled)
            basis.append(f"{role}: {words}")
            if ratio is None and bound > 0:
                ratio = (sum(sizes) - sum(unscaled)) / bound
        else:
            if factor is not None and ratio is None:
                ratio = factor[0]
            if factor is not None:
                method = f"scaled from {factor[1]} cached answers"
                words = (
                    f"input tokens scaled from {factor[1]} cached answer(s) of the provider "
                    f"(x{factor[0]:.3f} of the byte bound, +{SCALE_MARGIN:.0%} margin)"
                )
            else:
                method = "byte bound"
                words = (
                    "input tokens are the byte bound (no tokenizer route and no cached answer "
                    "to scale from); the provider will count fewer, often 3-4x fewer"
                )
            if plan.specs:
                basis.append(f"{role}: {words}")
            scale = factor[0] * (1 + SCALE_MARGIN) if factor is not None else 1.0
            sizes = [
                min(s.input_tokens, n + math.ceil((s.input_tokens - n) * scale))
                for s, n in zip(plan.specs, unscaled, strict=True)
            ]
        price = price_for(adapter, role)
        extra = list(checks) if role == "vectors" else []
        if extra:
            scale = (sum(sizes) - sum(unscaled)) / bound if bound > 0 else 1.0
            sizes = [*sizes, *(math.ceil(s.input_tokens * scale) for s in extra)]
            basis.append(
                f"vectors: +{len(extra)} request(s), {sum(len(s.indices) for s in extra)} "
                "queries for the one-time check that the endpoint batches correctly"
            )
        dollars = sum(price.cost(requests=1, input_tokens=n) for n in sizes)
        tokens = sum(sizes)
        methods[role] = method if plan.specs else "cached"
        row: dict[str, Any] = {
            "queries": len(plan.misses) + sum(len(s.indices) for s in extra),
            "requests": len(plan.specs) + len(extra),
            "input_tokens": tokens,
            "cached_queries": len(plan.prompts) - len(plan.misses),
            "cost_usd": dollars,
            "tokens_method": methods[role],
        }
        by_role[role] = row
        out["queries"] += row["queries"]
        out["requests"] += row["requests"]
        out["input_tokens"] += tokens
        out["cached"] += row["cached_queries"]
        out["total"] += len(plan.prompts) + sum(len(s.indices) for s in extra)
        cost += dollars
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
        tokens_method=methods,
    )


def _counted(plan: Plan, counted: Counted, unscaled: Sequence[int]) -> tuple[list[int], str, str]:
    """Each request's tokens from the tokenizer's counts: counted prompts as counted, the rest
    (when only a sample was counted) scaled by bytes with the sampling error as margin; the
    method's name and its description."""
    bytes_of = {p.index: estimate_tokens(p.text) for p in plan.misses}
    pairs = [(bytes_of[i], n) for i, n in counted.tokens.items() if i in bytes_of]
    n_all = len(plan.misses)
    base, slope, margin = _fit(pairs, n_all)

    def tokens(index: int) -> int:
        n = counted.tokens.get(index)
        if n is None:
            n = math.ceil(max(0.0, base + slope * bytes_of[index]) * (1 + margin))
        return n + counted.overhead

    sizes = [
        extra + sum(tokens(i) for i in s.indices)
        for s, extra in zip(plan.specs, unscaled, strict=True)
    ]
    if len(pairs) >= n_all:
        method = "tokenizer"
        words = f"input tokens counted by the server's tokenizer ({n_all} prompt(s))"
    else:
        method = f"tokenizer (sample of {len(pairs)} of {n_all} prompts)"
        words = (
            f"input tokens counted by the server's tokenizer for a seeded sample of {len(pairs)} "
            f"of {n_all} prompts, the rest predicted from their bytes ({base:.1f} + "
            f"{slope:.3f} x bytes, fitted on the sample, +{margin:.1%} for sampling error)"
        )
    if counted.how:
        words += f"; {counted.how}"
    return sizes, method, words

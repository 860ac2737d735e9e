"""From label words to token ids, and from stored answers to ``Features``: pure, no I/O.

The client asks the server for what only it knows (a label word's token ids, the answers) and
hands the results here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dect_maas._exceptions import (
    CensoredScoreWarning,
    MalformedResponse,
    MultiTokenLabelWarning,
    warn,
)
from dect_maas._features import FeatureMeta, Features
from dect_maas._task import Task
from dect_maas.adapters._base import Adapter, Label, RequestSpec, Role

from .plan import Plan

__all__ = ["LabelLookup", "assemble", "label_lookups", "labels_of", "per_class"]


@dataclass(frozen=True)
class LabelLookup:
    """A label word and its token ids where the adapter knows them; else the tokenize request
    that finds them (``spec``), or neither (matched by string, or not needed)."""

    word: str
    ids: tuple[int, ...] | None
    spec: RequestSpec | None


def label_lookups(adapter: Adapter, task: Task, roles: Sequence[Role]) -> list[LabelLookup]:
    """What must be known about each label word, in the task's order (none for vectors only)."""
    if not any(r != "vectors" for r in roles):
        return []
    need = any(adapter.needs_label_ids(r) for r in roles if r != "vectors")
    out = []
    for word in (w for ws in task.label_strings() for w in ws):
        known = adapter.known_label_ids(word)
        spec = adapter.tokenize_request(word) if known is None and need else None
        out.append(LabelLookup(word, None if known is None else tuple(known), spec))
    return out


def labels_of(words_ids: Sequence[tuple[str, Sequence[int] | None]]) -> tuple[Label, ...]:
    """Labels from (word, ids) pairs; warns once about words that span several tokens."""
    labels = tuple(Label(word, tuple(ids or ())) for word, ids in words_ids)
    multi = [lab for lab in labels if lab.multi_token]
    if multi:
        warn(
            MultiTokenLabelWarning,
            "label word(s) "
            + ", ".join(f"{lab.text!r} ({len(lab.ids)} tokens)" for lab in multi)
            + " span several tokens: only the first token of each is scored (DecT §2.2); "
            "pick single-token words to avoid this",
        )
    return labels


def assemble(
    adapter: Adapter,
    task: Task,
    roles: Sequence[Role],
    plans: Sequence[Plan],
    labels: Sequence[Label],
    n: int,
) -> Features:
    """``Features`` for the first ``n`` prompts of each plan, every one of them found."""
    scores = censored = hidden = content_free = content_free_hidden = None
    fingerprint: str | None = None
    score_kind = "none"
    hidden_kind = ""
    sizes = [len(ws) for _, ws in task.label_words]
    for plan in plans:
        records = [plan.found[k] for k in plan.keys]
        if plan.role != "vectors":
            flat = np.asarray([r["s"] for r in records], dtype=np.float64)  # (N+1, L)
            cen = np.asarray(
                [r["c"] if r.get("c") is not None else [False] * len(labels) for r in records],
                dtype=bool,
            )  # (N+1, L)
            by_class, cen_class = per_class(flat, cen, sizes)  # (N+1, C) each
            scores, censored = by_class[:n], cen_class[:n]
            content_free = by_class[n]
            score_kind = adapter.capabilities(plan.role).score_kind
            fingerprint = fingerprint or next((r["fp"] for r in records if r.get("fp")), None)
        if plan.role != "scores":
            vectors = [np.asarray(r["h"], dtype=np.float32) for r in records[:n]]
            if len({v.shape for v in vectors}) > 1:
                raise MalformedResponse(
                    f"{adapter.provider} returned vectors of different sizes "
                    f"{sorted({v.shape[0] for v in vectors})}"
                )
            hidden = np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)  # (N, D)
            hidden_kind = adapter.hidden_kind(plan.role)
            if len(records) > n:  # the content-free prompt's vector: a reference point
                content_free_hidden = np.asarray(records[n]["h"], dtype=np.float32)  # (D,)
    if censored is not None and censored.any():
        share = float(censored.mean())
        warn(
            CensoredScoreWarning,
            f"{share:.1%} of label-word scores fell outside the provider's top-k and are "
            "upper bounds (marked in Features.censored); exact token logprobs avoid this",
        )
    extra = {
        **adapter.extra_meta(),
        "roles": list(roles),
        "label_words": [lab.text for lab in labels],
        "label_token_rule": "first",
        "multi_token_labels": {lab.text: list(lab.ids) for lab in labels if lab.multi_token},
    }
    ids: list[tuple[int, ...]] = []
    it = iter(labels)
    for size in sizes:
        ids.append(
            tuple(lab.first for lab in (next(it) for _ in range(size)) if lab.first is not None)
            if labels
            else ()
        )
    meta = FeatureMeta(
        provider=adapter.provider,
        model=adapter.model,
        revision=fingerprint or getattr(adapter, "revision", None),
        template=task.template,
        classes=task.classes,
        label_token_ids=tuple(ids),
        score_kind=score_kind,  # type: ignore[arg-type]
        hidden_kind=hidden_kind,
        extra=extra,
    )
    return Features(
        scores,
        hidden,
        censored if censored is not None and censored.any() else None,
        content_free,
        meta,
        content_free_hidden,
    )


def per_class(
    flat: np.ndarray[Any, Any], cen: np.ndarray[Any, Any], sizes: Sequence[int]
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Max over each class's label words (DecT §2.2); censored if the max is an upper bound."""
    out_s, out_c = [], []
    start = 0
    for size in sizes:
        block = flat[:, start : start + size]  # (N, W)
        best = block.argmax(axis=1)  # (N,)
        rows = np.arange(flat.shape[0])
        out_s.append(block[rows, best])
        out_c.append(cen[:, start : start + size][rows, best])
        start += size
    return np.stack(out_s, axis=1), np.stack(out_c, axis=1)

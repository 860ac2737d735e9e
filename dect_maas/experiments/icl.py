"""In-context learning (ICL): the k-shot set written into every test prompt, scored like zero-shot.

Each test prompt is ``demo_1 SEP demo_2 SEP ... demo_m SEP prompt(x)``, where ``demo_j`` is the
task's template filled with a training shot and its class's first label word at the scoring
position, and ``prompt(x)`` is the ordinary zero-shot prompt of the test input. The order of the
demonstrations is the k-shot set shuffled by ``numpy.random.RandomState(seed)`` (the seed of the
k-shot set), the same order for every test input. The label-word scores at the end are read as in
zero-shot: raw (``icl``) or calibrated by the content-free prompt *with the same demonstrations*
(``calibrated_icl``, contextual calibration after Zhao et al. 2021).

A prompt that would exceed ``icl.max_prompt_tokens`` (counted with the budget's worst-case
estimate, one token per UTF-8 byte) loses demonstrations from the front, the ones farthest from
the test input, until it fits; how many were kept is reported. The prompts go through the same
client, cache, budget and ledger as every other query, so ICL's cost is what the ledger records:
no training queries, and the demonstrations' tokens on every prediction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dect_maas._metrics import accuracy, macro_f1
from dect_maas._task import Task
from dect_maas.client.client import Client

from .report import MethodRun
from .shot_set import ShotSet, Split, scaled_tokens

__all__ = [
    "ICLTask",
    "demonstration",
    "demonstration_order",
    "demonstrations_kept",
    "estimate_icl",
    "icl_prompts",
    "run_icl",
]

ICL_METHODS = ("icl", "calibrated_icl")
_SENTINEL = "\x00dect-maas-label\x00"


@dataclass(frozen=True)
class ICLTask(Task):
    """A Task whose every prompt (content-free one included) starts with fixed demonstrations.

    A subclass rather than a longer template: demonstration texts may hold braces, which a
    template would read as placeholders.
    """

    demonstrations: str = ""

    def render(self, text: str, text_b: str | None = None, *, mask_token: str | None = None) -> str:
        return self.demonstrations + super().render(text, text_b, mask_token=mask_token)


def demonstration(task: Task, text: str, text_b: str | None, cls: str) -> str:
    """The template filled with ``text`` and ``cls``'s first label word at the scoring position."""
    word = task.label_word_prefix + task.words(cls)[0]
    if not task.has_mask:
        return task.render(text, text_b) + word
    left, right = task.render(text, text_b, mask_token=_SENTINEL).split(_SENTINEL)
    return left.rstrip(" ") + word + right


def demonstration_order(indices: Sequence[int], seed: int) -> list[int]:
    """The k-shot set's pool indices in demonstration order: shuffled by RandomState(seed)."""
    perm = np.random.RandomState(seed).permutation(len(indices))
    return [int(indices[i]) for i in perm]


def _tokens(text: str) -> int:
    # The budget's worst case (one token per UTF-8 byte, no specials): never under the truth
    # for byte-level BPE, so a prompt cut to fit is never truncated by the provider.
    return len(text.encode("utf-8"))


def demonstrations_kept(demos: Sequence[str], sep: str, prompt: str, limit: int | None) -> int:
    """How many demonstrations (the last ones) fit before ``prompt`` within ``limit`` tokens."""
    if limit is None:
        return len(demos)
    room = limit - _tokens(prompt) - 4  # + a few special tokens, as estimate_tokens
    kept = 0
    for d in reversed(demos):
        cost = _tokens(d + sep)
        if cost > room:
            break
        room -= cost
        kept += 1
    return kept


@dataclass(frozen=True)
class ICLPrompts:
    """What ICL sends for one k-shot set: per number of demonstrations kept, its task and rows."""

    n_test: int
    demonstrations: int
    kept: list[int]  # per test row, demonstrations kept
    groups: dict[int, tuple[ICLTask, list[int]]]

    def inputs(self, test: Split, rows: list[int]) -> tuple[list[str], list[str] | None]:
        texts_b = None if test.texts_b is None else [test.texts_b[j] for j in rows]
        return [test.texts[j] for j in rows], texts_b


def icl_prompts(shot_set: ShotSet) -> ICLPrompts:
    """The demonstrations of ``shot_set`` in order, cut per test row to ``max_prompt_tokens``."""
    section = shot_set.config.icl
    task, train, test = shot_set.task, shot_set.train, shot_set.test
    n_test = shot_set.n_test(section.test_limit)
    order = demonstration_order(shot_set.train_indices, shot_set.seed)
    demos = [
        demonstration(
            task,
            train.texts[i],
            None if train.texts_b is None else train.texts_b[i],
            train.labels[i],
        )
        for i in order
    ]
    sep = section.separator
    # What the longest scoring prompt of each test input is: the zero-shot prompt rendered for a
    # causal LM (a mask token, where used, is shorter than any label word).
    kept = []
    for j in range(n_test):
        b = None if test.texts_b is None else test.texts_b[j]
        prompt = task.render(test.texts[j], b, mask_token="" if task.has_mask else None)
        kept.append(demonstrations_kept(demos, sep, prompt, section.max_prompt_tokens))
    rows_of: dict[int, list[int]] = {}
    for j, m in enumerate(kept):
        rows_of.setdefault(m, []).append(j)
    groups = {}
    for m, rows in sorted(rows_of.items()):
        used = demos[len(demos) - m :] if m else []
        itask = ICLTask(
            task.template,
            task.label_words,
            name=task.name,
            label_word_prefix=task.label_word_prefix,
            demonstrations="".join(d + sep for d in used),
        )
        groups[m] = (itask, rows)
    return ICLPrompts(n_test, len(demos), kept, groups)


def estimate_icl(shot_set: ShotSet, client: Client, ratio: float | None = None) -> dict[str, Any]:
    """What ``run_icl`` on ``shot_set`` would send and cost (both ICL methods share it).

    ``ratio``: provider tokens over the byte bound from the run's cached answers, applied to
    prompts never answered before (see ``scaled_tokens``).
    """
    plan = icl_prompts(shot_set)
    total = dict.fromkeys(("queries", "queries_to_pay", "requests", "input_tokens"), 0)
    cost = 0.0
    for itask, rows in plan.groups.values():
        texts, texts_b = plan.inputs(shot_set.test, rows)
        est = client.estimate(itask, texts, texts_b=texts_b)
        total["queries"] += est.total_queries
        total["queries_to_pay"] += est.queries
        total["requests"] += est.requests
        tokens, dollars = scaled_tokens(est, ratio)
        total["input_tokens"] += tokens
        cost += dollars
    paid = total["queries_to_pay"]
    return {
        **total,
        "train_queries": 0,
        "cost_usd": cost,
        "tokens_per_prediction": total["input_tokens"] / paid if paid else None,
        "n_test": plan.n_test,
    }


def run_icl(shot_set: ShotSet, methods: Sequence[str]) -> list[MethodRun]:
    """Query the ICL prompts of one k-shot set and score them; one MethodRun per ICL method."""
    # torch, loaded only when an ICL method runs
    from dect_maas.decoders.baselines import ZeroShotClassifier

    task, test = shot_set.task, shot_set.test
    train_indices, shots, seed = shot_set.train_indices, shot_set.shots, shot_set.seed
    plan = icl_prompts(shot_set)
    n_test, kept = plan.n_test, plan.kept
    groups = {m: rows for m, (_, rows) in plan.groups.items()}
    scores: dict[str, list[str]] = {m: [""] * n_test for m in methods}
    run_id = shot_set.run_id
    client = shot_set.client()
    try:
        before = client.ledger.summary(run_id)
        tq = time.perf_counter()
        feats = {}
        for m, (itask, rows) in plan.groups.items():
            texts, texts_b = plan.inputs(test, rows)
            feats[m] = client.features(itask, texts, texts_b=texts_b, progress=shot_set.progress)
        query_s = time.perf_counter() - tq
        after = client.ledger.summary(run_id)
    finally:
        client.close()

    runs = []
    labels = test.labels[:n_test]
    for method in methods:
        tf = time.perf_counter()
        for m, rows in groups.items():
            clf = ZeroShotClassifier(calibration="auto" if method == "calibrated_icl" else "none")
            pred = clf.fit(feats[m]).predict(feats[m])
            for j, p in zip(rows, pred, strict=True):
                scores[method][j] = str(p)
        fit_s = time.perf_counter() - tf
        paid = after.queries_paid - before.queries_paid
        tokens = after.input_tokens - before.input_tokens
        cost = {
            "train_queries": 0,
            "queries": n_test + len(groups),  # test prompts + one content-free per group
            "queries_paid": paid,
            "cache_hits": after.cache_hits - before.cache_hits,
            "requests": after.requests - before.requests,
            "input_tokens": tokens,
            "cost_usd": after.cost_usd - before.cost_usd,
            "query_seconds": query_s,
            "tokens_per_prediction": tokens / paid if paid else None,
            "n_test": n_test,
            "demonstrations": plan.demonstrations,
            "demonstrations_kept_mean": float(np.mean(kept)),
            "demonstrations_kept_min": int(min(kept)),
            "prompts_cut": int(sum(1 for m in kept if m < plan.demonstrations)),
        }
        runs.append(
            MethodRun(
                method=method,
                shots=shots,
                seed=seed,
                accuracy=float(accuracy(labels, scores[method])),
                macro_f1=float(macro_f1(labels, scores[method], labels=list(task.classes))),
                fit_seconds=0.0,
                predict_seconds=fit_s,
                n_train=len(train_indices),
                cost=cost,
            )
        )
    return runs

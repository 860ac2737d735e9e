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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from dect_maas._metrics import accuracy, macro_f1
from dect_maas._task import Task

from .report import MethodRun

__all__ = ["ICLTask", "demonstration", "demonstration_order", "demonstrations_kept"]

ICL_METHODS = ("icl", "calibrated_icl")
_SENTINEL = "\x00dect-maas-label\x00"


class _Split(Protocol):
    texts: list[str]
    texts_b: list[str] | None
    labels: list[str]


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


def run_icl(
    *,
    config: Any,
    run_id: str,
    client_factory: Callable[[Any, str], Any],
    task: Task,
    train: _Split,
    test: _Split,
    train_indices: Sequence[int],
    shots: int,
    seed: int,
    methods: Sequence[str],
    progress: bool = False,
) -> list[Any]:
    """Query the ICL prompts of one k-shot set and score them; one MethodRun per ICL method."""
    # torch, loaded only when an ICL method runs
    from dect_maas.decoders.baselines import ZeroShotClassifier

    section = config.icl
    n_test = (
        len(test.texts) if section.test_limit is None else min(section.test_limit, len(test.texts))
    )
    order = demonstration_order(train_indices, seed)
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
    groups: dict[int, list[int]] = {}
    for j, m in enumerate(kept):
        groups.setdefault(m, []).append(j)

    scores: dict[str, list[str]] = {m: [""] * n_test for m in methods}
    client = client_factory(config, run_id)
    try:
        before = client.ledger.summary(run_id)
        tq = time.perf_counter()
        feats = {}
        for m, rows in sorted(groups.items()):
            used = demos[len(demos) - m :] if m else []
            itask = ICLTask(
                task.template,
                task.label_words,
                name=task.name,
                label_word_prefix=task.label_word_prefix,
                demonstrations="".join(d + sep for d in used),
            )
            feats[m] = client.features(
                itask,
                [test.texts[j] for j in rows],
                texts_b=None if test.texts_b is None else [test.texts_b[j] for j in rows],
                progress=progress,
            )
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
            "demonstrations": len(demos),
            "demonstrations_kept_mean": float(np.mean(kept)),
            "demonstrations_kept_min": int(min(kept)),
            "prompts_cut": int(sum(1 for m in kept if m < len(demos))),
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

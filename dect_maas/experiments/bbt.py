"""Black-Box Tuning (BBT; Sun et al., "Black-Box Tuning for Language-Model-as-a-Service", 2022).

A continuous prompt of ``L`` vectors is prepended to every input's token embeddings. It is never
searched directly: ``prompt = (A z).reshape(L, H)`` with a fixed random projection ``A`` of shape
``(L·H, d)`` and a low-dimensional ``z`` (``d`` = 500) found by CMA-ES on the training shots'
loss (cross-entropy or hinge over the label-word scores). As in the BBT code, ``A`` is normal with
standard deviation ``std(word embeddings) / (sqrt(d) · sigma)`` and ``z`` starts at 0 (a zero
prompt). One *call* is one candidate prompt evaluated on all the shots, one request; the CMA-ES
loop stops when ``budget`` calls have been made. Every call goes through the client, so the
ledger counts it (the client adds the content-free prompt to each request: ``k·C + 1`` queries
a call), the budget can stop it, and a re-run is answered from the cache.

CMA-ES is the ``cma`` package (``pip install 'dect-maas[bbt]'``), not a home-made one. Soft
prompts need a provider that declares them: this project's server with a causal LM does (see
``providers/dect_maas_server/soft_prompt.py``); anything else is refused before a query is paid.
"""

from __future__ import annotations

import base64
import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from dect_maas._exceptions import ConfigError, UnsupportedCapability
from dect_maas._metrics import accuracy, macro_f1
from dect_maas._task import Task

from .report import MethodRun

__all__ = ["bbt_loss", "random_projection", "run_bbt"]

FloatArray = npt.NDArray[np.float64]


class _Split(Protocol):
    texts: list[str]
    texts_b: list[str] | None
    labels: list[str]


def bbt_loss(scores: FloatArray, y: npt.NDArray[np.int64], kind: str) -> float:
    """The loss of one candidate on the shots: ``scores`` (N, C) label scores, ``y`` (N,).

    ``ce``: mean softmax cross-entropy over the C class scores. ``hinge``: torch's
    MultiMarginLoss (margin 1): mean over examples of sum_{c != y} max(0, 1 - s_y + s_c) / C.
    """
    s = scores - scores.max(axis=1, keepdims=True)  # (N, C), stable
    n, c = s.shape
    if kind == "ce":
        log_p = s - np.log(np.exp(s).sum(axis=1, keepdims=True))  # (N, C)
        return float(-log_p[np.arange(n), y].mean())
    margin = np.maximum(0.0, 1.0 - s[np.arange(n), y][:, None] + s)  # (N, C)
    margin[np.arange(n), y] = 0.0
    return float((margin.sum(axis=1) / c).mean())


def random_projection(
    length: int, hidden: int, dim: int, *, std: float, kind: str, seed: int
) -> npt.NDArray[np.float32]:
    """The fixed ``A`` (L·H, d): normal(0, std), or uniform with the same standard deviation."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        a = rng.standard_normal((length * hidden, dim), dtype=np.float32)
    else:  # uniform on [-sqrt(3), sqrt(3)] has unit variance
        a = rng.uniform(-np.sqrt(3.0), np.sqrt(3.0), (length * hidden, dim)).astype(np.float32)
    a *= np.float32(std)
    return a


def _encode(prompt: npt.NDArray[np.float32]) -> str:
    return base64.b64encode(np.ascontiguousarray(prompt, dtype="<f4").tobytes()).decode("ascii")


def _cma() -> Any:
    try:
        return importlib.import_module("cma")
    except ImportError:
        raise ConfigError(
            "method bbt needs the cma package (CMA-ES): pip install 'dect-maas[bbt]'"
        ) from None


def check_bbt(config: Any, client_factory: Callable[[Any, str], Any], run_id: str) -> Any:
    """The discovered adapter, or a refusal before any query: no cma, or no soft-prompt input.

    Asking the server what it serves (``GET /v1/models``) is free; nothing billed is sent.
    """
    _cma()
    if config.provider.kind != "local":
        raise UnsupportedCapability(
            f"method bbt needs a soft-prompt input, which the {config.provider.kind} provider "
            "does not declare (only dect-maas-server with a causal LM does). Nothing was sent."
        )
    client = client_factory(config, run_id)
    try:
        adapter = client._run(client._discover())
    finally:
        client.close()
    if getattr(adapter, "soft_prompt", None) is None:
        raise UnsupportedCapability(
            f"method bbt: the server at {config.provider.base_url} declares no soft-prompt "
            "input (prompt_embeds in /v1/models); it needs dect-maas-server with a causal LM. "
            "Nothing was sent."
        )
    return adapter


def run_bbt(
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
    progress: bool = False,
) -> Any:
    """Optimise z on one k-shot set within ``bbt.budget`` calls; evaluate the best prompt."""
    b = config.bbt
    cma = _cma()
    adapter = check_bbt(config, client_factory, run_id)
    classes = list(task.classes)
    shot_texts = [train.texts[i] for i in train_indices]
    shot_b = None if train.texts_b is None else [train.texts_b[i] for i in train_indices]
    y = np.asarray([classes.index(train.labels[i]) for i in train_indices], dtype=np.int64)
    n_test = len(test.texts) if b.test_limit is None else min(b.test_limit, len(test.texts))
    test_texts = test.texts[:n_test]
    test_b = None if test.texts_b is None else test.texts_b[:n_test]

    soft = adapter.soft_prompt
    client = client_factory(config, run_id)
    try:
        client.adapter = adapter  # discovered once: kind and revision now stated
        hidden = int(soft["hidden_size"])
        std = float(soft["embedding_std"]) / (np.sqrt(b.intrinsic_dim) * b.sigma)
        a = random_projection(
            b.prompt_length, hidden, b.intrinsic_dim, std=std, kind=b.random_projection, seed=b.seed
        )  # (L·H, d)

        def prompt_of(z: FloatArray) -> str:
            return _encode((a @ z.astype(np.float32)).reshape(b.prompt_length, hidden))  # (L, H)

        query_s = 0.0

        def scores_with(z: FloatArray, texts: list[str], texts_b: list[str] | None) -> FloatArray:
            nonlocal query_s
            client.adapter = replace(adapter, prompt_embeds=prompt_of(z))
            t = time.perf_counter()
            f = client.features(task, texts, texts_b=texts_b)
            query_s += time.perf_counter() - t
            assert f.scores is not None
            return np.asarray(f.scores, dtype=np.float64)  # (N, C)

        def test_accuracy(z: FloatArray) -> float:
            s = scores_with(z, test_texts, test_b)
            pred = [classes[i] for i in s.argmax(axis=1)]
            return float(accuracy(test.labels[:n_test], pred))

        before = client.ledger.summary(run_id)
        t0 = time.perf_counter()
        es = cma.CMAEvolutionStrategy(
            b.intrinsic_dim * [0.0],
            b.sigma,
            inopts={"popsize": b.popsize, "seed": b.seed + 1, "verbose": -9},
        )
        calls = 0
        best_z = np.zeros(b.intrinsic_dim)
        best_loss, best_acc = float("inf"), 0.0
        curve: list[dict[str, Any]] = []
        next_eval = b.curve_every or None
        # what the curve's test evaluations cost, kept out of the training cost
        evals: dict[str, Any] = dict.fromkeys(
            ("requests", "queries_paid", "input_tokens", "cost_usd"), 0
        )
        eval_s = eval_query_s = 0.0
        while calls < b.budget:
            candidates = es.ask()[: b.budget - calls]
            losses = []
            for z in candidates:
                s = scores_with(np.asarray(z), shot_texts, shot_b)
                loss = bbt_loss(s, y, b.loss)
                losses.append(loss)
                calls += 1
                if loss < best_loss:
                    best_loss = loss
                    best_acc = float((s.argmax(axis=1) == y).mean())
                    best_z = np.asarray(z, dtype=np.float64).copy()
            if len(candidates) == b.popsize:
                es.tell(candidates, losses)
            point: dict[str, Any] = {"calls": calls, "train_loss": best_loss, "train_acc": best_acc}
            if next_eval is not None and calls >= next_eval:
                next_eval += b.curve_every
                s0 = client.ledger.summary(run_id)
                point["train_input_tokens"] = (
                    s0.input_tokens - before.input_tokens - evals["input_tokens"]
                )
                point["train_cost_usd"] = s0.cost_usd - before.cost_usd - evals["cost_usd"]
                te, tq = time.perf_counter(), query_s
                point["test_accuracy"] = test_accuracy(best_z)
                eval_s += time.perf_counter() - te
                eval_query_s += query_s - tq
                s1 = client.ledger.summary(run_id)
                for key in evals:
                    evals[key] += getattr(s1, key) - getattr(s0, key)
            curve.append(point)
        fit_s = time.perf_counter() - t0 - eval_s
        train_query_s = query_s - eval_query_s
        trained = client.ledger.summary(run_id)
        tp = time.perf_counter()
        s_test = scores_with(best_z, test_texts, test_b)
        pred_s = time.perf_counter() - tp
        after = client.ledger.summary(run_id)
    finally:
        client.close()

    pred = [classes[i] for i in s_test.argmax(axis=1)]
    test_paid = after.queries_paid - trained.queries_paid
    test_tokens = after.input_tokens - trained.input_tokens
    cost = {
        "calls": calls,
        "train_queries": trained.queries_paid - before.queries_paid - evals["queries_paid"],
        # paid + answered from the cache (a content-free prompt another k-shot set already paid)
        "train_queries_asked": calls * (len(train_indices) + 1),
        "train_requests": trained.requests - before.requests - evals["requests"],
        "train_input_tokens": trained.input_tokens - before.input_tokens - evals["input_tokens"],
        "train_cost_usd": trained.cost_usd - before.cost_usd - evals["cost_usd"],
        "curve_eval_queries": evals["queries_paid"],
        "queries": after.queries_paid - before.queries_paid + after.cache_hits - before.cache_hits,
        "queries_paid": after.queries_paid - before.queries_paid,
        "cache_hits": after.cache_hits - before.cache_hits,
        "requests": after.requests - before.requests,
        "input_tokens": after.input_tokens - before.input_tokens,
        "cost_usd": after.cost_usd - before.cost_usd,
        "train_query_seconds": train_query_s,
        "train_local_seconds": fit_s - train_query_s,
        "query_seconds": query_s,
        "curve_eval_seconds": eval_s,
        # over every paid test evaluation (the final one may repeat the curve's last, cached)
        "tokens_per_prediction": (evals["input_tokens"] + test_tokens)
        / (evals["queries_paid"] + test_paid)
        if evals["queries_paid"] + test_paid
        else None,
        "n_test": n_test,
        "best_train_loss": best_loss,
        "best_train_accuracy": best_acc,
        "curve": curve,
    }
    return MethodRun(
        method="bbt",
        shots=shots,
        seed=seed,
        accuracy=float(accuracy(test.labels[:n_test], pred)),
        macro_f1=float(macro_f1(test.labels[:n_test], pred, labels=classes)),
        fit_seconds=fit_s,
        predict_seconds=pred_s,
        n_train=len(train_indices),
        cost=cost,
    )

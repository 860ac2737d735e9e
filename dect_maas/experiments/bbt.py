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
import json
import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from dect_maas._exceptions import ConfigError, UnsupportedCapability
from dect_maas._metrics import accuracy, macro_f1
from dect_maas.adapters._base import Adapter
from dect_maas.adapters.local import LocalAdapter
from dect_maas.client.client import Client

from .config_file import ExperimentConfig
from .report import MethodRun
from .shot_set import ClientFactory, ShotSet, scaled_tokens

__all__ = ["bbt_loss", "estimate_bbt", "random_projection", "run_bbt"]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


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


def check_bbt(config: ExperimentConfig, client_factory: ClientFactory, run_id: str) -> LocalAdapter:
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
        adapter = client.discover()
    finally:
        client.close()
    if not isinstance(adapter, LocalAdapter) or adapter.soft_prompt is None:
        raise UnsupportedCapability(
            f"method bbt: the server at {config.provider.base_url} declares no soft-prompt "
            "input (prompt_embeds in /v1/models); it needs dect-maas-server with a causal LM. "
            "Nothing was sent."
        )
    return adapter


def estimate_bbt(shot_set: ShotSet, client: Client, ratio: float | None = None) -> dict[str, Any]:
    """What ``run_bbt`` on ``shot_set`` would send and cost at its full budget; sends nothing.

    Every call is one request over the shots and the content-free prompt, each input also billed
    the prompt's ``L`` rows; the curve's test evaluations and the final one come on top. Nothing
    counts as cached: a re-run that replays a finished run from the cache pays less. A test
    evaluation pays the test rows only (the content-free prompt with the best candidate was paid
    in training), and a curve point whose best candidate has not changed is free: the estimate
    counts every point, so it errs high. ``ratio``: as in ``estimate_icl``.
    """
    b = shot_set.config.bbt
    task, train = shot_set.task, shot_set.train
    notes: list[str] = []

    def variant(adapter: Adapter) -> Adapter:
        if not isinstance(adapter, LocalAdapter):
            return adapter  # refused by check_bbt before the run; counted as plain requests
        soft = adapter.soft_prompt
        hidden = soft.get("hidden_size") if soft is not None else None
        if not isinstance(hidden, int):  # the server was never asked: L rows of width 1
            notes.append(f"soft prompt taken as {b.prompt_length} tokens per input")
            soft, hidden = {"hidden_size": 1}, 1
        zeros = np.zeros((b.prompt_length, hidden), dtype=np.float32)
        return replace(adapter, soft_prompt=soft, prompt_embeds=_encode(zeros))

    idx = shot_set.train_indices
    shots = client.estimate(
        task,
        [train.texts[i] for i in idx],
        texts_b=None if train.texts_b is None else [train.texts_b[i] for i in idx],
        variant=variant,
    )
    n_test = shot_set.n_test(b.test_limit)
    test = client.estimate(
        task,
        shot_set.test.texts[:n_test],
        texts_b=None if shot_set.test.texts_b is None else shot_set.test.texts_b[:n_test],
        variant=variant,
    )
    # curve points at the first generation boundary past each multiple of curve_every; the
    # final evaluation repeats the last point's prompt (answered from the cache) when it falls
    # on the budget's last call
    n_curve, at_end = 0, False
    if b.curve_every:
        calls, next_eval = 0, b.curve_every
        while calls < b.budget:
            calls = min(calls + b.popsize, b.budget)
            at_end = calls >= next_eval
            if at_end:
                n_curve += 1
                next_eval += b.curve_every
    final = 0 if at_end else 1
    evals = n_curve + final
    per_call = shots.total_queries
    call_tokens, call_usd = scaled_tokens(shots, ratio, b.prompt_length * per_call)
    eval_tokens, eval_usd = scaled_tokens(test, ratio, b.prompt_length * test.total_queries)
    per_eval = test.total_queries - 1  # its content-free prompt was paid in training
    eval_tokens = eval_tokens * per_eval // max(1, test.total_queries)
    eval_usd = eval_usd * per_eval / max(1, test.total_queries)
    return {
        "calls": b.budget,
        "train_queries": b.budget * per_call,
        "train_requests": b.budget * shots.requests,
        "train_input_tokens": b.budget * call_tokens,
        "train_cost_usd": b.budget * call_usd,
        "test_evaluations": evals,
        "queries": b.budget * per_call + evals * per_eval,
        "queries_to_pay": b.budget * per_call + evals * per_eval,
        "requests": b.budget * shots.requests + evals * test.requests,
        "input_tokens": b.budget * call_tokens + evals * eval_tokens,
        "cost_usd": b.budget * call_usd + evals * eval_usd,
        "tokens_per_prediction": eval_tokens / per_eval if per_eval else None,
        "n_test": n_test,
        "notes": sorted(set(notes)),
    }


def run_bbt(shot_set: ShotSet) -> MethodRun:
    """Optimise z on one k-shot set within ``bbt.budget`` calls; evaluate the best prompt."""
    config, run_id = shot_set.config, shot_set.run_id
    task, train, test = shot_set.task, shot_set.train, shot_set.test
    train_indices, shots, seed = shot_set.train_indices, shot_set.shots, shot_set.seed
    b = config.bbt
    cma = _cma()
    adapter = check_bbt(config, shot_set.client_factory, run_id)
    classes = list(task.classes)
    shot_texts = [train.texts[i] for i in train_indices]
    shot_b = None if train.texts_b is None else [train.texts_b[i] for i in train_indices]
    y = np.asarray([classes.index(train.labels[i]) for i in train_indices], dtype=np.int64)
    n_test = shot_set.n_test(b.test_limit)
    test_texts = test.texts[:n_test]
    test_b = None if test.texts_b is None else test.texts_b[:n_test]

    soft = adapter.soft_prompt
    assert soft is not None  # check_bbt refused a server without one
    client = shot_set.client()
    try:
        hidden = int(soft["hidden_size"])
        std = float(soft["embedding_std"]) / (np.sqrt(b.intrinsic_dim) * b.sigma)
        a = random_projection(
            b.prompt_length, hidden, b.intrinsic_dim, std=std, kind=b.random_projection, seed=b.seed
        )  # (L·H, d)

        def prompt_of(z: FloatArray) -> str:
            return _encode((a @ z.astype(np.float32)).reshape(b.prompt_length, hidden))  # (L, H)

        query_s = 0.0

        def scores_of(
            zs: list[FloatArray], texts: list[str], b_: list[str] | None
        ) -> list[FloatArray]:
            """Each candidate's (N, C) label scores; up to ``concurrency`` requests in flight."""
            nonlocal query_s
            variants = [replace(adapter, prompt_embeds=prompt_of(z)) for z in zs]
            t = time.perf_counter()
            feats = client.features_each(variants, task, texts, texts_b=b_)
            query_s += time.perf_counter() - t
            out = []
            for f in feats:
                assert f.scores is not None
                out.append(np.asarray(f.scores, dtype=np.float64))
            return out

        def scores_with(z: FloatArray, texts: list[str], texts_b: list[str] | None) -> FloatArray:
            return scores_of([z], texts, texts_b)[0]

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
            step = b.concurrency or b.popsize
            for i in range(0, len(candidates), step):
                zs = [np.asarray(z) for z in candidates[i : i + step]]
                for z, s in zip(zs, scores_of(zs, shot_texts, shot_b), strict=True):
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
            # one line a generation: a run cut short still shows how far it got (its paid calls
            # stay in the cache, so the same run started again replays them for free)
            logger.info(
                "bbt %s", json.dumps({**point, "seconds": round(time.perf_counter() - t0, 1)})
            )
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

"""Every method's cost on one footing, and accuracy against dollars (or tokens when unpriced).

DecT-like methods (``dect``, ``auto_dect``, the baselines) share one set of features: training one
costs its ``k·C + 1`` queries (the shots and the content-free prompt; plain zero-shot none), at
the run's average input tokens, dollars and seconds per query as the ledger recorded them;
predicting costs one query per example. Input-side methods carry their own ledger deltas
(``MethodRun.cost``): ICL trains nothing and pays its demonstrations on every prediction; BBT pays
``budget`` calls of ``k·C + 1`` queries to train (counted as asked: a content-free prompt paid by
an earlier k-shot set is a cache hit), then one soft-prompted query per prediction.

Predicting ``predict_n`` new examples is priced as ``predict_n × tokens per prediction`` at the
provider's price per input token, plus its price per request for ``ceil(predict_n / B)``
requests, ``B`` being ``provider.max_prompts_per_request`` (1 when unset: the worst case).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import plots

if TYPE_CHECKING:
    from .runner import ExperimentResult

__all__ = ["INPUT_SIDE", "cost_rows", "cost_table", "plot_accuracy_vs_cost"]

INPUT_SIDE = frozenset({"icl", "calibrated_icl", "bbt"})
_TRAINING_QUERIES = {"zero_shot": 0, "calibrated_zero_shot": 1}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def cost_rows(result: ExperimentResult) -> list[dict[str, Any]]:
    """One row per (method, shots): accuracy and cost, means over seeds."""
    cfg = result.config
    p = cfg.provider
    per_token = (p.price_per_million_input_tokens or 0.0) / 1e6
    per_request = p.price_per_request or 0.0
    batch = p.max_prompts_per_request or 1
    n = cfg.predict_n
    u = result.usage
    asked = int(u.get("queries_paid", 0)) + int(u.get("cache_hits", 0))
    paid = int(u.get("queries_paid", 0))
    tok_q = float(u.get("input_tokens", 0)) / paid if paid else 0.0
    usd_q = float(u.get("cost_usd", 0.0)) / paid if paid else 0.0
    sec_q = result.query_seconds / asked if asked else 0.0
    n_classes = len(result.classes)
    rows = []
    for m in result.methods:
        for k in result.shots:
            runs = result.select(m, k)
            if not runs:
                continue
            row: dict[str, Any] = {
                "method": m,
                "shots": k,
                "accuracy": _mean([r.accuracy for r in runs]),
                "seeds": len(runs),
            }
            costs = [r.cost for r in runs if r.cost is not None]
            if m not in INPUT_SIDE or not costs:
                q = _TRAINING_QUERIES.get(m, k * n_classes + 1)
                row.update(
                    n_test=result.plan.n_test,
                    train_queries=q,
                    train_tokens=q * tok_q,
                    train_usd=q * usd_q,
                    query_seconds=q * sec_q,
                    local_seconds=_mean([r.fit_seconds for r in runs]),
                    tokens_per_prediction=tok_q,
                )
            elif m == "bbt":
                row.update(
                    n_test=costs[0]["n_test"],
                    calls=costs[0]["calls"],
                    train_queries=_mean([c["train_queries_asked"] for c in costs]),
                    train_queries_paid=_mean([c["train_queries"] for c in costs]),
                    train_tokens=_mean([c["train_input_tokens"] for c in costs]),
                    train_usd=_mean([c["train_cost_usd"] for c in costs]),
                    query_seconds=_mean([c["train_query_seconds"] for c in costs]),
                    local_seconds=_mean([c["train_local_seconds"] for c in costs]),
                    tokens_per_prediction=_mean([c["tokens_per_prediction"] or 0 for c in costs]),
                )
            else:
                row.update(
                    n_test=costs[0]["n_test"],
                    train_queries=0,
                    train_tokens=0.0,
                    train_usd=0.0,
                    query_seconds=0.0,
                    local_seconds=0.0,
                    tokens_per_prediction=_mean([c["tokens_per_prediction"] or 0 for c in costs]),
                    demonstrations=costs[0]["demonstrations"],
                    demonstrations_kept=_mean([c["demonstrations_kept_mean"] for c in costs]),
                )
            tokens_n = n * row["tokens_per_prediction"]
            row.update(
                predict_n=n,
                predict_n_tokens=tokens_n,
                predict_n_usd=tokens_n * per_token + math.ceil(n / batch) * per_request,
            )
            rows.append(row)
    return rows


def cost_table(result: ExperimentResult) -> str:
    """The rows as a Markdown table."""
    n = result.config.predict_n
    head = [
        "method",
        "shots",
        "accuracy (%)",
        "test rows",
        "training queries",
        "training tokens",
        "training $",
        "querying s",
        "local s",
        "tokens / prediction",
        f"{n} predictions: tokens",
        f"{n} predictions: $",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in cost_rows(result):
        lines.append(
            "| "
            + " | ".join(
                [
                    r["method"],
                    str(r["shots"]),
                    f"{100 * r['accuracy']:.1f}",
                    str(r["n_test"]),
                    f"{r['train_queries']:,.0f}",
                    f"{r['train_tokens']:,.0f}",
                    f"{r['train_usd']:.4g}",
                    f"{r['query_seconds']:.2f}",
                    f"{r['local_seconds']:.2f}",
                    f"{r['tokens_per_prediction']:,.1f}",
                    f"{r['predict_n_tokens']:,.0f}",
                    f"{r['predict_n_usd']:.4g}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def plot_accuracy_vs_cost(result: ExperimentResult, out_dir: Path) -> Path | None:
    """Accuracy against training + ``predict_n`` predictions, in dollars (tokens if unpriced)."""
    if not plots.available():
        return None
    fig, ax = plots.axes(7.0, 4.6)
    rows = cost_rows(result)
    priced = any(r["train_usd"] > 0 or r["predict_n_usd"] > 0 for r in rows)
    key, unit = ("usd", "USD") if priced else ("tokens", "input tokens")
    n = result.config.predict_n
    for i, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = [r for r in rows if r["method"] == m]
        xs = [max(r[f"train_{key}"] + r[f"predict_n_{key}"], 1e-12) for r in mine]
        ys = [100 * r["accuracy"] for r in mine]
        ax.plot(xs, ys, marker="o", color=f"C{i}", label=m)
        for x, y, r in zip(xs, ys, mine, strict=True):
            ax.annotate(f"{r['shots']}", (x, y), textcoords="offset points", xytext=(3, 3))
        if m == "bbt":  # BBT's curve over its budget, where the test set was scored
            for run in (r for k in result.shots for r in result.select("bbt", k)):
                pts = [p for p in (run.cost or {}).get("curve", []) if "test_accuracy" in p]
                if not pts:
                    continue
                tpp = (run.cost or {}).get("tokens_per_prediction") or 0.0
                px = [
                    p[f"train_{'cost_usd' if priced else 'input_tokens'}"]
                    + (n * tpp if not priced else 0.0)
                    for p in pts
                ]
                ax.plot(px, [100 * p["test_accuracy"] for p in pts], ":", color=f"C{i}", alpha=0.6)
    ax.set_xscale("log")
    return plots.finish(
        fig,
        ax,
        out_dir / "accuracy_vs_cost.png",
        title=f"{result.config.name}: accuracy vs cost (labels: shots)",
        xlabel=f"{unit}: training + predicting {n} new examples",
    )

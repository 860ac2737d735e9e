"""What the chat route's censoring costs: DecT through ``/v1/chat/completions`` (top-20
candidates, surface forms combined) against ``/v1/features`` (exact label scores), same server.

    dect-maas-server --port 8000 &     # the default model (SmolLM2-135M-Instruct)
    .venv/bin/python benchmarks/compare_routes.py --server-url http://127.0.0.1:8000 \\
        --test-rows 500 --json routes.json

Routes (see ``route_for``): ``features`` = ``LocalAdapter`` with ``compare_methods.TASKS``
(chosen on the training files only); ``chat_exact`` and ``chat_top20`` = ``OpenAIChatAdapter``
with a question prompt (``CHAT_TASKS``), scores exact or top-20 (surface forms combined), vectors
from the same server's ``/v1/embeddings`` (mean-pooled), as a hosted chat model plus an embeddings
endpoint would give them. The two chat routes differ only in censoring.

Per set and route: accuracy of zero-shot, calibrated zero-shot, the paper's DecT and
AutoDecTClassifier at each shot count (mean ± std over seeds), the censored share of label scores
per class, and the queries, requests and input tokens the ledger recorded; for the first set, the
estimate made before the run against what the run then recorded (tokens and dollars, at the
example prices below). Prints JSON, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from compare_methods import DATA, TASKS

from dect_maas import (
    AutoDecTClassifier,
    CacheConfig,
    Client,
    DecTClassifier,
    LocalAdapter,
    OpenAIChatAdapter,
    Prices,
    Task,
    ZeroShotClassifier,
    load_examples,
    sample_k_shot,
)

METHODS = ("zero_shot", "zero_shot_calibrated", "paper_dect", "auto_dect")
# Example prices (gpt-4o-mini's list prices in 2025), so that dollars can be compared at all.
PRICES = Prices(per_million_input_tokens=0.15, per_million_output_tokens=0.60)


def make(name: str, seed: int) -> Any:
    if name == "zero_shot":
        return ZeroShotClassifier("none")
    if name == "zero_shot_calibrated":
        return ZeroShotClassifier("auto")
    if name == "paper_dect":
        return DecTClassifier(random_state=seed)
    return AutoDecTClassifier(random_state=seed)


# The chat routes ask a question, as a chat user would; the label words are the class names (or,
# for five classes, one plain word each), fixed before any data was looked at.
CHAT_TASKS: dict[str, dict[str, Any]] = {
    "movies_binary": {
        "template": "Review: {text}\nIs this review negative or positive? Answer with one word. "
        "{mask}",
        "label_words": {"negative": "negative", "positive": "positive"},
    },
    "movies_5way": {
        "template": "Review: {text}\nRate this review: terrible, negative, neutral, positive or "
        "excellent? Answer with one word. {mask}",
        "label_words": {
            "very negative": "terrible",
            "negative": "negative",
            "neutral": "neutral",
            "positive": "positive",
            "very positive": "excellent",
        },
    },
    "drugs_3way": {
        "template": "Review: {text}\nIs this drug review negative, neutral or positive? Answer "
        "with one word. {mask}",
        "label_words": {"negative": "negative", "neutral": "neutral", "positive": "positive"},
    },
}


def route_for(route: str, url: str, name: str) -> tuple[Any, Task]:
    """(adapter, task) of a route: ``features`` (completion prompt, exact scores, last hidden
    state), ``chat_exact`` (chat prompt, exact scores through ``logprob_token_ids``) and
    ``chat_top20`` (the same chat prompt, top-20 candidates); both chat routes take vectors from
    ``/v1/embeddings``, so they differ only in censoring."""
    if route == "features":
        return LocalAdapter(base_url=url, prices=PRICES), Task(**TASKS[name], name=name)
    chat = OpenAIChatAdapter(
        url,
        "SmolLM2-135M-Instruct",
        top_logprobs=20,
        exact_token_ids=route == "chat_exact",
        tokenize_api="dect-maas",
        embeddings_base_url=url,
        prices=PRICES,
    )
    return chat, Task(**CHAT_TASKS[name], name=name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "server": args.server_url,
        "test_rows": args.test_rows,
        "seeds": args.seeds,
        "sets": {},
    }
    for set_i, name in enumerate(args.sets):
        task = Task(**TASKS[name], name=name)
        train = load_examples(args.data_dir / f"{name}_train.jsonl")
        test = load_examples(args.data_dir / f"{name}_test.jsonl")
        # One fixed draw per set, whatever sets run before it, so that reruns reuse the cache.
        rows = np.sort(np.random.RandomState(2024).permutation(len(test))[: args.test_rows])
        test_texts = [test.texts[int(i)] for i in rows]
        y_test = [test.labels[int(i)] for i in rows]
        counts = {c: sum(1 for v in train.labels if v == c) for c in task.classes}
        shots = [k for k in args.shots if min(counts.values()) >= k]
        needed = sorted(
            {int(i) for k in shots for s in args.seeds for i in sample_k_shot(train.labels, k, s)}
        )
        row_of = {i: r for r, i in enumerate(needed)}
        texts = [train.texts[i] for i in needed] + test_texts
        result: dict[str, Any] = {"n_test": len(y_test), "n_train_pool": len(needed)}
        for route in args.routes:
            cache = args.cache_dir / "cache"  # shared: the chat routes share their vectors
            ledger = args.cache_dir / f"ledger-{route}-{name}-{int(time.time())}"
            adapter, task = route_for(route, args.server_url, name)
            with Client(
                adapter,
                cache=CacheConfig(cache),
                ledger=ledger,
                max_concurrency=args.concurrency,
            ) as client:
                est = client.estimate(task, texts)
                t0 = time.time()
                feats = client.features(task, texts)
                wall = time.time() - t0
                summary = client.ledger.summary()
            pool, test_feats = feats[: len(needed)], feats[len(needed) :]
            censored = (
                feats.censored.mean(axis=0).round(4).tolist()
                if feats.censored is not None
                else [0.0] * len(task.classes)
            )
            cells: dict[str, Any] = {}
            for k in shots:
                acc: dict[str, list[float]] = {m: [] for m in METHODS}
                for seed in args.seeds:
                    idx = sample_k_shot(train.labels, k, seed)
                    f = pool[[row_of[int(i)] for i in idx]]
                    y = [train.labels[int(i)] for i in idx]
                    for m in METHODS:
                        acc[m].append(100.0 * make(m, seed).fit(f, y).score(test_feats, y_test))
                cells[str(k)] = {
                    m: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1))}
                    for m, v in acc.items()
                }
                print(
                    f"[{name}/{route}] {k}-shot: "
                    + ", ".join(f"{m} {cells[str(k)][m]['mean']:.1f}" for m in METHODS),
                    file=sys.stderr,
                )
            result[route] = {
                "censored_share_per_class": dict(zip(task.classes, censored, strict=True)),
                "censored_share": float(np.mean(censored)),
                "queries": summary.queries_paid,
                "cache_hits": summary.cache_hits,
                "requests": summary.requests,
                "input_tokens": summary.input_tokens,
                "cost_usd": round(summary.cost_usd, 6),
                "wall_s": round(wall, 1),
                "estimate": {
                    "queries": est.queries,
                    "requests": est.requests,
                    "input_tokens": est.input_tokens,
                    "cost_usd": round(est.cost_usd, 6),
                    "assumptions": list(est.assumptions),
                },
                "shots": cells,
            }
            if set_i == 0 and summary.input_tokens:
                result[route]["estimate_over_recorded_tokens"] = round(
                    est.input_tokens / summary.input_tokens, 3
                )
        out["sets"][name] = result
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = []
    for name, r in res["sets"].items():
        routes = [k for k in ("features", "chat_exact", "chat_top20") if k in r]
        shots = list(r[routes[0]]["shots"])
        lines.append(f"\n**{name}** (test n = {r['n_test']}, mean ± std % over seeds)\n")
        lines.append("| route | method | " + " | ".join(f"{k}-shot" for k in shots) + " |")
        lines.append("|---|---|" + "---|" * len(shots))
        for route in routes:
            for m in METHODS:
                vals = [
                    f"{r[route]['shots'][k][m]['mean']:.1f} ± {r[route]['shots'][k][m]['std']:.1f}"
                    for k in shots
                ]
                lines.append(f"| {route} | {m} | " + " | ".join(vals) + " |")
        for route in routes:
            x = r[route]
            lines.append(
                f"\n{route}: censored {100 * x['censored_share']:.1f}% "
                f"(per class {x['censored_share_per_class']}), {x['queries']} queries, "
                f"{x['requests']} requests, {x['input_tokens']} input tokens "
                f"(estimated {x['estimate']['input_tokens']}), ${x['cost_usd']:.6f} at the "
                f"example prices (estimated ${x['estimate']['cost_usd']:.6f})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server-url", required=True)
    ap.add_argument("--sets", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--routes", nargs="+", default=["features", "chat_exact", "chat_top20"])
    ap.add_argument("--shots", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--test-rows", type=int, default=500, help="a fixed random part of each test")
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=DATA,
        help="folder of {set}_train.jsonl / {set}_test.jsonl (e.g. ../shared/data)",
    )
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--cache-dir", type=Path, default=Path.home() / ".cache" / "dect-maas" / "routes"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    res = run(args)
    text = json.dumps(res, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

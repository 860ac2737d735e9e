"""The same small experiment through llama.cpp's completions and chat routes, checked against the
server's own answers for each text sent alone.

    python llamacpp_norepack.py --model SmolLM2-135M-Instruct.Q4_1.gguf --logits_all true \\
        --host 127.0.0.1 --port 8080 &                  # scores (see docs/providers.md)
    python llamacpp_norepack.py --model SmolLM2-135M-Instruct.Q4_1.gguf --embedding true \\
        --host 127.0.0.1 --port 8081 &                  # vectors
    .venv/bin/python benchmarks/llamacpp_routes.py --scores-url http://127.0.0.1:8080/v1 \\
        --vectors-url http://127.0.0.1:8081/v1 --json llamacpp.json

Routes: ``completions`` (``OpenAICompatibleAdapter``, top-20 ``logprobs``, one prompt per request,
label words with a leading space) and ``chat`` (``OpenAIChatAdapter``, ``top_logprobs: 20``,
surface forms combined by logsumexp); vectors from the embedding instance, one text per request,
mean-pooled. Data: the bundled movie sample (``examples/data``), a fixed part of its test file.

Check: for ``--check`` texts, the request is sent again by hand (httpx, one text, no cache, no
batching) and the answer read with code written here, not the adapter's: every stored score
(or, where censored, the k-th candidate's value) and every stored vector must equal it.
Prints JSON, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from compare_routes import METHODS, make

from dect_maas import (
    CacheConfig,
    Client,
    OpenAIChatAdapter,
    OpenAICompatibleAdapter,
    Task,
    load_examples,
    sample_k_shot,
)

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
MODEL = "SmolLM2-135M-Instruct"
TEMPLATE = "Review: {text}\nIs this review negative or positive? Answer with one word. {mask}"
WORDS = {"negative": "negative", "positive": "positive"}


def adapters(scores: str, vectors: str) -> dict[str, Any]:
    common: dict[str, Any] = {
        "top_logprobs": 20,
        "embeddings_base_url": vectors,
        "max_embedding_inputs": 1,  # llama-cpp-python 0.3.36 mis-batches embeddings
    }
    return {
        "completions": OpenAICompatibleAdapter(
            scores, MODEL, max_prompts_per_request=1, tokenize_api="llama-cpp-python", **common
        ),
        "chat": OpenAIChatAdapter(scores, MODEL, **common),
    }


def direct_scores(route: str, url: str, prompt: str) -> tuple[list[float], list[bool]]:
    """The server's answer for one text, read here: (score per class, censored per class)."""
    if route == "completions":
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 20}
        r = httpx.post(f"{url}/completions", json=body, timeout=120).raise_for_status().json()
        table = dict(r["choices"][0]["logprobs"]["top_logprobs"][0])
        found = [[table[" " + w]] if " " + w in table else [] for w in WORDS.values()]
    else:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 20,
        }
        r = httpx.post(f"{url}/chat/completions", json=body, timeout=120).raise_for_status().json()
        table = {}
        for item in r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]:
            table[item["token"]] = max(item["logprob"], table.get(item["token"], -math.inf))
        found = []
        for w in WORDS.values():
            forms = {w, w.capitalize(), " " + w, " " + w.capitalize()}
            found.append([table[f] for f in forms if f in table])
    floor = min(table.values())
    scores = [
        (max(v) + math.log(sum(math.exp(x - max(v)) for x in v))) if v else floor for v in found
    ]
    return scores, [not v for v in found]


def direct_vector(url: str, text: str) -> np.ndarray:
    body = {"model": MODEL, "input": text}
    r = httpx.post(f"{url}/embeddings", json=body, timeout=120).raise_for_status().json()
    rows = np.asarray(r["data"][0]["embedding"], dtype=np.float64)
    return rows.mean(axis=0) if rows.ndim == 2 else rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    train = load_examples(DATA / "movies_train.jsonl")
    test = load_examples(DATA / "movies_test.jsonl")
    rows = np.sort(np.random.RandomState(2024).permutation(len(test))[: args.test_rows])
    test_texts = [test.texts[int(i)] for i in rows]
    y_test = [test.labels[int(i)] for i in rows]
    needed = sorted(
        {int(i) for k in args.shots for s in args.seeds for i in sample_k_shot(train.labels, k, s)}
    )
    row_of = {i: r for r, i in enumerate(needed)}
    texts = [train.texts[i] for i in needed] + test_texts
    out: dict[str, Any] = {"n_test": len(y_test), "n_train_pool": len(needed), "routes": {}}
    for route, adapter in adapters(args.scores_url, args.vectors_url).items():
        prefix = " " if route == "completions" else ""
        task = Task(TEMPLATE, WORDS, label_word_prefix=prefix, name="movies")
        ledger = Path(tempfile.mkdtemp(prefix=f"llamacpp-{route}-"))
        with Client(adapter, cache=CacheConfig(args.cache_dir), ledger=ledger) as client:
            t0 = time.time()
            feats = client.features(task, texts)
            wall = time.time() - t0
            summary = client.ledger.summary()
        assert feats.scores is not None
        assert feats.hidden is not None
        censored_all = (
            feats.censored
            if feats.censored is not None
            else np.zeros(feats.scores.shape, dtype=bool)  # None: nothing censored
        )
        # the check: each of the first --check test texts sent alone, read here
        worst_score = worst_vec = 0.0
        for j in range(args.check):
            i = len(needed) + j
            prompt = adapter.prompt("scores", task, texts[i], None)
            scores, censored = direct_scores(route, args.scores_url, prompt)
            assert censored == [bool(c) for c in censored_all[i]], (route, j)
            worst_score = max(worst_score, float(np.max(np.abs(feats.scores[i] - scores))))
            vec = direct_vector(args.vectors_url, adapter.prompt("vectors", task, texts[i], None))
            worst_vec = max(worst_vec, float(np.max(np.abs(feats.hidden[i] - vec))))
        pool, test_feats = feats[: len(needed)], feats[len(needed) :]
        cells: dict[str, Any] = {}
        for k in args.shots:
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
        out["routes"][route] = {
            "checked_texts": args.check,
            "max_abs_score_diff": worst_score,
            "max_abs_vector_diff": worst_vec,
            "censored_share_per_class": dict(
                zip(task.classes, censored_all.mean(axis=0).round(4).tolist(), strict=True)
            ),
            "queries": summary.queries_paid,
            "cache_hits": summary.cache_hits,
            "requests": summary.requests,
            "input_tokens": summary.input_tokens,
            "wall_s": round(wall, 1),
            "shots": cells,
        }
        print(f"[{route}] done: {out['routes'][route]['max_abs_score_diff']}", file=sys.stderr)
    return out


def markdown(res: dict[str, Any]) -> str:
    shots = list(next(iter(res["routes"].values()))["shots"])
    lines = [f"test n = {res['n_test']}, mean ± std % over seeds", ""]
    lines.append("| route | method | " + " | ".join(f"{k}-shot" for k in shots) + " |")
    lines.append("|---|---|" + "---|" * len(shots))
    for route, r in res["routes"].items():
        for m in METHODS:
            vals = [
                f"{r['shots'][k][m]['mean']:.1f} ± {r['shots'][k][m]['std']:.1f}" for k in shots
            ]
            lines.append(f"| {route} | {m} | " + " | ".join(vals) + " |")
    for route, r in res["routes"].items():
        lines.append(
            f"\n{route}: {r['checked_texts']} texts checked alone, max |score diff| "
            f"{r['max_abs_score_diff']:.2e}, max |vector diff| {r['max_abs_vector_diff']:.2e}; "
            f"censored {r['censored_share_per_class']}; {r['queries']} queries, "
            f"{r['requests']} requests, {r['input_tokens']} input tokens"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scores-url", required=True, help="the --logits_all instance, .../v1")
    ap.add_argument("--vectors-url", required=True, help="the --embedding instance, .../v1")
    ap.add_argument("--shots", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--test-rows", type=int, default=100)
    ap.add_argument("--check", type=int, default=10, help="texts re-sent alone and compared")
    ap.add_argument(
        "--cache-dir", type=Path, default=Path.home() / ".cache" / "dect-maas" / "llamacpp"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    res = run(args)
    text = json.dumps(res, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

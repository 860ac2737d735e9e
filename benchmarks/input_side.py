"""DecT against input-side adaptation (ICL, BBT) on one footing: accuracy, queries, tokens, time.

    .venv/bin/python benchmarks/input_side.py --json out.json            # starts its own server
    .venv/bin/python benchmarks/input_side.py --server-url http://127.0.0.1:8000 ...

Each set runs as one ``Experiment`` (the product path: client, cache, budget, ledger), with the
methods ``dect``, ``auto_dect``, ``icl``, ``calibrated_icl`` and, on ``--bbt-sets``, ``bbt``. The
templates and label words are those of ``compare_methods.py`` (chosen on training files only).
ICL and BBT can be evaluated on fewer test rows than DecT (``--icl-test-limit``,
``--bbt-test-limit``): their every prediction is a long or soft-prompted query.

Prints (and writes with ``--json``) per set and shot count: the mean accuracy over seeds, the
training queries and tokens, querying and local seconds, the tokens per prediction, and the
ratios the DecT paper states: BBT's training queries and wall time over DecT's, ICL's tokens per
prediction over DecT's. DecT's training wall time is its share of the querying time (its k·C + 1
training queries at the run's seconds per paid query) plus its local training time; its tokens
per prediction are the run's input tokens per paid query (test and training prompts alike).

On a slow machine run it in parts against one server (fixed port: the cache key holds the URL),
each part resumable from the cache: ``--methods dect auto_dect --json dect.json`` first, then
``--methods icl calibrated_icl`` and ``--methods --bbt-sets ...`` (BBT alone) with
``--reference dect.json``, so the ratios use DecT's figures from the part that paid its queries
(a later part gets them from the cache, at no time). ``--estimate`` prints what each part would
send and cost, sending nothing; ``input_side_table.py`` merges the parts into one table.

On a GPU (a larger model, the BBT paper's full budget):
    python benchmarks/input_side.py --model HuggingFaceTB/SmolLM2-1.7B-Instruct --device cuda \\
        --bbt-budget 8000 --bbt-sets movies_binary --shots 16 --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import DATA, TASKS

from dect_maas import Experiment


def ratios(rows: dict[str, Any], reference: dict[str, Any]) -> None:
    """The paper's ratios, DecT's figures taken where its queries were paid (``reference``: the
    set's run with DecT; in a later run of the same cache they come from the cache, at no cost):
    BBT's training queries and wall time over DecT's, ICL's tokens per prediction over DecT's."""
    for key, row in rows.items():
        method, k = key.split("@")
        dect = reference.get("dect@" + k)
        if dect is None:
            continue
        if method == "bbt":
            dect_wall = dect["train_query_seconds"] + dect["train_local_seconds"]
            row["ratio_train_queries_over_dect"] = row["train_queries"] / dect["train_queries"]
            row["ratio_train_wall_over_dect"] = (
                row["train_query_seconds"] + row["train_local_seconds"]
            ) / dect_wall
        elif method in ("icl", "calibrated_icl"):
            if not (row["tokens_per_prediction"] and dect["tokens_per_prediction"]):
                continue  # answered from the cache: read it from the run that paid
            row["ratio_tokens_per_prediction_over_dect"] = (
                row["tokens_per_prediction"] / dect["tokens_per_prediction"]
            )


def dect_rows(name: str, *runs: dict[str, Any]) -> dict[str, Any]:
    """``name``'s DecT rows from the first of ``runs`` (``--json`` outputs' sets) that has them."""
    found: dict[str, Any] = {}
    for sets in reversed(runs):
        rows = sets.get(name, {}).get("methods", {})
        found.update({k: v for k, v in rows.items() if k.startswith("dect@")})
    return found


def mean_paid(values: Iterable[float | None]) -> float | None:
    """The mean over the seeds whose queries this run paid (a seed answered from the cache
    reports no tokens or time per prediction: it is left out, not counted as 0)."""
    paid = [v for v in values if v is not None]
    return float(np.mean(paid)) if paid else None


def summarise(result: Any, n_classes: int) -> dict[str, Any]:
    """Per method and shot count: accuracy and cost on one footing, means over seeds."""
    usage = result.usage
    # per *paid* query: a run resumed from the cache spends its querying time on the rest
    # (none paid, all from the cache: no time to share out)
    paid = usage.get("queries_paid", 0)
    per_query_s = result.query_seconds / paid if paid else 0.0
    dect_tpp = usage["input_tokens"] / usage["queries_paid"] if usage.get("queries_paid") else None
    out: dict[str, Any] = {}
    for m in result.methods:
        for k in result.shots:
            runs = result.select(m, k)
            if not runs:
                continue
            acc = [r.accuracy for r in runs]
            row: dict[str, Any] = {
                "accuracy_mean": float(np.mean(acc)),
                "accuracy_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
                "seeds": len(runs),
                "accuracies": acc,
                "seed_list": [r.seed for r in runs],
            }
            if runs[0].cost is None:  # DecT-like: k·C + 1 training queries, then the decoder
                q = k * n_classes + 1
                row.update(
                    train_queries=q,
                    train_tokens=q * dect_tpp if dect_tpp else None,
                    train_query_seconds=q * per_query_s,
                    train_local_seconds=float(np.mean([r.fit_seconds for r in runs])),
                    tokens_per_prediction=dect_tpp,
                    n_test=result.plan.n_test,
                )
            elif m == "bbt":
                c = [r.cost for r in runs]
                row.update(
                    calls=c[0]["calls"],
                    train_queries=float(np.mean([x["train_queries_asked"] for x in c])),
                    train_queries_paid=float(np.mean([x["train_queries"] for x in c])),
                    train_tokens=float(np.mean([x["train_input_tokens"] for x in c])),
                    train_query_seconds=float(np.mean([x["train_query_seconds"] for x in c])),
                    train_local_seconds=float(np.mean([x["train_local_seconds"] for x in c])),
                    tokens_per_prediction=mean_paid(x["tokens_per_prediction"] for x in c),
                    n_test=c[0]["n_test"],
                    curves=[x["curve"] for x in c],
                )
            else:  # ICL: no training; the demonstrations ride on every prediction
                c = [r.cost for r in runs]
                row.update(
                    train_queries=0,
                    train_tokens=0,
                    train_query_seconds=0.0,
                    train_local_seconds=0.0,
                    tokens_per_prediction=mean_paid(x["tokens_per_prediction"] for x in c),
                    predict_seconds_per_example=mean_paid(
                        x["query_seconds"] / x["queries"] if x["tokens_per_prediction"] else None
                        for x in c
                    ),
                    demonstrations=c[0]["demonstrations"],
                    demonstrations_kept_mean=float(
                        np.mean([x["demonstrations_kept_mean"] for x in c])
                    ),
                    demonstrations_kept_min=min(x["demonstrations_kept_min"] for x in c),
                    prompts_cut=float(np.mean([x["prompts_cut"] for x in c])),
                    n_test=c[0]["n_test"],
                )
            out[f"{m}@{k}"] = row
    for k in result.shots:
        dect = out.get(f"dect@{k}")
        if dect is None:
            continue
        dect_wall = dect["train_query_seconds"] + dect["train_local_seconds"]
        bbt = out.get(f"bbt@{k}")
        if bbt is not None:
            bbt["ratio_train_queries_over_dect"] = bbt["train_queries"] / dect["train_queries"]
            bbt["ratio_train_wall_over_dect"] = (
                bbt["train_query_seconds"] + bbt["train_local_seconds"]
            ) / dect_wall
        for m in ("icl", "calibrated_icl"):
            icl = out.get(f"{m}@{k}")
            if icl is not None and icl["tokens_per_prediction"] and dect["tokens_per_prediction"]:
                icl["ratio_tokens_per_prediction_over_dect"] = (
                    icl["tokens_per_prediction"] / dect["tokens_per_prediction"]
                )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server-url")
    p.add_argument("--model", help="for the server this script starts (default: the embedded one)")
    p.add_argument("--device", default=None)
    p.add_argument("--sets", nargs="+", default=list(TASKS))
    p.add_argument(
        "--data-dir", type=Path, default=DATA, help="folder with the {set}_{train,test}.jsonl files"
    )
    p.add_argument("--shots", nargs="+", type=int, default=[4, 16])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--test-limit", type=int, default=None, help="DecT's test rows (default all)")
    p.add_argument("--icl-test-limit", type=int, default=None)
    p.add_argument("--icl-max-prompt-tokens", type=int, default=None)
    p.add_argument("--bbt-sets", nargs="*", default=[])
    p.add_argument("--bbt-shots", nargs="*", type=int, default=None)
    p.add_argument("--bbt-budget", type=int, default=8000)
    p.add_argument("--bbt-prompt-length", type=int, default=50)
    p.add_argument("--bbt-test-limit", type=int, default=None)
    p.add_argument("--bbt-curve-every", type=int, default=0)
    p.add_argument("--bbt-seeds", nargs="*", type=int, default=None, help="default: --seeds")
    p.add_argument(
        "--bbt-concurrency", type=int, default=None, help="candidates in flight (1 on a CPU)"
    )
    p.add_argument(
        "--methods",
        nargs="*",
        default=["dect", "auto_dect", "icl", "calibrated_icl"],
        help="the methods of each set's first run (BBT runs apart, on --bbt-sets)",
    )
    p.add_argument(
        "--reference",
        help="an earlier --json output of the same server and cache: DecT's rows for the ratios",
    )
    p.add_argument(
        "--estimate", action="store_true", help="print what each run would cost; send nothing"
    )
    p.add_argument("--work", default="/tmp/dect-maas-input-side", help="cache, ledger, runs")
    p.add_argument("--max-input-tokens", type=int, default=8192)
    p.add_argument("--json")
    args = p.parse_args(argv)

    def run(url: str) -> dict[str, Any]:
        out: dict[str, Any] = {"args": vars(args), "sets": {}}
        reference: dict[str, Any] = (
            json.loads(Path(args.reference).read_text())["sets"] if args.reference else {}
        )
        for name in args.sets:
            spec = TASKS[name]
            runs = [False] if args.methods else []
            for bbt_on in runs + ([True] if name in args.bbt_sets else []):
                shots = args.bbt_shots if bbt_on and args.bbt_shots else args.shots
                seeds = args.bbt_seeds if bbt_on and args.bbt_seeds else args.seeds
                cfg: dict[str, Any] = {
                    "name": f"input-side-{name}",
                    "provider": {"kind": "local", "base_url": url, "timeout_s": 3600},
                    "task": {"template": spec["template"], "label_words": spec["label_words"]},
                    "data": {
                        "train": {"path": str(args.data_dir / f"{name}_train.jsonl")},
                        "test": {"path": str(args.data_dir / f"{name}_test.jsonl")},
                    },
                    "shots": shots,
                    "seeds": seeds,
                    "methods": ["dect", "bbt"] if bbt_on else args.methods,
                    "icl": {
                        "test_limit": args.icl_test_limit,
                        "max_prompt_tokens": args.icl_max_prompt_tokens,
                    },
                    "bbt": {
                        "budget": args.bbt_budget,
                        "prompt_length": args.bbt_prompt_length,
                        "test_limit": args.bbt_test_limit,
                        "curve_every": args.bbt_curve_every,
                        "concurrency": args.bbt_concurrency,
                    },
                    "cache_dir": f"{args.work}/cache",
                    "ledger_dir": f"{args.work}/ledger",
                    "output_dir": f"{args.work}/runs",
                }
                if args.test_limit:
                    cfg["data"]["test"]["limit"] = args.test_limit
                key = f"{name}+bbt" if bbt_on else name
                if args.estimate:
                    est = Experiment.from_config(cfg).estimate()
                    out["sets"][key] = {
                        "queries": est.queries,
                        "requests": est.requests,
                        "input_tokens": est.input_tokens,
                        "cached_queries": est.cached_queries,
                        "by_method": est.by_method,
                    }
                    print(json.dumps({key: out["sets"][key]}, indent=1, default=str), flush=True)
                else:
                    t = time.perf_counter()
                    result = Experiment.from_config(cfg).run()
                    rows = summarise(result, len(spec["label_words"]))
                    if "dect" not in args.methods or bbt_on:
                        # DecT's queries were paid in --reference's run or else this one's first
                        ratios(rows, dect_rows(name, out["sets"], reference))
                    out["sets"][key] = {
                        "wall_seconds": time.perf_counter() - t,
                        "report": str(result.output_dir),
                        "methods": rows,
                    }
                    print(json.dumps({key: out["sets"][key]["methods"]}, indent=1), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        return out

    if args.server_url:
        run(args.server_url)
        return 0
    from dect_maas_server.testing import run_server

    opts: dict[str, Any] = {"max_input_tokens": args.max_input_tokens}
    if args.device:
        opts["device"] = args.device
    with run_server(args.model, **opts) as url:
        run(url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""BBT's accuracy against calls on one k-shot set (movies binary, seed 0), beside DecT in one run.

    .venv/bin/python benchmarks/bbt_curve.py --budget 8000 --curve-every 100 --shots 4 \\
        --log /tmp/bbt-full.log --json /tmp/bbt-full.json

Starts the local server with the default model (or uses ``--server-url``), runs ``dect`` and
``bbt`` (the BBT paper's defaults: prompt length 50, intrinsic dimension 500, population 20) as
one ``Experiment`` and prints JSON: both accuracies, the ledger's usage, BBT's cost with its curve
and the ratios the DecT paper states (BBT's training queries and wall time over DecT's).

Every generation is logged (``--log``, one JSON object a line after ``bbt``), so a run cut short
still shows its curve and its calls per second; its paid calls stay in the cache, so starting the
same command again replays them for free and carries on. That second process times only its own
leg (DecT's wall time is then ``null``: its queries were replayed too); ``bbt_log_summary.py``
puts the legs' logs on one clock. The data default to the bundled sample
(``examples/data/movies_{train,test}.jsonl``, 400 + 400 rows); DecT is scored on every test row,
BBT on the first ``--bbt-test-limit``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import TASKS

from dect_maas import Experiment

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=int, default=8000)
    p.add_argument("--curve-every", type=int, default=100)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=Path, default=EXAMPLES / "movies_train.jsonl")
    p.add_argument("--test", type=Path, default=EXAMPLES / "movies_test.jsonl")
    p.add_argument("--bbt-test-limit", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=None, help="candidates in flight at once")
    p.add_argument("--server-url")
    p.add_argument("--model", help="for the server this script starts (default: the embedded one)")
    p.add_argument("--device", default=None)
    p.add_argument("--work", default="/tmp/dect-maas-bbt-curve", help="cache, ledger, runs")
    p.add_argument("--log", help="append progress lines here (default: stderr)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        filename=args.log,
    )
    spec = TASKS["movies_binary"]

    def run(url: str) -> dict[str, Any]:
        bbt: dict[str, Any] = {
            "budget": args.budget,
            "test_limit": args.bbt_test_limit,
            "curve_every": args.curve_every,
        }
        if args.concurrency is not None:
            bbt["concurrency"] = args.concurrency
        cfg = {
            "name": "bbt-curve",
            "provider": {"kind": "local", "base_url": url, "timeout_s": 3600},
            "task": {"template": spec["template"], "label_words": spec["label_words"]},
            "data": {"train": {"path": str(args.train)}, "test": {"path": str(args.test)}},
            "shots": [args.shots],
            "seeds": [args.seed],
            "methods": ["dect", "bbt"],
            "bbt": bbt,
            "cache_dir": f"{args.work}/cache",
            "ledger_dir": f"{args.work}/ledger",
            "output_dir": f"{args.work}/runs",
        }
        t = time.perf_counter()
        r = Experiment.from_config(cfg).run()
        wall = time.perf_counter() - t
        run = r.select("bbt", args.shots)[0]
        dect = r.select("dect", args.shots)[0]
        c = dict(run.cost or {})
        # DecT's training: its k·C + 1 queries at the run's seconds per query, plus its fit
        n_classes = len(spec["label_words"])
        dect_queries = args.shots * n_classes + 1
        # r.usage and r.query_seconds are the features phase alone (DecT's queries, not BBT's).
        # A resumed run finds them in the cache: their time is not measured, and a fit-only
        # figure would flatter DecT (measure it with a fresh --work)
        paid = r.usage.get("queries_paid", 0)
        dect_wall = dect_queries * r.query_seconds / paid + dect.fit_seconds if paid > 0 else None
        bbt_wall = c["train_query_seconds"] + c["train_local_seconds"]
        return {
            "wall": wall,
            "bbt_accuracy": run.accuracy,
            "bbt_n_test": c.get("n_test"),
            "dect_accuracy": dect.accuracy,
            "dect_n_test": r.plan.n_test,
            "dect_train_queries": dect_queries,
            "dect_train_wall_seconds": dect_wall,
            "dect_fit_seconds": dect.fit_seconds,
            "bbt_train_queries": c["train_queries_asked"],
            "bbt_train_wall_seconds": bbt_wall,
            "bbt_calls_per_second": c["calls"] / bbt_wall if bbt_wall else None,
            "ratio_train_queries_bbt_over_dect": c["train_queries_asked"] / dect_queries,
            "ratio_train_wall_bbt_over_dect": bbt_wall / dect_wall if dect_wall else None,
            "bbt_calls_replayed_from_cache": c.get("calls", 0) - c.get("train_requests", 0),
            "usage": r.usage,
            "cost": c,
            "report": str(r.output_dir),
        }

    if args.server_url:
        out = run(args.server_url)
    else:
        from dect_maas_server.testing import run_server

        opts: dict[str, Any] = {"max_input_tokens": 8192}
        if args.device:
            opts["device"] = args.device
        with run_server(args.model, **opts) as url:
            out = run(url)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

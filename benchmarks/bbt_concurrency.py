"""BBT's calls per second with its population sent one at a time against all at once.

    .venv/bin/python benchmarks/bbt_concurrency.py --budget 40 --shots 4

One server (the default model unless ``--model``), the same BBT settings and k-shot set (movies
sample, seed 0), run twice with separate caches (the seeded CMA-ES asks the same candidates, so a
shared cache would answer the second run): ``concurrency`` 1 (one call in flight) and the whole
population (the server merges the waiting soft prompts into one forward pass). Prints JSON: per
setting, the calls, the training query seconds and calls per second, and that the best training
loss is the same (the requests are identical; only their timing differs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import TASKS

from dect_maas import Experiment

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 20])
    p.add_argument("--model")
    p.add_argument("--device")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    spec = TASKS["movies_binary"]

    def once(url: str, concurrency: int, work: str) -> dict[str, Any]:
        cfg = {
            "name": f"bbt-concurrency-{concurrency}",
            "provider": {"kind": "local", "base_url": url, "timeout_s": 3600},
            "task": {"template": spec["template"], "label_words": spec["label_words"]},
            "data": {
                "train": {"path": str(EXAMPLES / "movies_train.jsonl")},
                "test": {"path": str(EXAMPLES / "movies_test.jsonl"), "limit": 10},
            },
            "shots": [args.shots],
            "seeds": [0],
            "methods": ["bbt"],
            "bbt": {"budget": args.budget, "concurrency": concurrency},
            "cache_dir": f"{work}/cache",
            "ledger_dir": f"{work}/ledger",
            "output_dir": f"{work}/runs",
        }
        t = time.perf_counter()
        run = Experiment.from_config(cfg).run(write_report=False).select("bbt", args.shots)[0]
        c = run.cost or {}
        return {
            "concurrency": concurrency,
            "calls": c["calls"],
            "train_query_seconds": c["train_query_seconds"],
            "calls_per_second": c["calls"] / c["train_query_seconds"],
            "best_train_loss": c["best_train_loss"],
            "wall": time.perf_counter() - t,
        }

    from dect_maas_server.testing import run_server

    opts: dict[str, Any] = {"max_input_tokens": 8192}
    if args.device:
        opts["device"] = args.device
    out = []
    with run_server(args.model, **opts) as url, tempfile.TemporaryDirectory() as tmp:
        for n in args.concurrency:
            out.append(once(url, n, f"{tmp}/c{n}"))
            print(json.dumps(out[-1]), flush=True)
    text = json.dumps({"runs": out}, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

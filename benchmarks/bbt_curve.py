"""BBT's accuracy against calls on one k-shot set: movies_binary, 4 shots, seed 0, with DecT.

    .venv/bin/python benchmarks/bbt_curve.py BUDGET CURVE_EVERY     # e.g. 200 40

Starts the local server with the default model, runs ``dect`` and ``bbt`` (prompt length 50,
intrinsic dimension 500, population 20; BBT scored on the first 50 test rows, DecT on 200) and
prints JSON: accuracies, the ledger's usage and BBT's cost with its curve.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import DATA, TASKS
from dect_maas_server.testing import run_server

from dect_maas import Experiment

spec = TASKS["movies_binary"]
with run_server(None, max_input_tokens=8192) as url:
    cfg = {
        "name": "bbt-curve",
        "provider": {"kind": "local", "base_url": url, "timeout_s": 3600},
        "task": {"template": spec["template"], "label_words": spec["label_words"]},
        "data": {
            "train": {"path": str(DATA / "movies_binary_train.jsonl")},
            "test": {"path": str(DATA / "movies_binary_test.jsonl"), "limit": 200},
        },
        "shots": [4],
        "seeds": [0],
        "methods": ["dect", "bbt"],
        "bbt": {"budget": int(sys.argv[1]), "test_limit": 50, "curve_every": int(sys.argv[2])},
        "cache_dir": "/tmp/dect-maas-bbt-curve/cache",
        "ledger_dir": "/tmp/dect-maas-bbt-curve/ledger",
        "output_dir": "/tmp/dect-maas-bbt-curve/runs",
    }
    t = time.perf_counter()
    r = Experiment.from_config(cfg).run()
    run = r.select("bbt", 4)[0]
    c = dict(run.cost)
    print(
        json.dumps(
            {
                "wall": time.perf_counter() - t,
                "accuracy": run.accuracy,
                "dect": r.select("dect", 4)[0].accuracy,
                "dect_fit_s": r.select("dect", 4)[0].fit_seconds,
                "query_seconds": r.query_seconds,
                "usage": r.usage,
                "cost": c,
                "report": str(r.output_dir),
            },
            indent=1,
        )
    )

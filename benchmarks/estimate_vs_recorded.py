"""``estimate`` against what the run then records, on the demo's experiment, through the local
adapter (``/v1/features``) and the chat adapter (``/v1/chat/completions`` + ``/v1/embeddings``)
of the same server.

    dect-maas-server --port 8000 &
    .venv/bin/python benchmarks/estimate_vs_recorded.py --server-url http://127.0.0.1:8000 \\
        --json estimate.json

Per route, in a fresh cache and ledger:
1. ``estimate`` with nothing cached (the byte bound: no answer to scale from);
2. a probe run: the demo's first ``--probe-rows`` test texts at 1 shot, 1 seed (paid, cached);
3. ``estimate`` of the demo run (now scaled from the probe's cached answers);
4. the demo run itself (``dect-maas demo``'s settings: shots 1/4/16 x seeds 0/1/2,
   ``--test-limit`` test texts); its ledger's tokens and dollars against step 3's estimate.
Prices are example list prices (per million input / output tokens) so that dollars mean something.
Only the queries matter here, so the run trains the cheapest method (the queries do not depend on
the methods).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from dect_maas.client.ledger import Ledger
from dect_maas.experiments.config_file import ExperimentConfig
from dect_maas.experiments.demo import demo_config
from dect_maas.experiments.runner import Experiment

PRICES = {"price_per_million_input_tokens": 0.15, "price_per_million_output_tokens": 0.60}


def config(route: str, url: str, home: Path, **kw: Any) -> ExperimentConfig:
    base = demo_config(url, home, **kw).model_dump(mode="json")
    base["methods"] = ["zero_shot"]
    provider = {**base["provider"], **PRICES}
    if route == "chat":
        provider.update(
            kind="openai_chat",
            base_url=url + "/v1",
            model="SmolLM2-135M-Instruct",
            embeddings_base_url=url + "/v1",
        )
        provider.pop("max_prompts_per_request", None)
        base["task"]["template"] = (
            "Review: {text}\nIs this review negative or positive? Answer with one word. {mask}"
        )
    base["provider"] = provider
    return ExperimentConfig.from_dict(base, source=f"{route} demo", base_dir=home)


def one(route: str, url: str, test_limit: int, probe_rows: int) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix=f"estimate-{route}-"))
    full = config(route, url, home, test_limit=test_limit)
    fresh = Experiment(full).estimate()
    probe = config(route, url, home, shots=(1,), seeds=(0,), test_limit=probe_rows)
    Experiment(probe).run(write_report=False)
    est = Experiment(full).estimate()
    exp = Experiment(full)
    exp.run(write_report=False)
    ledger = Ledger(home / "ledger")
    try:
        rec = ledger.summary(exp.run_id)
    finally:
        ledger.close()
    return {
        "fresh_estimate": {"input_tokens": fresh.input_tokens, "cost_usd": fresh.cost_usd},
        "estimate": {
            "queries": est.queries_to_pay,
            "input_tokens": est.input_tokens,
            "cost_usd": est.cost_usd,
            "basis": list(est.assumptions),
        },
        "recorded": {
            "queries": rec.queries_paid,
            "input_tokens": rec.input_tokens,
            "cost_usd": rec.cost_usd,
        },
        "tokens_ratio": round(est.input_tokens / rec.input_tokens, 3),
        "cost_ratio": round(est.cost_usd / rec.cost_usd, 3) if rec.cost_usd else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server-url", required=True)
    ap.add_argument("--routes", nargs="+", default=["local", "chat"])
    ap.add_argument("--test-limit", type=int, default=100)
    ap.add_argument("--probe-rows", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    res = {r: one(r, args.server_url, args.test_limit, args.probe_rows) for r in args.routes}
    text = json.dumps(res, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

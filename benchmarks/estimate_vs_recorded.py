"""``estimate`` against what the run then records, on the demo's experiment, per route.

    dect-maas-server --port 8000 &
    .venv/bin/python benchmarks/estimate_vs_recorded.py --server-url http://127.0.0.1:8000 \\
        --json estimate.json
    # and on llama.cpp (two llama-cpp-python instances, see benchmarks/llamacpp_routes.py):
    .venv/bin/python benchmarks/estimate_vs_recorded.py --routes llamacpp-completions \\
        llamacpp-chat --llama-url http://127.0.0.1:8080/v1 --llama-vectors-url \\
        http://127.0.0.1:8081/v1 --test-limit 40

Routes: ``local`` (``/v1/features`` of dect-maas-server), ``chat`` (its ``/v1/chat/completions``
+ ``/v1/embeddings``, ``tokenize_api = "dect-maas"``), ``llamacpp-completions`` and
``llamacpp-chat`` (llama-cpp-python's ``/v1/completions`` or ``/v1/chat/completions`` + the
embedding instance's ``/v1/embeddings``, ``tokenize_api = "llama-cpp-python"``).

Per route, in a fresh cache and ledger:
1. ``estimate`` with nothing cached (the tokenizer route counts every prompt, free);
2. with ``--probe-rows N``: a probe run of the first N test texts at 1 shot, 1 seed (paid,
   cached), then ``estimate`` again (chat through a text-only tokenizer learns the template's
   overhead from it);
3. the demo run itself (``dect-maas demo``'s settings: shots 1/4/16 x seeds 0/1/2,
   ``--test-limit`` test texts); its ledger's tokens and dollars against each estimate.
Prices are example list prices (per million input / output tokens) so that dollars mean something.
Only the queries matter here, so the run trains the cheapest method (the queries do not depend on
the methods). ``--count-sample N`` counts at most N prompts per role (the rest scaled by bytes),
to measure the sampled path on a small run. Prints JSON: per route and estimate, tokens and
dollars, the method per role, and the ratios estimate / recorded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from dect_maas import CensoredScoreWarning
from dect_maas.client import plan
from dect_maas.client.ledger import Ledger
from dect_maas.experiments.config_file import ExperimentConfig
from dect_maas.experiments.demo import demo_config
from dect_maas.experiments.runner import Experiment, ExperimentEstimate

PRICES = {"price_per_million_input_tokens": 0.15, "price_per_million_output_tokens": 0.60}
CHAT_TEMPLATE = "Review: {text}\nIs this review negative or positive? Answer with one word. {mask}"
LLAMA_MODEL = "SmolLM2-135M-Instruct"


def config(route: str, urls: dict[str, str], home: Path, **kw: Any) -> ExperimentConfig:
    base = demo_config(urls["server"] or "http://127.0.0.1:1", home, **kw).model_dump(mode="json")
    base["methods"] = ["zero_shot"]
    provider = {**base["provider"], **PRICES}
    if route == "chat":
        url = urls["server"]
        provider.update(
            kind="openai_chat",
            base_url=url + "/v1",
            model="SmolLM2-135M-Instruct",
            embeddings_base_url=url + "/v1",
            tokenize_api="dect-maas",
        )
        provider.pop("max_prompts_per_request", None)
    elif route.startswith("llamacpp-"):
        provider.update(
            kind="openai_chat" if route == "llamacpp-chat" else "openai",
            base_url=urls["llama"],
            model=LLAMA_MODEL,
            embeddings_base_url=urls["llama_vectors"],
            embeddings_batch_size=1,  # llama-cpp-python 0.3.36 mis-batches embeddings
            tokenize_api="llama-cpp-python",
            max_concurrency=1,
            top_k=20,
        )
        provider["max_prompts_per_request"] = 1
        if route == "llamacpp-chat":
            provider.pop("max_prompts_per_request")
    if route != "local":
        base["task"]["template"] = CHAT_TEMPLATE
        base["task"]["label_words"] = {"negative": ["negative"], "positive": ["positive"]}
    base["provider"] = provider
    return ExperimentConfig.from_dict(base, source=f"{route} demo", base_dir=home)


def _row(est: ExperimentEstimate, rec: Any, seconds: float) -> dict[str, Any]:
    return {
        "queries": est.queries_to_pay,
        "input_tokens": est.input_tokens,
        "cost_usd": est.cost_usd,
        "tokens_method": {r: row.get("tokens_method") for r, row in est.by_role.items()},
        "tokens_ratio": round(est.input_tokens / rec.input_tokens, 3),
        "cost_ratio": round(est.cost_usd / rec.cost_usd, 3) if rec.cost_usd else None,
        "estimate_s": round(seconds, 2),
        "notes": list(est.assumptions),
    }


def one(route: str, urls: dict[str, str], test_limit: int, probe_rows: int) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix=f"estimate-{route}-"))
    full = config(route, urls, home, test_limit=test_limit)
    t0 = time.perf_counter()
    fresh = Experiment(full).estimate()
    fresh_s = time.perf_counter() - t0
    probed = None
    if probe_rows:
        probe = config(route, urls, home, shots=(1,), seeds=(0,), test_limit=probe_rows)
        Experiment(probe).run(write_report=False)
        t0 = time.perf_counter()
        probed = (Experiment(full).estimate(), time.perf_counter() - t0)
    exp = Experiment(full)
    exp.run(write_report=False)
    ledger = Ledger(home / "ledger")
    try:
        rec = ledger.summary(exp.run_id)
    finally:
        ledger.close()
    out: dict[str, Any] = {
        "fresh_estimate": _row(fresh, rec, fresh_s),
        "recorded": {
            "queries": rec.queries_paid,
            "input_tokens": rec.input_tokens,
            "cost_usd": rec.cost_usd,
        },
    }
    if probed is not None:
        out["estimate_after_probe"] = _row(probed[0], rec, probed[1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server-url", default="", help="dect-maas-server (routes local, chat)")
    ap.add_argument("--llama-url", default="", help="llama-cpp-python scores instance, .../v1")
    ap.add_argument("--llama-vectors-url", default="", help="its embedding instance, .../v1")
    ap.add_argument("--routes", nargs="+", default=["local", "chat"])
    ap.add_argument("--test-limit", type=int, default=100)
    ap.add_argument("--probe-rows", type=int, default=0)
    ap.add_argument(
        "--count-sample",
        type=int,
        default=None,
        help="count at most this many prompts per role with the tokenizer (default 512)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.count_sample is not None:
        plan.COUNT_SAMPLE = args.count_sample
    urls = {
        "server": args.server_url.rstrip("/"),
        "llama": args.llama_url.rstrip("/"),
        "llama_vectors": args.llama_vectors_url.rstrip("/") or args.llama_url.rstrip("/"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CensoredScoreWarning)
        res = {r: one(r, urls, args.test_limit, args.probe_rows) for r in args.routes}
    text = json.dumps(res, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

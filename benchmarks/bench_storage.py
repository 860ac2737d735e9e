"""The two storage backends side by side, as JSON: embedded (SQLite + diskcache) vs PostgreSQL.

- ``ledger``: reserve + settle transactions per second (two transactions per request), from one
  thread and from four;
- ``cache_hits``: examples per second read back with ``ResponseCache.get_many`` (batched reads),
  10,000 examples shaped like real features (2 scores + a 576-float32 hidden vector);
  target >= 20,000 examples/s;
- ``end_to_end`` (unless ``--no-e2e``): the same ``dect-maas run`` (zero-shot, ``--examples``
  test examples) against the real local model server with its default model, on fresh stores,
  alternating backends; target: PostgreSQL's throughput >= 0.9 of the embedded default's.

The PostgreSQL server is $DECT_MAAS_BENCH_POSTGRES_URL, or one the pgserver wheel starts here
(a local Unix socket: a network hop to a remote server adds its round trip per transaction).

    python benchmarks/bench_storage.py [--examples 100] [--repeats 2] [--no-e2e]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from _pg import DATA, fresh_schema, postgres, run_server, write_config

from dect_maas import CacheConfig, Ledger, LedgerRecord, ResponseCache, Usage, cache_key

HIT_TARGET = 20_000.0
E2E_TARGET = 0.9


def bench_ledger(where: str, ops: int, threads: int) -> dict[str, Any]:
    ledger = Ledger(where, run_id=f"bench-{threads}")
    record = LedgerRecord(provider="local", model="tiny", endpoint="/v1/features", latency_s=0.01)
    asked = Usage(queries=32, requests=1, input_tokens=2000, cost_usd=0.001)

    def work(count: int) -> None:
        for _ in range(count):
            ledger.settle(ledger.reserve(asked), asked, record)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, [ops // threads] * threads))
    elapsed = time.perf_counter() - start
    done = (ops // threads) * threads
    assert ledger.spent().requests == done
    ledger.close()
    return {"threads": threads, "requests": done, "reserve_settle_per_s": round(done / elapsed)}


def bench_hits(where: str, n: int, dim: int, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    keys = [cache_key({"text": f"example {i}", "dim": dim}) for i in range(n)]
    with ResponseCache(CacheConfig(where)) as cache:
        start = time.perf_counter()
        for lo in range(0, n, 500):
            cache.set_many(
                {
                    k: {
                        "scores": [float(x) for x in rng.normal(size=2)],
                        "hidden": rng.normal(size=dim).astype(np.float32),
                        "n_tokens": 12,
                    }
                    for k in keys[lo : lo + 500]
                }
            )
        write_s = time.perf_counter() - start
    with ResponseCache(CacheConfig(where)) as cache:  # a fresh open, as a second run does
        assert len(cache.get_many(keys)) == n
        times, claims = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            cache.get_many(keys)
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert len(cache.claim_many(keys)) == n  # the client's lookup (claims what is missing)
            claims.append(time.perf_counter() - start)
    return {
        "claim_many_examples_per_s": round(n / statistics.median(claims)),
        "examples": n,
        "get_many_examples_per_s": round(n / statistics.median(times)),
        "get_many_best_examples_per_s": round(n / min(times)),
        "set_many_examples_per_s": round(n / write_s),
        "meets_target": n / statistics.median(times) >= HIT_TARGET,
    }


def one_run(folder: Path, url: str, store: str, n: int) -> float:
    """Seconds for one ``dect-maas run`` on fresh stores."""
    config = write_config(
        folder / "run.toml", url, store, limit=None, test=DATA / "movies_test.jsonl", n_test=n
    )
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "dect_maas", "run", str(config)],
        cwd=folder,
        check=True,
        capture_output=True,
        timeout=1800,
    )
    return time.perf_counter() - start


def bench_e2e(pg: str, n: int, repeats: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"embedded": [], "postgresql": []}
    with run_server(None) as url, tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        warm.mkdir()
        one_run(warm, url, str(warm), 8)  # the model loaded, the page cache warm
        for i in range(repeats):
            for name in ("embedded", "postgresql") if i % 2 == 0 else ("postgresql", "embedded"):
                folder = Path(tmp) / f"{name}{i}"
                folder.mkdir()
                store = fresh_schema(pg) if name == "postgresql" else str(folder)
                times[name].append(one_run(folder, url, store, n))
    emb, pgs = statistics.median(times["embedded"]), statistics.median(times["postgresql"])
    return {
        "examples": n,
        "model": "the local server's default model",
        "embedded_s": [round(t, 2) for t in times["embedded"]],
        "postgresql_s": [round(t, 2) for t in times["postgresql"]],
        "postgresql_vs_embedded_throughput": round(emb / pgs, 3),
        "meets_target": emb / pgs >= E2E_TARGET,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ledger-ops", type=int, default=2000)
    parser.add_argument("--examples", type=int, default=100, help="end-to-end test examples")
    parser.add_argument("--e2e-repeats", type=int, default=2)
    parser.add_argument("--no-e2e", action="store_true")
    args = parser.parse_args()
    out: dict[str, Any] = {
        "benchmark": "storage_backends",
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
        },
    }
    with postgres() as pg, tempfile.TemporaryDirectory() as tmp:
        for name in ("embedded", "postgresql"):

            def where(part: str, name: str = name) -> str:
                return fresh_schema(pg) if name == "postgresql" else str(Path(tmp) / name / part)

            out[name] = {
                "ledger": [bench_ledger(where(f"ledger{t}"), args.ledger_ops, t) for t in (1, 4)],
                "cache_hits": bench_hits(where("cache"), args.hits, args.dim, args.repeats),
            }
        if not args.no_e2e:
            out["end_to_end"] = bench_e2e(pg, args.examples, args.e2e_repeats)
    out["targets"] = {"cache_hits_examples_per_s": HIT_TARGET, "end_to_end_ratio": E2E_TARGET}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

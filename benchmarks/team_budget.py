"""One budget for a team: 8 processes in 2 "machines" share a PostgreSQL ledger and cache.

Two groups of 4 ``dect-maas run`` processes, each group in a working folder of its own (stand-ins
for two machines), run against the real local model server (its default model) with one
``postgresql://`` ledger and cache and a ``max_queries`` smaller than the work. Each group splits
the test set into 4 slices, one per process; the two groups run the same slices (two people
running the same experiment), so every test example, and the shared training shots and the
content-free input, is wanted by at least two processes.

Two schedules, each on a fresh ledger and cache:

- ``concurrent``: all 8 start together;
- ``staggered``: the second machine starts when the first has finished.

Figures per schedule: ``answered`` (queries the server computed, from its ``/metrics``) against
``limit`` (must never be above), ``ledger_queries`` (what the ledger counts spent; never below
``answered``), ``distinct_examples`` (example answers in the shared cache) and ``paid_twice`` =
``answered - distinct_examples`` (queries the server computed for an example that was already
paid for).

    python benchmarks/team_budget.py [--slice 30] [--limit 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _pg import DATA, REPO, fresh_schema, postgres, run_server, write_config

from dect_maas import CacheConfig, Ledger, ResponseCache


def launch(folder: Path, config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dect_maas", "run", str(config), "--no-progress"],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def schedule(name: str, pg: str, url: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    store = fresh_schema(pg)
    lines = (DATA / "movies_test.jsonl").read_text(encoding="utf-8").splitlines()
    groups: list[list[tuple[Path, Path]]] = []
    for machine in ("machine_a", "machine_b"):
        work = root / name / machine
        work.mkdir(parents=True)
        procs = []
        for i in range(4):
            part = work / f"slice{i}.jsonl"
            part.write_text(
                "\n".join(lines[i * args.slice : (i + 1) * args.slice]) + "\n", encoding="utf-8"
            )
            cfg = write_config(
                work / f"run{i}.toml", url, store, limit=args.limit, test=part, n_test=args.slice
            )
            procs.append((work, cfg))
        groups.append(procs)

    def answered() -> int:
        return int(httpx.get(f"{url}/metrics").json()["queries_total"])

    before = answered()
    start = time.perf_counter()
    codes: list[int] = []
    if name == "concurrent":
        running = [launch(w, c) for group in groups for w, c in group]
        codes = [p.wait(timeout=1800) for p in running]
    else:
        for group in groups:
            running = [launch(w, c) for w, c in group]
            codes += [p.wait(timeout=1800) for p in running]
    wall = time.perf_counter() - start
    paid = answered() - before
    with Ledger(store) as ledger:
        summary = ledger.summary()
        spent = ledger.spent().queries
        reserved = ledger.reserved().queries
    with ResponseCache(CacheConfig(store)) as cache:
        # one example's answer carries scores ("s"); the rest are free lookups the client keeps
        # (the server's model info, label-word token ids)
        values = cache.get_many(list(cache.keys()))
        distinct = sum(1 for v in values.values() if "s" in v)
    return {
        "schedule": name,
        "processes": 8,
        "limit": args.limit,
        "work_queries": 4 * args.slice + 2 + 1,  # distinct examples the runs need
        "answered": paid,
        "ledger_queries": spent,
        "ledger_queries_paid": summary.queries_paid,
        "ledger_cache_hits": summary.cache_hits,
        "reserved_left": reserved,
        "distinct_examples": distinct,
        "paid_twice": paid - distinct,
        "never_above_limit": paid <= args.limit,
        "ledger_never_below_answered": spent >= paid,
        "exit_codes": {str(c): codes.count(c) for c in sorted(set(codes))},
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slice", type=int, default=30, help="test examples per process")
    parser.add_argument("--limit", type=int, default=100, help="max_queries (< the work)")
    args = parser.parse_args()
    with postgres() as pg, run_server(None) as url, tempfile.TemporaryDirectory() as tmp:
        out = [schedule(n, pg, url, Path(tmp), args) for n in ("concurrent", "staggered")]
    print(json.dumps({"benchmark": "team_budget", "results": out}, indent=2))


if __name__ == "__main__":
    main()

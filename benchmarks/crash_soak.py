"""Crash soak: kill -9 and SIGTERM a `dect-maas run` at random moments, resume, and check that
the ledger never counts less than the server answered and the limit is never passed.

    .venv/bin/python benchmarks/crash_soak.py --kills 20 --terms 5 --seed 0

Runs the real local server (a tiny causal model, so that it fits a loaded CPU) and the real CLI
in child processes. Each crash comes at a random moment while the run is sending (after 1 to
``--max-step`` more queries answered), then the run is resumed. After each crash it opens the
ledger (which settles what the dead process left) and reads the server's ``/metrics``.
Prints one JSON object:

- ``answered``: queries the server computed (``queries_total``), ``ledger_queries``: queries the
  ledger counts as spent (ok + unknown + lost); the promise is ``ledger_queries >= answered``
  and ``answered <= limit``;
- ``lost_per_crash``: answered queries of a crash interval that did not end up settled ``ok``
  (an upper bound on answers lost: an answer stored just before the kill is counted too);
- ``stale_reservations``: reservations still open after each reopen (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from movie_config import local_provider, write_movie_config  # noqa: E402


def write_config(folder: Path, url: str, limit: int, n_test: int) -> Path:
    provider = local_provider(url, max_prompts_per_request=1, max_concurrency=4)
    return write_movie_config(
        folder / "soak.toml", provider, name="soak", n_test=n_test, max_queries=limit
    )


def ledger_state(folder: Path) -> dict[str, int]:
    from dect_maas import Ledger

    with Ledger(folder / "ledger") as ledger:  # opening settles what dead processes left
        records = [r for r in ledger.records() if r.cache == "miss"]
        return {
            "spent": ledger.spent().queries,
            "reserved": ledger.reserved().queries,
            "ok": sum(r.queries for r in records if r.status == "ok"),
            "unknown": sum(r.queries for r in records if r.status in ("unknown", "lost")),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--terms", type=int, default=5)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--limit", type=int, default=300, help="max_queries (< what the run needs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-step", type=int, default=4, help="kill after 1..N more answered queries"
    )
    args = parser.parse_args()
    from dect_maas_server.testing import make_tiny_model, run_server

    rng = random.Random(args.seed)
    plan = ["kill"] * args.kills + ["term"] * args.terms
    rng.shuffle(plan)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="dect-soak-") as tmp:
        folder = Path(tmp)
        model = make_tiny_model("causal", folder / "model")
        with run_server(model) as url:
            cfg = write_config(folder, url, args.limit, args.n_test)

            def answered() -> int:
                return int(httpx.get(f"{url}/metrics").json()["queries_total"])

            lost: list[int] = []
            stale: list[int] = []
            codes: list[int] = []
            violations: list[dict[str, Any]] = []
            before_answered, before_ok = answered(), 0
            for kind in [*plan, "final"]:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "dect_maas", "run", str(cfg), "--no-progress"],
                    cwd=folder,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                if kind != "final":
                    # a random moment while it sends: after 1..--max-step more answered queries
                    target = before_answered + rng.randint(1, args.max_step)
                    while proc.poll() is None and answered() < target:
                        time.sleep(0.005)
                    time.sleep(rng.uniform(0, 0.05))
                    proc.send_signal(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
                codes.append(proc.wait(timeout=120))
                state = ledger_state(folder)
                now_answered = answered()
                stale.append(state["reserved"])
                lost.append(max(0, (now_answered - before_answered) - (state["ok"] - before_ok)))
                before_answered, before_ok = now_answered, state["ok"]
                if state["spent"] < now_answered or now_answered > args.limit:
                    violations.append({"after": kind, "answered": now_answered, **state})
            final = ledger_state(folder)
            crashes = lost[:-1]
            print(
                json.dumps(
                    {
                        "kills": args.kills,
                        "terms": args.terms,
                        "limit": args.limit,
                        "queries_needed": args.n_test + 2 + 1,
                        "answered": before_answered,
                        "ledger_queries": final["spent"],
                        "ledger_ok": final["ok"],
                        "ledger_unknown_or_lost": final["unknown"],
                        "lost_per_crash_max": max(crashes) if crashes else 0,
                        "lost_per_crash_mean": sum(crashes) / len(crashes) if crashes else 0.0,
                        "stale_reservations_max": max(stale),
                        "kills_landed": codes.count(-signal.SIGKILL),
                        # 143: handled; -15: arrived before the CLI installed its handler
                        "terms_landed": codes.count(128 + signal.SIGTERM)
                        + codes.count(-signal.SIGTERM),
                        "exit_codes": {str(c): codes.count(c) for c in sorted(set(codes))},
                        "violations": violations,
                        "holds": not violations and max(stale) == 0,
                    },
                    indent=2,
                )
            )


if __name__ == "__main__":
    main()

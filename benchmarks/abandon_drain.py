"""What a killed client still costs the local server: rows computed after it died.

    .venv/bin/python benchmarks/abandon_drain.py [--requests 128] [--rows 32] [--soft-prompt]

Runs the real server (a tiny causal model, one torch thread, so it fits a loaded CPU) and a
client in a child process that sends ``--requests`` concurrent ``/v1/features`` requests of
``--rows`` inputs each (with ``--soft-prompt``, each with its own soft prompt, as a BBT
population). ``--kill-after`` s after the last request reached the server, the client is killed
with SIGKILL, and ``/metrics`` is polled until the server's CPU time stops growing. Prints one
JSON object:

- ``rows_sent``, ``rows_computed_before_kill``, ``rows_computed_after_kill`` (what the server
  computed for nobody; before the disconnect watcher it was every queued row),
  ``rows_dropped`` (``rows_dropped_total``, absent on older servers: null); older servers did
  not count soft-prompt passes in ``queries_total``: there ``busy_after_kill_s`` tells;
- ``busy_after_kill_s``: from the kill until the server is idle (to 0.25 s);
- ``requests_abandoned``: ``requests_abandoned_total`` (null on older servers).

To measure another checkout's server, put its ``providers`` first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

_CLIENT = """
import asyncio, json, sys
import httpx
url, bodies = sys.argv[1], json.loads(sys.stdin.read())
async def main():
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(client.post("/v1/features", json=b) for b in bodies))
asyncio.run(main())
"""


def _metrics(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/metrics", timeout=30).json())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--rows", type=int, default=32, help="inputs per request")
    p.add_argument("--kill-after", type=float, default=0.5, help="s after all requests arrived")
    p.add_argument("--soft-prompt", action="store_true", help="each request with a soft prompt")
    args = p.parse_args()

    from dect_maas_server.testing import TINY_WORDS, make_tiny_model, run_server

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(TINY_WORDS, size=12)) for _ in range(args.rows)]
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model("causal", Path(tmp) / "tiny")
        total = args.requests * args.rows
        with run_server(model, threads=1, max_queue=total + 1, max_input_tokens=64) as url:
            hidden = httpx.get(f"{url}/v1/models").json()["data"][0]["hidden_size"]
            bodies = []
            for _ in range(args.requests):
                body: dict[str, Any] = {"inputs": texts, "label_token_ids": [5, 9]}
                if args.soft_prompt:
                    soft = rng.normal(0, 0.05, (4, hidden)).astype("<f4")
                    body["prompt_embeds"] = base64.b64encode(soft.tobytes()).decode("ascii")
                bodies.append(body)
            before = _metrics(url)
            client = subprocess.Popen(
                [sys.executable, "-c", _CLIENT, url],
                stdin=subprocess.PIPE,
                text=True,
                env=dict(os.environ),
            )
            assert client.stdin is not None
            client.stdin.write(json.dumps(bodies))
            client.stdin.close()
            # Kill once every request has reached the server and ``--kill-after`` s passed.
            while _metrics(url)["requests_total"] < before["requests_total"] + args.requests:
                if client.poll() is not None:
                    raise SystemExit("the client finished before the kill: send more rows")
                time.sleep(0.005)
            time.sleep(args.kill_after)
            client.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            client.wait()
            at_kill = _metrics(url)
            # Busy until the server's CPU time stops growing (soft-prompt passes were not
            # counted in queries_total before, so the CPU clock is the one sign on every server).
            cpu, last_change = at_kill["process_cpu_seconds_total"], killed
            while time.monotonic() - last_change < 1.0:
                time.sleep(0.25)
                snap = _metrics(url)
                if snap["process_cpu_seconds_total"] - cpu > 0.1:
                    last_change = time.monotonic()
                cpu = snap["process_cpu_seconds_total"]
            after = _metrics(url)

    def delta(key: str) -> int | None:
        return after[key] - before[key] if key in after else None

    print(
        json.dumps(
            {
                "soft_prompt": args.soft_prompt,
                "rows_sent": total,
                "rows_computed_before_kill": at_kill["queries_total"] - before["queries_total"],
                "rows_computed_after_kill": after["queries_total"] - at_kill["queries_total"],
                "rows_dropped": delta("rows_dropped_total"),
                "requests_abandoned": delta("requests_abandoned_total"),
                "busy_after_kill_s": round(max(0.0, last_change - killed), 3),
            }
        )
    )


if __name__ == "__main__":
    main()

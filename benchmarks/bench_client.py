"""Client benchmarks (prints JSON).

1. cache hits: ``client.features`` on N examples that are all cached (576-float vectors, like
   SmolLM2-135M), end to end through the client. Target >= 20,000 examples/s.
2. overhead per request: one example per request, sequential (and 8 at a time), against a trivial
   loopback server (http.server answering /v1/features from a hash "model"; in a thread of this
   process, and again in a process of its own, as a real server is), through the client (cache
   look-up, budget reservation, rate limiter, retries, parse, cache write, ledger settle) vs bare
   httpx posting the same bodies through as many workers as the client has. Target <= 1.2x bare
   httpx's time. As a diagnosis, the sequential run against the server process is repeated with the
   client's cache and ledger writes skipped (``_NoWrites``, never a configuration): the gap between
   the two runs is what writing each answer durably costs. With ``--service-ms`` (default 2), the
   sequential run again against a server that takes that long per request before answering (as the
   cheapest model's forward pass would): the client's writes then overlap the server's work.
   With ``--slow-write-ms`` (default 5), the same sequential run with a cache whose every write
   waits that long (an fsync at a WAL checkpoint, a network file system): requests go on while
   answers are written and those that queue up are written together, so most of the wait is
   hidden instead of added to every request.
3. end to end: ``features()`` on a cold cache against the real local server as a share of that
   server's own throughput, measured in the same run with bare httpx sending the same request
   bodies (same batches, same concurrency; the client's defaults: 64 per request, 8 at a time).
   ``--e2e-model tiny`` (default): a tiny random causal model, where the client's own costs show
   most; ``--e2e-model default``: the server's default SmolLM2-135M, what a user meets.
   Target >= 90%.

Overhead and end-to-end figures are medians of interleaved repetitions (``--reps``); on a loaded
machine they vary a lot, so the per-repetition values and the load average are printed too.

Usage: python benchmarks/bench_client.py [--hits 10000] [--requests 300] [--e2e N] [--reps 5]
       python benchmarks/bench_client.py --only-e2e --e2e-model default   # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from faultserver import FakeModel, FaultServer, MockProvider, SlowCache  # noqa: E402

from dect_maas import CacheConfig, Client, LocalAdapter, Task  # noqa: E402
from dect_maas.client.ledger import Reservation  # noqa: E402

TASK = Task("{text} Overall, it was {mask}", {"negative": "bad", "positive": "great"})


def bench_hits(n: int, tmp: Path) -> dict[str, Any]:
    texts = [f"cached example number {i}, a sentence of a few words" for i in range(n)]
    provider = MockProvider(FakeModel(dim=576))
    adapter = LocalAdapter("http://fake", max_inputs_per_request=256)
    cache = CacheConfig(tmp / "hits-cache")
    with Client(
        adapter, cache=cache, ledger=tmp / "hits-ledger", transport=provider.transport()
    ) as c:
        c.features(TASK, texts)  # fill
        paid = len(provider.sent())
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            feats = c.features(TASK, texts)
            times.append(time.perf_counter() - t0)
        assert len(provider.sent()) == paid, "a cached run sent a query"
    best = min(times)
    return {
        "examples": n,
        "hidden_dim": int(feats.hidden.shape[1]) if feats.hidden is not None else None,
        "seconds_best_of_3": round(best, 4),
        "examples_per_s": round(n / best),
        "target_examples_per_s": 20000,
        "meets_target": n / best >= 20000,
    }


async def _direct(url: str, bodies: list[dict[str, Any]], conc: int) -> float:
    """Bare httpx: post ``bodies`` to /v1/features through ``conc`` workers (as the client
    sends), encoded as the client encodes them; seconds for all. The long timeout matches the
    client's: a slow model must not turn into retries on either side."""
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    todo = iter(bodies)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:

        async def worker() -> None:
            for body in todo:
                r = await http.post(
                    f"{url}/v1/features",
                    content=json.dumps(body, separators=(",", ":")),
                    headers={"Content-Type": "application/json"},
                )
                r.raise_for_status()
                json.loads(r.content)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(conc, len(bodies)))))
        return time.perf_counter() - t0


@contextmanager
def _trivial_server(own_process: bool, service_s: float = 0.0) -> Iterator[str]:
    """The hash-model server on loopback: a thread of this process, or a process of its own
    (as a real server is; then it does not share this process's GIL with the client).
    ``service_s`` (in a thread only): every /v1/features answer waits that long first, as a
    model's forward pass would, with the GIL released."""
    if not own_process:
        server = (
            FaultServer(rate=1.0, faults=("slow",), slow_s=service_s, paths=("/v1/features",))
            if service_s
            else FaultServer(rate=0.0)
        )
        with server.run() as url:
            yield url
        return
    assert not service_s, "a service time is only simulated in a thread"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "faultserver.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


class _NoWrites(Client):
    """Diagnosis only, never a configuration: the bookkeeping thread writes nothing (no cache
    entry, no settlement) and hands back made-up reservations, so the run shows what everything
    else in the client costs (the event loop's work, the thread hand-offs)."""

    def _write(self, commits: list[Any]) -> list[Any]:
        return [
            None if c.then is None else Reservation(id=uuid.uuid4().hex, usage=c.then, run_id="x")
            for c in commits
        ]


def bench_overhead(
    n: int,
    tmp: Path,
    conc: int,
    reps: int,
    slow_write_s: float = 0.0,
    server_process: bool = False,
    writes: bool = True,
    service_s: float = 0.0,
) -> dict[str, Any]:
    """One example per request, ``conc`` requests at a time, client vs bare httpx.
    ``writes=False``: the client's cache and ledger writes skipped (``_NoWrites``);
    ``service_s``: the server takes that long per request."""
    texts = [f"overhead text {i} at {conc}" for i in range(n)]
    with _trivial_server(server_process, service_s) as url:
        adapter = LocalAdapter(url, max_inputs_per_request=1)
        with Client(adapter, cache=CacheConfig(tmp / "oh-cache"), ledger=tmp / "oh-ledger") as c:
            labels = c.features(TASK, ["warm-up"]).meta.label_token_ids
        ids = [i for group in labels for i in group]
        bodies = [
            {
                "model": "fake",
                "inputs": [TASK.render(t)],
                "label_token_ids": ids,
                "return_hidden": True,
                "encoding_format": "base64",
            }
            for t in texts
        ]
        bare, client_times = [], []
        bare_cpu, client_cpu = [], []  # this process's CPU seconds (all its threads)
        keeper_cpu = []  # the client's bookkeeping thread's CPU seconds
        for rep in range(reps):  # interleaved: both sides see the same machine load
            c0 = time.process_time()
            bare.append(asyncio.run(_direct(url, bodies, conc)))
            bare_cpu.append(time.process_time() - c0)
            cache = SlowCache(CacheConfig(tmp / f"oh-cache-{conc}-{rep}-{writes}"), slow_write_s)
            with (Client if writes else _NoWrites)(
                adapter,
                cache=cache,
                ledger=tmp / f"oh-ledger-{conc}-{rep}-{writes}",
                max_concurrency=conc,
            ) as fresh:
                fresh.features(TASK, ["warm-up"])
                keeper = _thread_cpu_clock(fresh)
                t0, c0 = time.perf_counter(), time.process_time()
                k0 = time.clock_gettime(keeper)
                fresh.features(TASK, texts)
                keeper_cpu.append(time.clock_gettime(keeper) - k0)
                client_times.append(time.perf_counter() - t0)
                client_cpu.append(time.process_time() - c0)
    # the client run also sends the content-free query: n + 1 requests against n
    per_client = statistics.median(client_times) / (n + 1)
    per_bare = statistics.median(bare) / n
    cpu: dict[str, Any] = {
        # measured in place: caches and cores are shared with the requests, so it costs more
        # than bench_bookkeeping's writes in a row
        "bookkeeping_thread_cpu_ms_per_request": round(
            statistics.median(keeper_cpu) / (n + 1) * 1000, 3
        )
    }
    if server_process:  # then this process's CPU is the client side's alone
        cpu_client = statistics.median(client_cpu) / (n + 1)
        cpu_bare = statistics.median(bare_cpu) / n
        cpu_keeper = statistics.median(keeper_cpu) / (n + 1)
        cpu |= {
            "bare_httpx_cpu_ms_per_request": round(cpu_bare * 1000, 3),
            "client_cpu_ms_per_request": round(cpu_client * 1000, 3),
            # the event loop's share: httpx, retries, rate limiter, parsing, hand-offs
            "client_cpu_outside_bookkeeping_thread_ms_per_request": round(
                (cpu_client - cpu_keeper) * 1000, 3
            ),
            "cpu_ratio": round(cpu_client / cpu_bare, 3),
        }
    where = "in its own process" if server_process else "in a thread of this process"
    return (
        {
            "requests": n,
            "concurrency": conc,
            "reps": reps,
            "ratios_per_rep": [
                round(c / (n + 1) / (b / n), 3) for b, c in zip(bare, client_times, strict=True)
            ],
            "bare_httpx_ms_per_request": round(per_bare * 1000, 3),
            "client_ms_per_request": round(per_client * 1000, 3),
            "ratio": round(per_client / per_bare, 3),
            "target_ratio_at_most": 1.2,
            "meets_target": per_client / per_bare <= 1.2,
            "server": f"http.server on loopback, hash model (tests/faultserver.py), {where}",
        }
        | cpu
        | ({"each_cache_write_waits_ms": slow_write_s * 1000} if slow_write_s else {})
        | ({} if writes else {"diagnosis": "cache and ledger writes skipped (_NoWrites)"})
        | ({"server_service_ms": service_s * 1000} if service_s else {})
    )


def _thread_cpu_clock(client: Client) -> int:
    """The CPU-time clock of ``client``'s bookkeeping thread (Linux, POSIX)."""
    thread = client._bookkeeper._thread  # type: ignore[union-attr]
    assert thread.ident is not None
    return time.pthread_getcpuclockid(thread.ident)


def bench_bookkeeping(n: int, tmp: Path) -> dict[str, Any]:
    """What the client adds to each request in a row, timed alone: the cache write, the ledger
    transaction that settles it and reserves the next request, and the one thread hop that
    carries both (``run_in_executor``)."""
    import numpy as np

    from dect_maas import Ledger, LedgerRecord, ResponseCache, Usage, cache_key

    cache = ResponseCache(CacheConfig(tmp / "bk-cache"))
    ledger = Ledger(tmp / "bk-ledger")
    value = {"s": [1.0, 2.0], "c": None, "h": np.zeros(576, np.float32), "t": 9, "fp": "x"}
    keys = [cache_key({"i": i}) for i in range(n)]
    t0 = time.perf_counter()
    for key in keys:
        cache.set_many({key: value})
    t1 = time.perf_counter()
    held = ledger.reserve(Usage(1, 1, 10, 0.0), provider="p")
    for _ in range(n):
        record = LedgerRecord(provider="p", model="m", endpoint="http://h/v1/features")
        nxt = ledger.settle(held, Usage(1, 1, 5, 0.0), record, then_reserve=Usage(1, 1, 10, 0.0))
        assert isinstance(nxt, Reservation), nxt
        held = nxt
    t2 = time.perf_counter()

    async def hops() -> float:
        loop = asyncio.get_running_loop()
        s = time.perf_counter()
        for _ in range(n):
            await loop.run_in_executor(None, lambda: None)
        return time.perf_counter() - s

    hop = asyncio.run(hops())
    cache.close()
    ledger.close()
    ms = {
        "cache_write": (t1 - t0) / n * 1000,
        "settle_and_reserve_next": (t2 - t1) / n * 1000,
        "thread_hop": hop / n * 1000,
    }
    ms["total_per_request"] = sum(ms.values())
    return {k + "_ms": round(v, 3) for k, v in ms.items()}


def _review_texts(n: int) -> list[str]:
    """``n`` distinct movie-review snippets (the repo's example data), numbered past the 400."""
    path = ROOT / "examples" / "data" / "movies_test.jsonl"
    pool = list(dict.fromkeys(json.loads(line)["text"] for line in path.open(encoding="utf-8")))
    return [pool[i % len(pool)] + ("" if i < len(pool) else f" ({i})") for i in range(n)]


def bench_e2e(
    n: int, tmp: Path, batch: int, conc: int, reps: int, model_name: str
) -> dict[str, Any]:
    """``features()`` on a cold cache vs bare httpx sending the same request bodies (the same
    batches, at the same concurrency) to the same server, interleaved."""
    from dect_maas_server.testing import make_tiny_model, run_server

    if model_name == "tiny":
        model: Path | None = make_tiny_model("causal", tmp / "tiny-causal")
        described = "tiny random causal Llama (dect_maas_server.testing.make_tiny_model), CPU"
    else:
        model = None  # the server's embedded default model (prepared in ~/.cache/dect-maas)
        described = "the server's default model (SmolLM2-135M-Instruct), CPU"
    texts = _review_texts(n)
    with run_server(model) as url:
        adapter = LocalAdapter(url, max_inputs_per_request=batch)
        with Client(adapter, cache=CacheConfig(tmp / "e2e-warm"), ledger=tmp / "e2e-l0") as c:
            meta = c.features(TASK, ["warm up the server"]).meta
        ids = [i for group in meta.label_token_ids for i in group]
        prompts = [TASK.render(t) for t in texts]
        # the client's request bodies exactly (LocalAdapter), so both sides ask for the same work
        bodies = [
            {
                "model": meta.model,
                "inputs": prompts[i : i + batch],
                "label_token_ids": ids,
                "return_hidden": True,
                "encoding_format": "base64",
            }
            for i in range(0, n, batch)
        ]
        # bench_server.py's own setting: 64 clients sending 16 inputs each (a fuller queue)
        own = [{**bodies[0], "inputs": prompts[i : i + 16]} for i in range(0, n, 16)]
        asyncio.run(_direct(url, bodies[:conc], conc))  # warm-up: threads, allocator
        direct, through, server_own = [], [], []
        for rep in range(reps):  # interleaved: both sides see the same machine load
            server_own.append(asyncio.run(_direct(url, own, 64)))
            direct.append(asyncio.run(_direct(url, bodies, conc)))
            with Client(
                adapter,
                cache=CacheConfig(tmp / f"e2e-cache-{rep}"),
                ledger=tmp / f"e2e-ledger-{rep}",
                max_concurrency=conc,
                timeout=600,  # as the direct side: a slow model must not turn into retries
            ) as c:
                t0 = time.perf_counter()
                c.features(TASK, texts)
                through.append(time.perf_counter() - t0)
    server_qps = n / statistics.median(direct)
    own_qps = n / statistics.median(server_own)
    client_qps = (n + 1) / statistics.median(through)  # + the content-free query
    return {
        "reps": reps,
        "shares_per_rep": [
            round((n + 1) / c / (n / d), 3) for d, c in zip(direct, through, strict=True)
        ],
        "model": described,
        "examples": n,
        "batch": batch,
        "concurrency": conc,
        "server_direct_queries_per_s": round(server_qps, 2),
        "client_features_queries_per_s": round(client_qps, 2),
        "share": round(client_qps / server_qps, 3),
        "target_share_at_least": 0.9,
        "meets_target": client_qps / server_qps >= 0.9,
        "server_own_setting_queries_per_s": round(own_qps, 2),
        "share_of_server_own_setting": round(client_qps / own_qps, 3),
        "note": "movie-review snippets; share: the client against bare httpx sending the same "
        "request bodies at the same concurrency; share_of_server_own_setting: against "
        "bench_server.py's setting (64 clients x 16 inputs); the client run also asks the server "
        "what it serves, tokenizes the label words (free) and sends the content-free query; "
        "medians of interleaved repetitions",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=10000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument(
        "--e2e", type=int, default=None, help="examples (default 2048 tiny, 512 default model)"
    )
    parser.add_argument(
        "--e2e-model",
        choices=["tiny", "default"],
        default="tiny",
        help="end-to-end server model: a tiny random one, or the default SmolLM2-135M",
    )
    parser.add_argument("--batch", type=int, default=64, help="the client's default batch")
    parser.add_argument("--concurrency", type=int, default=8, help="the client's default")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median)")
    parser.add_argument(
        "--slow-write-ms", type=float, default=5.0, help="cache write delay for the slow-disk run"
    )
    parser.add_argument(
        "--service-ms",
        type=float,
        default=2.0,
        help="server time per request for the sequential run against a working server (0: skip)",
    )
    parser.add_argument("--only-e2e", action="store_true", help="skip the other benchmarks")
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.only_e2e:
            out["cache_hits"] = bench_hits(args.hits, tmp)
            out["bookkeeping_per_request"] = bench_bookkeeping(500, tmp)
            out["overhead_per_request_sequential"] = bench_overhead(
                args.requests, tmp, 1, args.reps
            )
            out["overhead_per_request_sequential_server_process"] = bench_overhead(
                args.requests, tmp, 1, args.reps, server_process=True
            )
            out["overhead_per_request_sequential_server_process_no_writes"] = bench_overhead(
                args.requests, tmp, 1, args.reps, server_process=True, writes=False
            )
            if args.service_ms:
                out["overhead_per_request_sequential_server_service_time"] = bench_overhead(
                    args.requests, tmp, 1, args.reps, service_s=args.service_ms / 1000
                )
            out["overhead_per_request_concurrent"] = bench_overhead(
                args.requests, tmp, args.concurrency, args.reps
            )
            if args.slow_write_ms:
                out["overhead_per_request_sequential_slow_disk"] = bench_overhead(
                    args.requests // 3, tmp, 1, 3, args.slow_write_ms / 1000
                )
        if not args.skip_e2e:
            n = args.e2e or (2048 if args.e2e_model == "tiny" else 512)
            out["end_to_end_local_server"] = bench_e2e(
                n, tmp, args.batch, args.concurrency, args.reps, args.e2e_model
            )
    out["machine"] = {
        "cpus": os.cpu_count(),
        "load_average_1_5_15_before": load_before,
        "load_average_1_5_15_after": os.getloadavg(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

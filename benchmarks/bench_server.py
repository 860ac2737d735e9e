"""Throughput of the local server's /v1/features against the model's raw batched forward.

Prints one JSON object:
- ``sequential_qps``: single-input requests sent one after another (batch size 1 every time);
- ``concurrent_qps``: ``--clients`` concurrent clients, each sending single-input requests, so
  the server's dynamic batching coalesces them;
- ``raw_forward_qps``: the same model in-process, padded batches of ``--batch-size`` through a
  plain transformers forward (all logits), the ceiling; ``raw_scoring_qps``: the server's own
  scoring path in-process (``Engine.forward``, no HTTP);
- ``server_vs_raw``: concurrent_qps / max(raw_forward_qps, raw_scoring_qps); target >= 0.8.

Default: the embedded SmolLM2-135M-Instruct on CPU. ``--synthetic roberta-large`` builds a
randomly initialised roberta-large-sized masked LM instead (for a GPU: ``--device cuda
--dtype bfloat16``). Usage: ``python benchmarks/bench_server.py [--queries 256]``.

Every run also prints CPU time per query, from the server's ``/metrics``: the server process's
(``server_cpu_us_per_query``), the part spent inside forward passes
(``server_forward_cpu_us_per_query``) and their difference, ``request_path_us_per_query``: HTTP,
JSON, tokenizing and batching, the per-query work that bounds the server on a GPU (at
10,000 queries/s it must stay well under 100 us). It splits into
``request_path_tokenize_us_per_query`` (the Rust tokenizer in a thread pool, mostly without the
GIL, so spread over cores) and ``request_path_serial_us_per_query`` (the event loop and the
batcher, which share one GIL). ``scoring_cpu_us_per_query`` is the in-process
scoring path (tokenizing included) at full batches; ``response_us_per_query_h1024`` builds
/v1/features responses for a 1024-wide hidden state (roberta-large's) in-process.

``--proxy`` is the one command for that figure on a CPU: a tiny random masked LM (the model
costs little), one torch thread, 64 clients x 16 inputs per request, batches of 512. The load
generator shares the CPU with the server, so on a small machine ``server_vs_raw`` understates
the server; the CPU-time figures do not depend on that.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from dect_maas_server.default_model import ensure_default_model
from dect_maas_server.engine import load_engine
from dect_maas_server.testing import run_server

PROXY_FLAGS = (
    "--synthetic=tiny",
    "--threads=1",
    "--queries=8192",
    "--batch-size=512",
    "--clients=64",
    "--inputs-per-request=16",
    "--max-wait-ms=5",
    "--sequential-queries=64",
)

LABEL_WORDS = (" great", " terrible")

REVIEWS = [
    "I loved this movie, the acting was wonderful and the story was moving.",
    "A dull, painful film that drags on far too long.",
    "The plot made no sense but the music was great.",
    "One of the best performances I have seen in years.",
    "I walked out after twenty minutes, a total waste of time.",
    "A charming little film with a lot of heart.",
    "The dialogue was clumsy and the ending was predictable.",
    "Beautifully shot, well acted, and surprisingly funny.",
]


def _inputs(n: int, kind: str, mask: str | None) -> list[str]:
    out = []
    for i in range(n):
        text = REVIEWS[i % len(REVIEWS)] + f" (review {i})"
        out.append(
            f"{text} All in all, it was {mask}."
            if kind == "masked"
            else f"{text} All in all, it was"
        )
    return out


def _synthetic_tiny(folder: Path) -> Path:
    """The test suite's tiny random masked LM (hidden size 32): the model costs almost nothing."""
    from dect_maas_server.testing import make_tiny_model

    return make_tiny_model("masked", folder)


def _synthetic_roberta_large(folder: Path) -> Path:
    """roberta-large shape (24 layers, 1024 wide), random weights, the tiny tokenizer."""
    from dect_maas_server.testing import make_tiny_model
    from transformers import RobertaConfig, RobertaForMaskedLM

    make_tiny_model("masked", folder)
    config = RobertaConfig.from_pretrained(folder)
    config.update(
        {
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "max_position_embeddings": 514,
        }
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        RobertaForMaskedLM(config).save_pretrained(folder)
    return folder


def _process_cpu() -> float:
    return time.process_time()


def raw_throughput(
    model_path: Path, texts: list[str], batch_size: int, device: str, dtype: str
) -> tuple[float, float, float]:
    """Queries/s of a plain forward and of the server's scoring path; the latter's CPU s/query."""
    engine = load_engine(str(model_path), device=device, dtype=dtype)
    tok = engine.tokenizer
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]

    def plain() -> None:
        for b in batches:
            enc = tok(b, return_tensors="pt", padding=True)
            with torch.inference_mode():
                engine.model(
                    input_ids=enc["input_ids"].to(engine.device),
                    attention_mask=enc["attention_mask"].to(engine.device),
                )
        if engine.device.type == "cuda":
            torch.cuda.synchronize()

    labels = [engine.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in LABEL_WORDS]

    def scoring() -> None:
        # What the server's worker does per batch: tokenize in one call, score the label ids.
        for b in batches:
            engine.score(engine.encode_many(b), label_ids=labels)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()

    results = []
    cpu = []
    for fn in (plain, scoring):
        fn()  # warm-up
        times = []
        for _ in range(3):
            c0, t0 = _process_cpu(), time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            cpu.append(_process_cpu() - c0)
        results.append(len(texts) / min(times))
    return results[0], results[1], min(cpu[3:]) / len(texts)


async def _concurrent(
    url: str, texts: list[str], clients: int, labels: list[int], per_request: int = 1
) -> float:
    """``clients`` concurrent clients send ``texts``, ``per_request`` per request; queries/s.

    Each client has its own one-connection httpx client: one shared pool of ``clients``
    connections costs httpcore a scan of every connection per request, which made this load
    generator, not the server, the bottleneck.
    """
    queue: asyncio.Queue[str] = asyncio.Queue()
    for t in texts:
        queue.put_nowait(t)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    headers = {"Content-Type": "application/json"}

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            while True:
                batch: list[str] = []
                while len(batch) < per_request and not queue.empty():
                    batch.append(queue.get_nowait())
                if not batch:
                    return
                body = {"inputs": batch, "label_token_ids": labels, "encoding_format": "base64"}
                r = await client.post(
                    "/v1/features", content=json.dumps(body).encode(), headers=headers
                )
                r.raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return len(texts) / (time.perf_counter() - t0)


def _client_process(
    url: str,
    texts: list[str],
    clients: int,
    labels: list[int],
    per_request: int,
    barrier: Any,
    results: Any,
) -> None:
    """One load-generator process: waits for the others, runs, reports (end, CPU seconds)."""
    barrier.wait()
    c0 = time.process_time()
    asyncio.run(_concurrent(url, texts, clients, labels, per_request))
    results.put((time.monotonic(), time.process_time() - c0))


def run_clients(
    url: str, texts: list[str], clients: int, labels: list[int], per_request: int, processes: int
) -> tuple[float, float]:
    """Queries/s of ``clients`` clients over ``processes`` processes; their CPU s per query."""
    if processes <= 1:
        c0 = _process_cpu()
        qps = asyncio.run(_concurrent(url, texts, clients, labels, per_request))
        return qps, (_process_cpu() - c0) / len(texts)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that has run torch
    barrier = ctx.Barrier(processes + 1)
    results = ctx.Queue()
    procs = []
    for i in range(processes):
        share = texts[i::processes]
        n = clients // processes + (1 if i < clients % processes else 0)
        args = (url, share, max(1, n), labels, per_request, barrier, results)
        procs.append(ctx.Process(target=_client_process, args=args, daemon=True))
    for proc in procs:
        proc.start()
    barrier.wait(timeout=300)
    t0 = time.monotonic()
    done = [results.get(timeout=900) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    elapsed = max(end for end, _ in done) - t0
    return len(texts) / elapsed, sum(cpu for _, cpu in done) / len(texts)


def _http_stack() -> str:
    """What uvicorn runs on here: httptools + uvloop when installed, else h11 + asyncio."""
    found = [importlib.util.find_spec(m) is not None for m in ("httptools", "uvloop")]
    return ("httptools" if found[0] else "h11") + "+" + ("uvloop" if found[1] else "asyncio")


def _delta(before: dict[str, Any], after: dict[str, Any], key: str) -> float:
    """A /metrics counter's growth; nan from a server that does not report it."""
    return float(after.get(key, math.nan) - before.get(key, math.nan))


def server_throughput(
    model_path: Path | None, texts: list[str], seq_texts: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    options = {
        "max_batch_size": args.batch_size,
        "max_wait_ms": args.max_wait_ms,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
    }
    with (
        run_server(model_path, startup_timeout=900, **options) as url,
        httpx.Client(base_url=url, timeout=600) as client,
    ):
        labels = [
            i
            for t in LABEL_WORDS
            for i in client.post("/v1/tokenize", json={"text": t}).json()["ids"][:1]
        ]
        # Warm-up, then sequential single-input requests.
        for t in seq_texts[:4]:
            client.post("/v1/features", json={"inputs": [t], "label_token_ids": labels})
        t0 = time.perf_counter()
        for t in seq_texts:
            r = client.post("/v1/features", json={"inputs": [t], "label_token_ids": labels})
            r.raise_for_status()
        sequential = len(seq_texts) / (time.perf_counter() - t0)
        k = args.inputs_per_request
        procs = args.client_processes
        run_clients(url, texts[: args.batch_size], args.clients, labels, k, procs)  # warm-up
        runs = []
        for _ in range(args.repeats):
            before = client.get("/metrics").json()
            qps, client_cpu = run_clients(url, texts, args.clients, labels, k, procs)
            after = client.get("/metrics").json()

            batches = after["batches_total"] - before["batches_total"]
            queries = after["queries_total"] - before["queries_total"]
            runs.append(
                {
                    "qps": qps,
                    "mean_batch": queries / batches if batches else 0.0,
                    "server_cpu": _delta(before, after, "process_cpu_seconds_total") / len(texts),
                    "forward_cpu": _delta(before, after, "forward_cpu_seconds_total") / len(texts),
                    "tokenize_cpu": _delta(before, after, "tokenize_cpu_seconds_total")
                    / len(texts),
                    "client_cpu": client_cpu,
                }
            )
    best = max(runs, key=lambda r: r["qps"])
    return {
        "sequential_qps": sequential,
        "concurrent_qps": best["qps"],
        "concurrent_qps_runs": [round(r["qps"], 2) for r in runs],
        "concurrent_mean_batch_size": best["mean_batch"],
        "server_cpu_s_per_query": min(r["server_cpu"] for r in runs),
        "forward_cpu_s_per_query": min(r["forward_cpu"] for r in runs),
        "request_path_s_per_query": min(r["server_cpu"] - r["forward_cpu"] for r in runs),
        "tokenize_s_per_query": min(r["tokenize_cpu"] for r in runs),
        "serial_s_per_query": min(
            r["server_cpu"] - r["forward_cpu"] - r["tokenize_cpu"] for r in runs
        ),
        "client_cpu_s_per_query": min(r["client_cpu"] for r in runs),
    }


def response_cost(hidden_size: int, n_items: int = 16, labels: int = 2) -> float | None:
    """Seconds per query to build /v1/features responses with a ``hidden_size``-wide state."""
    try:
        from dect_maas_server.app import features_body
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((n_items, labels), dtype=np.float32)
    logprobs = logits - 5.0
    hidden = rng.standard_normal((n_items, hidden_size), dtype=np.float32)
    n_tokens = [20] * n_items
    truncated = [False] * n_items
    reps = 400
    t0 = time.process_time()
    for _ in range(reps):
        features_body("m", "fp", logits, logprobs, hidden, n_tokens, truncated, "base64")
    return (time.process_time() - t0) / (reps * n_items)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--synthetic", choices=["roberta-large", "tiny"], help="random model of that size"
    )
    p.add_argument(
        "--proxy",
        action="store_true",
        help="the request-path proxy: --synthetic tiny --threads 1 --queries 8192 "
        "--batch-size 512 --clients 64 --inputs-per-request 16 --max-wait-ms 5 "
        "--sequential-queries 64 (explicit flags given after it still win)",
    )
    p.add_argument("--repeats", type=int, default=3, help="concurrent runs; the best is kept")
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="load-generator processes sharing --clients (one Python process tops out at a few "
        "thousand queries/s: use several on a machine with cores to spare, e.g. a GPU host)",
    )
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--sequential-queries", type=int, default=32)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--inputs-per-request",
        type=int,
        default=1,
        help="inputs each concurrent client sends per request (the client batches like this)",
    )
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads, raw and server alike")
    argv = sys.argv[1:]
    if "--proxy" in argv:
        argv = [*PROXY_FLAGS, *argv]
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic == "roberta-large":
            model_path: Path = _synthetic_roberta_large(Path(tmp) / "roberta-large-random")
            name = "random roberta-large-sized masked LM"
        elif args.synthetic == "tiny":
            model_path = _synthetic_tiny(Path(tmp) / "tiny-masked")
            name = "tiny random masked LM (hidden 32, request-path proxy)"
        elif args.model:
            model_path = Path(args.model)
            name = model_path.name
        else:
            model_path = ensure_default_model()
            name = "SmolLM2-135M-Instruct (default)"
        engine = load_engine(str(model_path), device="cpu")
        kind, mask = engine.kind, engine.mask_token
        n_tokens = [len(engine.encode(t).ids) for t in _inputs(args.queries, kind, mask)]
        del engine
        texts = _inputs(args.queries, kind, mask)
        seq_texts = _inputs(args.sequential_queries, kind, mask)
        raw_plain, raw_scoring, scoring_cpu = raw_throughput(
            model_path, texts, args.batch_size, args.device, args.dtype
        )
        served = server_throughput(model_path, texts, seq_texts, args)
    ceiling = max(raw_plain, raw_scoring)
    server_cpu = served["server_cpu_s_per_query"]
    build = response_cost(1024)
    report: dict[str, Any] = {
        "benchmark": "dect-maas-server /v1/features throughput",
        "model": name,
        "device": args.device,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "http_stack": _http_stack(),
        "python": sys.version.split()[0],
        "queries": args.queries,
        "clients": args.clients,
        "client_processes": args.client_processes,
        "inputs_per_request": args.inputs_per_request,
        "max_batch_size": args.batch_size,
        "max_wait_ms": args.max_wait_ms,
        "tokens_per_input_mean": statistics.mean(n_tokens),
        "raw_forward_qps": round(raw_plain, 2),
        "raw_scoring_qps": round(raw_scoring, 2),
        "sequential_qps": round(served["sequential_qps"], 2),
        "concurrent_qps": round(served["concurrent_qps"], 2),
        "concurrent_mean_batch_size": round(served["concurrent_mean_batch_size"], 2),
        "server_vs_raw": round(served["concurrent_qps"] / ceiling, 3),
        "target_server_vs_raw": 0.8,
        "concurrent_vs_sequential": round(served["concurrent_qps"] / served["sequential_qps"], 2),
        "concurrent_qps_runs": served["concurrent_qps_runs"],
        "server_cpu_us_per_query": round(server_cpu * 1e6, 1),
        "server_forward_cpu_us_per_query": round(served["forward_cpu_s_per_query"] * 1e6, 1),
        "request_path_us_per_query": round(served["request_path_s_per_query"] * 1e6, 1),
        "request_path_tokenize_us_per_query": round(served["tokenize_s_per_query"] * 1e6, 1),
        "request_path_serial_us_per_query": round(served["serial_s_per_query"] * 1e6, 1),
        "target_request_path_us_per_query": 100.0,
        "scoring_cpu_us_per_query": round(scoring_cpu * 1e6, 1),
        "client_cpu_us_per_query": round(served["client_cpu_s_per_query"] * 1e6, 1),
        "response_us_per_query_h1024": None if build is None else round(build * 1e6, 2),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""``dect-maas-server``: parse flags, load the model, serve on a socket bound before loading.

``dect-maas-server prepare`` (or ``--prepare-only``) only obtains and converts the embedded
default model and prints its folder.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("dect_maas_server")

API_KEY_ENV = "DECT_MAAS_SERVER_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dect-maas-server",
        description="Serve a transformers masked or causal LM for Decoder Tuning over HTTP.",
    )
    p.add_argument(
        "command",
        nargs="?",
        choices=["serve", "prepare"],
        default="serve",
        help="'prepare' only obtains and converts the default model, then prints its folder",
    )
    p.add_argument(
        "--model", help="local folder or hub id; default: the embedded SmolLM2-135M-Instruct"
    )
    p.add_argument("--served-model-name", help="name reported to clients (default: folder name)")
    p.add_argument("--model-kind", choices=["auto", "masked", "causal"], default="auto")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (logged)")
    p.add_argument("--api-key", help=f"bearer key; prefer the {API_KEY_ENV} environment variable")
    p.add_argument(
        "--allow-public-without-key",
        action="store_true",
        help="serve on a non-loopback address without an API key (not recommended)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads for the model (0: torch's default); 1 is faster on a busy machine",
    )
    p.add_argument("--max-batch-size", type=int, default=64, help="queries per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="wait for a batch to fill")
    p.add_argument("--max-queue", type=int, default=1024, help="queued queries before 429")
    p.add_argument(
        "--max-input-tokens", type=int, default=512, help="tokens per input; longer is truncated"
    )
    p.add_argument("--max-batch-tokens", type=int, default=32768, help="padded tokens per forward")
    p.add_argument("--max-inputs-per-request", type=int, default=256)
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    p.add_argument("--max-logprobs", type=int, default=20, help="cap on completions' logprobs")
    p.add_argument(
        "--max-label-token-ids",
        type=int,
        default=1024,
        help="label token ids scored per input in /v1/features, else 413",
    )
    p.add_argument(
        "--max-scores-per-request",
        type=int,
        default=65536,
        help="inputs x label token ids in one /v1/features request, else 413",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a connection has to send a whole request head (also after a response)",
    )
    p.add_argument(
        "--body-timeout", type=float, default=60.0, help="seconds to send a request body"
    )
    p.add_argument("--max-header-bytes", type=int, default=64 * 1024, help="request head size")
    p.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        help="open connections; past it the longest-waiting idle one is closed",
    )
    p.add_argument("--cache-dir", help="where the default model is kept (env DECT_MAAS_CACHE_DIR)")
    p.add_argument("--prepare-only", action="store_true", help="same as the 'prepare' command")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _positive(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in (
        "max_batch_size",
        "max_queue",
        "max_input_tokens",
        "max_batch_tokens",
        "max_inputs_per_request",
        "max_body_bytes",
        "max_label_token_ids",
        "max_scores_per_request",
        "max_header_bytes",
        "max_connections",
    ):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not (args.header_timeout > 0 and args.body_timeout > 0):
        parser.error("--header-timeout and --body-timeout must be positive")
    if args.max_wait_ms < 0 or args.max_logprobs < 0 or args.threads < 0:
        parser.error("--max-wait-ms and --max-logprobs must not be negative")
    if args.max_inputs_per_request > args.max_queue:
        # Such a request could never be queued: it would get 429 forever.
        parser.error("--max-inputs-per-request must not exceed --max-queue")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")


def _connection_cap(wanted: int) -> int:
    """``wanted``, or fewer if the process may not open that many files.

    Past its file-descriptor limit the server can accept no one at all, so the cap stays below
    it (the soft limit is first raised to the hard one); 64 are kept for the model's files, the
    listening socket and logs.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or wanted <= soft - 64:
        return wanted
    cap = max(1, soft - 64)
    logger.warning(
        "--max-connections %d is above what the file-descriptor limit (%d) allows; using %d",
        wanted,
        soft,
        cap,
    )
    return cap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "prepare" or args.prepare_only:
        from .default_model import DefaultModelError, ensure_default_model

        try:
            path = ensure_default_model(args.cache_dir)
        except DefaultModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(path)
        return 0
    _positive(parser, args)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and not api_key and not args.allow_public_without_key:
        parser.error(
            f"refusing to listen on {args.host} without an API key: set {API_KEY_ENV} "
            "(or --api-key), or pass --allow-public-without-key"
        )
    return serve(args, api_key)


def _test_hold_file(env: str) -> str | None:
    """The test-only hold file from ``env`` (see ``batcher.TEST_HOLD_ENV``), with a warning, so
    that a server started with it by mistake says why its forward passes may stall."""
    path = os.environ.get(env) or None
    if path is not None:
        logger.warning("%s is set: forward passes wait while %s exists (a test hook)", env, path)
    return path


def serve(args: argparse.Namespace, api_key: str | None) -> int:
    import uvicorn

    class _Server(uvicorn.Server):
        """Stops gracefully on SIGTERM/SIGINT and returns, so that shutdown is logged and the
        exit code is 0 (uvicorn would re-raise the signal after its own shutdown)."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    from .app import Limits, create_app
    from .batcher import TEST_HOLD_ENV
    from .engine import load_engine
    from .protocol import guarded_protocol

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        sock.close()
        return 1
    sock.listen(2048)
    sock.setblocking(False)
    model_path = args.model
    name = args.served_model_name
    if model_path is None:
        from .default_model import DEFAULT_MODEL_NAME, DefaultModelError, ensure_default_model

        try:
            model_path = str(ensure_default_model(args.cache_dir))
        except DefaultModelError as exc:
            logger.error("%s", exc)
            sock.close()
            return 1
        name = name or DEFAULT_MODEL_NAME
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    # Until uvicorn takes over the signals, SIGTERM during a slow model load exits quietly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    started = time.monotonic()
    try:
        engine = load_engine(
            model_path,
            kind=args.model_kind,
            device=args.device,
            dtype=args.dtype,
            max_input_tokens=args.max_input_tokens,
            name=name,
        )
    except Exception as exc:  # any loader failure ends the start with one clear line
        logger.error("cannot load model %s: %s: %s", model_path, type(exc).__name__, exc)
        sock.close()
        return 1
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host

    def announce() -> None:
        logger.info(
            "listening on http://%s:%d model=%s kind=%s auth=%s max_batch_size=%d max_wait_ms=%g",
            shown,
            port,
            engine.name,
            engine.kind,
            "bearer" if api_key else "none",
            args.max_batch_size,
            args.max_wait_ms,
        )

    limits = Limits(
        max_body_bytes=args.max_body_bytes,
        max_inputs_per_request=args.max_inputs_per_request,
        max_logprobs=args.max_logprobs,
        max_label_token_ids=args.max_label_token_ids,
        max_scores_per_request=args.max_scores_per_request,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        max_header_bytes=args.max_header_bytes,
        max_connections=_connection_cap(args.max_connections),
    )
    app = create_app(
        engine,
        api_key=api_key,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_batch_tokens=args.max_batch_tokens,
        limits=limits,
        on_startup=announce,
        test_hold_file=_test_hold_file(TEST_HOLD_ENV),
    )
    config = uvicorn.Config(
        app,
        http=guarded_protocol(limits, app.metrics),
        h11_max_incomplete_event_size=limits.max_header_bytes,
        log_config=None,
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # client addresses are never used; saves work on every request
        timeout_graceful_shutdown=10,
    )
    server = _Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        logger.info(
            "shutdown after %.1f s: %d requests, %d queries",
            time.monotonic() - started,
            app.metrics.requests,
            app.metrics.queries,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

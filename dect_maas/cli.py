"""The ``dect-maas`` command.

Exit codes (stable; scripts may rely on them):

    0  success
    1  any other error
    2  usage or configuration error (bad flags, config file, data file, task, unsupported request)
    3  a budget limit would be exceeded (nothing over the limit was sent)
    4  the provider failed (network, HTTP status, malformed answer) after retries
    130 interrupted by Ctrl-C (SIGINT)
    141 stdout was closed by its reader (``dect-maas estimate cfg.toml | head -1``); nothing printed
    143 stopped by SIGTERM (``timeout``, ``docker stop``, a CI cancel)

On SIGINT or SIGTERM, ``run``, ``predict`` and ``demo`` send nothing new, let requests in flight
finish (at most ``STOP_GRACE_S``, 10 s; then they count at their worst case), store and settle
them, and exit with one line. A second signal exits at once (the ledger's write-ahead record
still counts what was in flight).

Errors are printed as one line on stderr; ``--verbose`` adds the traceback and debug logging.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from ._exceptions import (
    BudgetExceeded,
    ConfigError,
    DectError,
    Interrupted,
    ProviderError,
    TransportError,
    UnsupportedCapability,
)
from .client.ledger import Ledger
from .client.storage import display_target, is_database_url
from .experiments.demo import SERVER_INSTALL_HINT, run_demo

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_BUDGET",
    "EXIT_CONFIG",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PROVIDER",
    "EXIT_TERMINATED",
    "main",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_BUDGET = 3
EXIT_PROVIDER = 4
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `yes | head -1`
EXIT_TERMINATED = 143


class UsageError(ConfigError):
    """A command-line problem found after argparse (a missing file, conflicting flags)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _port(text: str) -> int:
    """A TCP port for argparse: an integer from 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port; give 0 to 65535")
    return port


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="dect-maas",
        description="Decoder Tuning for models behind an API: query once per example, train a "
        "small decoder locally, account for every query.",
        epilog="Exit codes: 0 ok, 1 other error, 2 usage/config error, 3 budget exceeded, "
        "4 provider error, 130 interrupted (Ctrl-C), 143 stopped by SIGTERM.",
    )
    parser.add_argument("--version", action="version", version=f"dect-maas {__version__}")
    common = _Parser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging and full tracebacks"
    )
    bars = common.add_mutually_exclusive_group()
    bars.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="always show progress bars (default: only when stderr is a terminal)",
    )
    bars.add_argument(
        "--no-progress", dest="progress", action="store_false", help="never show progress bars"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="run DecT and the baselines on the bundled movie-review sample with the local server",
        description="Obtain the default model if missing, start the local server on a loopback "
        "port, run DecT and the baselines on the bundled movie-sentiment sample, print the table, "
        "write the report and stop the server. A second run is answered from the cache.",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="folder for the demo's cache, ledger and reports "
        "(default: $DECT_MAAS_DEMO_DIR or ~/.cache/dect-maas/demo)",
    )
    p.add_argument("--shots", type=_positive, nargs="+", default=None, help="default: 1 4 16")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2")
    p.add_argument(
        "--model", default=None, help="a model folder for the server (default: its embedded model)"
    )
    p.add_argument(
        "--test-limit", type=_positive, default=None, help="use only the first N test examples"
    )
    p.add_argument(
        "--port",
        type=_port,
        default=None,
        help="loopback port for the server (default 47623, a free one if taken; the cache key "
        "covers the server URL, so keep it stable to reuse cached answers)",
    )

    p = sub.add_parser("run", parents=[common], help="run an experiment config")
    p.add_argument("config", type=Path, help="experiment config (.toml, .yaml)")
    p.add_argument("--run-id", default=None, help="name of this run (default: name-timestamp)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")

    p = sub.add_parser(
        "estimate", parents=[common], help="dry run: what a config would send and cost"
    )
    p.add_argument("config", type=Path)
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")

    p = sub.add_parser("ledger", parents=[common], help="read the query ledger")
    p.add_argument(
        "action",
        choices=["summary", "export", "runs", "reset"],
        help="reset: move a damaged or emptied ledger file aside so a new budget can start",
    )
    p.add_argument(
        "path", nargs="?", type=_store_arg, default=None, help="the ledger folder or file, or URL"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--ledger-dir", type=_store_arg, default=None, help="the ledger folder or postgresql:// URL"
    )
    where.add_argument("--config", type=Path, default=None, help="take the ledger folder from it")
    p.add_argument("--run", default=None, help="only this run id")
    p.add_argument("--format", choices=["csv", "jsonl"], default="csv", help="export format")
    p.add_argument(
        "--output", type=Path, default=None, help="export file (default: stdout for jsonl/csv)"
    )
    p.add_argument("--json", action="store_true", help="summary as JSON")

    p = sub.add_parser(
        "storage", parents=[common], help="copy a ledger and cache into PostgreSQL (or back)"
    )
    p.add_argument("action", choices=["copy"])
    p.add_argument("--to", required=True, type=_store_arg, help="postgresql:// URL (or folder)")
    p.add_argument("--config", type=Path, default=None, help="take both folders from it")
    p.add_argument("--ledger-dir", type=_store_arg, default=None, help="the ledger to copy")
    p.add_argument("--cache-dir", type=_store_arg, default=None, help="the cache to copy")

    p = sub.add_parser(
        "serve",
        parents=[common],
        help="start the local HuggingFace server (needs the dect-maas-server package)",
        description="Runs `python -m dect_maas_server` with the remaining arguments.",
    )
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="passed to dect-maas-server")

    p = sub.add_parser("predict", parents=[common], help="classify new texts with a saved model")
    p.add_argument("model", type=Path, help="a saved model (e.g. RUN/models/dect-16shot-seed0.npz)")
    p.add_argument("--input", type=Path, required=True, help="JSONL or CSV with a text field")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="provider config (default: the report.json of the run the model comes from)",
    )
    p.add_argument("--text-field", default=None, help="default: the config's data.text_field")
    p.add_argument("--output", type=Path, default=None, help="JSONL file (default: stdout)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":  # everything it does not know goes to the server
        args.server_args = [*rest, *args.server_args]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    verbose = bool(getattr(args, "verbose", False))
    _setup_logging(verbose)
    if getattr(args, "progress", None) is None:
        args.progress = sys.stderr.isatty()
    signals = args.command in ("run", "predict", "demo")
    restore = _stop_on_signals() if signals and _in_main_thread() else None
    try:
        code = int(_COMMANDS[args.command](args))
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
        return code
    except Interrupted as exc:
        _error(_one_line(exc), verbose)
        return 128 + exc.signum
    except BrokenPipeError:
        # The reader went away (`dect-maas estimate cfg.toml | head -1`): exit quietly, as a
        # command killed by SIGPIPE does, and keep Python from failing again on its final flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        _error("interrupted; cached answers are kept, re-run to resume", verbose)
        return EXIT_INTERRUPTED
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        code = exit_code_for(exc)
        _error(_one_line(exc), verbose)
        return code
    finally:
        if restore is not None:
            restore()


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()  # signal handlers need it


def _stop_on_signals() -> Any:
    """SIGINT and SIGTERM ask the clients to stop sending (see the module docstring); returns
    a function that puts the previous handlers back."""
    import signal

    from .client.client import _interrupted, clear_stop, request_stop

    def handle(signum: int, frame: Any) -> None:
        from .client.client import _StopFlag

        if _StopFlag.signum is not None:  # a second signal: leave now
            print(f"dect-maas: error: signal {signum} again: exiting now", file=sys.stderr)
            sys.stderr.flush()
            os._exit(128 + signum)
        if not request_stop(signum):
            raise _interrupted(signum)  # nothing in flight: stop where we are

    clear_stop()
    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)
        clear_stop()

    return restore


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, BudgetExceeded):
        return EXIT_BUDGET
    if isinstance(exc, (ConfigError, UnsupportedCapability)):
        return EXIT_CONFIG
    if isinstance(exc, ProviderError):
        return EXIT_PROVIDER
    return EXIT_ERROR


# -- commands -------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from .experiments.report import summary_lines
    from .experiments.runner import Experiment

    exp = Experiment.from_config(args.config, run_id=args.run_id)
    try:
        result = exp.run(progress=args.progress, on_event=_info)
    except TransportError as exc:
        _raise_unreachable(exc, exp.config)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return EXIT_OK
    print("\n".join(summary_lines(result)))
    return EXIT_OK


def _cmd_estimate(args: argparse.Namespace) -> int:
    from .experiments.runner import Experiment

    exp = Experiment.from_config(args.config)
    try:
        est = exp.estimate()
    except TransportError as exc:  # its tokenizer and cache probes are free, but need a server
        _raise_unreachable(exc, exp.config)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return EXIT_OK
    p = est.plan
    print(f"examples: {p.n_test} test + {p.n_train_union} training (union of all k-shot sets)")
    print(
        f"queries:  {est.queries} ({est.cached_queries} already cached, "
        f"{est.queries_to_pay} to pay)"
    )
    print(f"requests: {est.requests}")
    print(f"input tokens (estimate): {est.input_tokens}")
    print(f"cost (estimate): {_money(est.cost_usd)}")
    for role, row in est.by_role.items():
        how = f" ({row['tokens_method']})" if row.get("tokens_method") else ""
        print(f"  {role}: {row['queries']} queries, {row['requests']} requests, "
              f"{row['input_tokens']} input tokens{how}")  # fmt: skip
    for method, row in est.by_method.items():
        tpp = row.get("tokens_per_prediction")
        calls = f", {row['calls']} calls" if "calls" in row else ""
        print(f"  {method}: {row['queries']} queries{calls}, {row['requests']} requests, "
              f"{row['input_tokens']} input tokens, {_money(row['cost_usd'])}"
              + (f", {tpp:.0f} tokens per prediction" if tpp else ""))  # fmt: skip
    for note in est.assumptions:
        print(f"note: {note}")
    for limit in est.over_budget:
        print(f"warning: {limit}: the run would stop there (raise the limit or run fewer shots)")
    print("nothing was paid (only free requests: model, label words, token counts)")
    return EXIT_OK


def _raise_unreachable(exc: TransportError, config: Any) -> NoReturn:
    """Nothing answered: say which URL, and which server to start (``explain_unreachable``);
    any other transport error goes on as it was."""
    from .experiments.wiring import explain_unreachable

    better = explain_unreachable(exc, config.provider)
    if better is exc:
        raise exc
    raise better from exc


def _money(x: float) -> str:
    from .experiments.report import _money as money

    return money(x)


def _cmd_ledger(args: argparse.Namespace) -> int:

    directory = args.ledger_dir or args.path
    if directory is None and args.config is not None:
        from .experiments.config_file import load_config

        directory = load_config(args.config).ledger_dir
    if directory is None:
        raise UsageError("ledger: give --ledger-dir DIR or --config CONFIG")
    if is_database_url(directory) and args.action == "reset":
        raise UsageError("reset moves a damaged ledger file aside; a PostgreSQL ledger has none")
    if not is_database_url(directory) and not Path(directory).exists():
        raise UsageError(f"ledger folder {directory} does not exist")
    if args.action == "reset":
        from .client.ledger import reset_ledger

        aside = reset_ledger(directory)
        if aside is None:
            raise UsageError(f"there is no ledger file in {directory}")
        _info(f"moved the old ledger to {aside}; the next run starts a new, empty budget")
        return EXIT_OK
    ledger = Ledger(directory)
    try:
        if args.action == "runs":
            for run in ledger.runs():
                print(run)
            return EXIT_OK
        if args.action == "summary":
            summary = ledger.summary(args.run).to_dict()
            if args.json:
                print(json.dumps(summary, indent=2, default=str))
            else:
                label = args.run or "all runs"
                print(f"ledger {display_target(directory)} ({label}):")
                for key, value in summary.items():
                    print(f"  {key}: {value}")
            return EXIT_OK
        out = args.output
        if out is None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"ledger.{args.format}"
                _export(ledger, path, args.format, args.run)
                sys.stdout.write(path.read_text(encoding="utf-8"))
        else:
            n = _export(ledger, out, args.format, args.run)
            _info(f"wrote {out}" + (f" ({n} records)" if n is not None else ""))
        return EXIT_OK
    finally:
        close = getattr(ledger, "close", None)
        if close is not None:
            close()


def _store_arg(text: str) -> Path | str:
    """A folder, or a postgresql:// URL kept as it is (a Path would fold its '//')."""
    return text if is_database_url(text) else Path(text)


def _cmd_storage(args: argparse.Namespace) -> int:
    from .client.cache import CacheConfig, ResponseCache
    from .client.transfer import copy_cache, copy_ledger

    ledger_dir, cache_dir = args.ledger_dir, args.cache_dir
    if args.config is not None:
        from .experiments.config_file import load_config

        config = load_config(args.config)
        ledger_dir = ledger_dir or config.ledger_dir
        cache_dir = cache_dir or config.cache_dir
    if ledger_dir is None and cache_dir is None:
        raise UsageError("storage copy: give --config CONFIG, or --ledger-dir and/or --cache-dir")
    for what, where in (("ledger", ledger_dir), ("cache", cache_dir)):
        if where is not None and not is_database_url(where) and not Path(where).exists():
            raise UsageError(f"{what} folder {where} does not exist")
    shown = display_target(args.to)
    if ledger_dir is not None:
        with Ledger(ledger_dir) as source, Ledger(args.to) as target:
            done = copy_ledger(source, target)
        _info(
            f"ledger: copied {done.records} records, {done.spent_runs} run totals and "
            f"{done.reservations} open reservations from {display_target(ledger_dir)} to {shown}"
        )
    if cache_dir is not None:
        with (
            ResponseCache(CacheConfig(cache_dir)) as cache_from,
            ResponseCache(CacheConfig(args.to)) as cache_to,
        ):
            done = copy_cache(cache_from, cache_to)
        _info(
            f"cache: copied {done.cache_entries} entries ({done.cache_already_there} were there "
            f"already) from {display_target(cache_dir)} to {shown}"
        )
    return EXIT_OK


def _export(ledger: Any, path: Path, fmt: str, run: str | None) -> int | None:
    method = ledger.export_csv if fmt == "csv" else ledger.export_jsonl
    try:
        n = method(path, run_id=run)
    except TypeError:
        if run is not None:
            raise UsageError("this ledger cannot filter exports by --run") from None
        n = method(path)
    return int(n) if isinstance(n, int) else None


def _cmd_serve(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("dect_maas_server") is None:
        raise UsageError(SERVER_INSTALL_HINT)
    extra = [a for a in args.server_args if a != "--"]
    cmd = [sys.executable, "-m", "dect_maas_server", *extra]
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execv(sys.executable, cmd)  # the server owns the terminal and its signals from here
    import subprocess

    return subprocess.call(cmd)


def _cmd_predict(args: argparse.Namespace) -> int:
    from .experiments.predict import config_for_model, predict_file

    try:
        n = predict_file(
            args.model,
            args.input,
            config_path=args.config,
            text_field=args.text_field,
            output=args.output,
            progress=args.progress,
        )
    except TransportError as exc:
        _raise_unreachable(exc, config_for_model(args.model, args.config))
    _info(f"classified {n} text(s)")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(
        output=args.output,
        shots=args.shots,
        seeds=args.seeds,
        model=args.model,
        test_limit=args.test_limit,
        progress=args.progress,
        verbose=args.verbose,
        port=args.port,
    )


_COMMANDS = {
    "demo": _cmd_demo,
    "run": _cmd_run,
    "estimate": _cmd_estimate,
    "ledger": _cmd_ledger,
    "storage": _cmd_storage,
    "serve": _cmd_serve,
    "predict": _cmd_predict,
}


# -- output ---------------------------------------------------------------------------------------


def _setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("dect_maas")
    if any(getattr(h, "_dect_cli", False) for h in logger.handlers):
        logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._dect_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _info(msg: str, stream: TextIO | None = None) -> None:
    print(msg, file=stream or sys.stderr, flush=True)


def _error(msg: str, verbose: bool) -> None:
    if verbose:
        traceback.print_exc(file=sys.stderr)
    print(f"dect-maas: error: {msg}", file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, DectError):
        text = f"{type(exc).__name__}: {text}"
    return text


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
